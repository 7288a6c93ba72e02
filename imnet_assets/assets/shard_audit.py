from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, TableRecord, asset

from ..checks import AUDIT_INFO, AUDIT_RECONCILED, result, shard_audit_checks
from ..core.audit import bar_chart_png, check_info, png_markdown, run_audit
from ..settings import Settings
from .common import GROUP, logger


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
        report = run_audit(settings, context.run_id, logger(context))
        info_problems = check_info(settings) if report.info_written else ["_info.json not written: " + (
            f"{len(report.missing)} shards missing, {len(report.stale)} stale")]
        t = report.totals
        shards_table = MetadataValue.table([
            TableRecord({k: (v if v is not None else "") for k, v in row.items() if k != "path"})
            for row in report.per_shard[:1024]
        ])
        reasons = MetadataValue.table([TableRecord(r) for r in report.reasons])
        charts = "\n\n".join([
            png_markdown(bar_chart_png(report.class_sizes, "classes by number of samples", "samples per class"),
                         "class sizes"),
            png_markdown(bar_chart_png(report.image_sizes, "samples by source short side", "short side (px)"),
                         "image sizes"),
        ])
        return MaterializeResult(
            metadata={
                **{k: MetadataValue.int(int(v)) for k, v in t.items() if v is not None},
                "compression_ratio": round(t["shard_bytes"] / t["source_bytes"], 4) if t.get("source_bytes") else 0,
                "missing_shards": len(report.missing),
                "stale_shards": len(report.stale),
                "exclusion_reasons": reasons,
                "per_shard": shards_table,
                "distributions": MetadataValue.md(charts),
                "class_sizes": MetadataValue.json([[int(a), int(b)] for a, b in report.class_sizes]),
                "image_short_sides": MetadataValue.json([[int(a), int(b)] for a, b in report.image_sizes]),
            },
            check_results=[
                result(AUDIT_RECONCILED, "shard_audit", report.problems,
                       **{k: int(v) for k, v in report.reconcile.items() if isinstance(v, int)}),
                result(AUDIT_INFO, "shard_audit", info_problems),
            ],
        )

    return shard_audit
