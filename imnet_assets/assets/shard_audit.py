from dagster import (
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableSchema,
    asset,
)

from ..checks import AUDIT_INFO, AUDIT_RECONCILED, result, shard_audit_checks
from ..core.audit import AuditReport, bar_chart_png, check_info, png_markdown, run_audit
from ..settings import Settings
from .common import GROUP, logger, table

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
    TableColumn("bytes", "int"),
    TableColumn("repaired", "int"),
    TableColumn("run_id", "string"),
    TableColumn("code_version", "string"),
])
def audit_metadata(report: AuditReport) -> dict:
    """What the UI shows for one audit: totals, exclusion reasons, per-shard facts, distributions."""
    t = report.totals
    charts = "\n\n".join([
        "**Samples per class**",
        png_markdown(bar_chart_png(report.class_sizes, "classes by number of samples", "samples per class"),
                     "class sizes"),
        "**Source short side**",
        png_markdown(bar_chart_png(report.image_sizes, "samples by source short side", "short side (px)"),
                     "image sizes"),
    ])
    ratio = t["shard_bytes"] / t["source_bytes"] if t.get("source_bytes") else 0.0
    return {
        **{k: MetadataValue.int(int(v)) for k, v in t.items() if v is not None},
        "compression_ratio": MetadataValue.float(round(float(ratio), 4)),
        "missing_shards": MetadataValue.int(len(report.missing)),
        "stale_shards": MetadataValue.int(len(report.stale)),
        "exclusion_reasons": table(report.reasons, REASONS_SCHEMA),
        "per_shard": table(report.per_shard, PER_SHARD_SCHEMA),
        "distributions": MetadataValue.md(charts),
        "class_sizes": MetadataValue.json([[int(a), int(b)] for a, b in report.class_sizes]),
        "image_short_sides": MetadataValue.json([[int(a), int(b)] for a, b in report.image_sizes]),
    }


def make(settings: Settings):
    @asset(
        name="shard_audit",
        group_name=GROUP,
        deps=["wds_shards"],
        code_version="1",
        check_specs=shard_audit_checks,
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
                result(AUDIT_RECONCILED, "shard_audit", report.problems,
                       **{k: int(v) for k, v in report.reconcile.items() if isinstance(v, int)}),
                result(AUDIT_INFO, "shard_audit", info_problems),
            ],
        )

    return shard_audit
