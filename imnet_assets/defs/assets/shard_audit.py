from dagster import (
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableSchema,
    asset,
)

from imnet_assets.defs.assets.common import human_bytes, logger, table
from imnet_assets.defs.checks import AUDIT_INFO, AUDIT_RECONCILED, result, shard_audit_checks
from imnet_assets.defs.release_keys import asset_key, group, key_prefix
from imnet_assets.settings import Settings
from imnet_assets.stages.audit import AuditReport, check_info, run_audit

REASONS_SCHEMA = TableSchema(columns=[
    TableColumn("stage", "string", description="index (probe) or encode (inside a shard run)"),
    TableColumn("reason", "string"),
    TableColumn("images", "int"),
])
PER_SHARD_SCHEMA = TableSchema(columns=[
    TableColumn("shard", "string"),
    TableColumn("planned", "int"),
    TableColumn("written", "int"),
    TableColumn("excluded", "int"),
    TableColumn("size", "string", description="the tar's size, humanized (bytes: exact)"),
    TableColumn("bytes", "int"),
    TableColumn("repaired", "int"),
    TableColumn("run_id", "string"),
    TableColumn("code_version", "string"),
])
BAR_WIDTH = 40  # characters of the longest bar in a distribution table
MAX_FILLED = 128  # a distribution with no more buckets than this from first to last shows its empty ones


def distribution(rows: list[tuple], width: int, bucket: str, unit: str, what: str) -> MetadataValue:
    """A histogram as a table the UI shows inline: every bucket labelled with its range (bucket b of
    width w is b .. b+w-1 `unit`), its count, its share and a bar drawn in text."""
    total = sum(int(n) for _, n in rows) or 1
    top = max((int(n) for _, n in rows), default=0) or 1
    counts = {int(start): int(n) for start, n in rows}
    if counts and (max(counts) - min(counts)) // width < MAX_FILLED:  # empty buckets between shown as 0
        counts = {b: counts.get(b, 0) for b in range(min(counts), max(counts) + 1, width)}
    records = []
    for start, n in counts.items():
        label = f"{start} {unit}" if width == 1 else f"{start}–{start + width - 1} {unit}"
        bar = "█" * max(1, round(BAR_WIDTH * n / top)) if n else ""
        records.append({bucket: label, what: n, "share": f"{100 * n / total:.1f}%", "bar": bar})
    schema = TableSchema(columns=[
        TableColumn(bucket, "string"), TableColumn(what, "int"),
        TableColumn("share", "string"), TableColumn("bar", "string"),
    ])
    return table(records, schema)


def audit_metadata(report: AuditReport) -> dict:
    """What the UI shows for one audit: totals (sizes humanized next to the exact bytes), exclusion
    reasons, per-shard facts, and the two distributions as tables (Dagster shows tables inline;
    markdown over 1,000 characters, such as an embedded chart, only behind "[Show Markdown]")."""
    t = report.totals
    ratio = t["shard_bytes"] / t["source_bytes"] if t.get("source_bytes") else 0.0
    sizes = {f"{k.removesuffix('_bytes')}_size": MetadataValue.text(human_bytes(int(t[k])))
             for k in ("shard_bytes", "source_bytes") if t.get(k) is not None}
    per_shard = [{**row, "size": human_bytes(row.get("bytes") or 0)} for row in report.per_shard]
    return {
        **{k: MetadataValue.int(int(v)) for k, v in t.items() if v is not None},
        **sizes,
        "compression_ratio": MetadataValue.float(round(float(ratio), 4)),
        "missing_shards": MetadataValue.int(len(report.missing)),
        "stale_shards": MetadataValue.int(len(report.stale)),
        "exclusion_reasons": table(report.reasons, REASONS_SCHEMA),
        "per_shard": table(per_shard, PER_SHARD_SCHEMA),
        "class_sizes": distribution(report.class_sizes, report.class_bucket, "samples per class", "samples",
                                    "classes"),
        "image_short_sides": distribution(report.image_sizes, report.image_bucket, "source short side", "px",
                                          "images"),
    }


def make(settings: Settings):
    @asset(
        name="shard_audit",
        key_prefix=key_prefix(settings),
        group_name=group(settings),
        deps=[asset_key(settings, "wds_shards")],
        code_version="1",
        check_specs=shard_audit_checks(asset_key(settings, "shard_audit")),
        description=(
            "Loads every shard manifest into the catalog (its single writer for shard facts), "
            "reconciles the plan against the shards, writes timm's `_info.json`, and records "
            "per-shard and dataset totals, exclusion reasons and size distributions."
        ),
    )
    def shard_audit(context: AssetExecutionContext) -> MaterializeResult:
        report = run_audit(settings, context.run.run_id, logger(context))
        info_problems = check_info(settings, report.lengths) if report.info_written else [
            f"_info.json not written, the audit found {len(report.problems)} problems: "
            + "; ".join(report.problems[:3])]
        return MaterializeResult(
            metadata=audit_metadata(report),
            check_results=[
                result(AUDIT_RECONCILED, asset_key(settings, "shard_audit"), report.problems,
                       **{k: int(v) for k, v in report.reconcile.items() if isinstance(v, int)}),
                result(AUDIT_INFO, asset_key(settings, "shard_audit"), info_problems),
            ],
        )

    return shard_audit
