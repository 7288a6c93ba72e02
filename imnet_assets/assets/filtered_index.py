from dagster import AssetExecutionContext, MaterializeResult, TableColumn, TableSchema, asset

from ..core.stages import INDEX_VERSION, build_filtered_index
from ..settings import Settings
from .common import GROUP, logger, table

REASONS_SCHEMA = TableSchema(columns=[TableColumn("reason", "string"), TableColumn("images", "int")])


def make(settings: Settings):
    @asset(
        name="filtered_index",
        group_name=GROUP,
        deps=["synset_manifest"],
        code_version=INDEX_VERSION,
        description=(
            "One row per raw member (catalog table `images`): key, synset, tar, data offset and size, "
            "sha256, width/height/format/mode from the image header, and status with reason. Images "
            "under 32 px and undecodable files are excluded with their reason; truncated ones are "
            "kept and marked for repair. One sequential pass per tar, tars in parallel; unchanged "
            "tars are not rescanned."
        ),
    )
    def filtered_index(context: AssetExecutionContext) -> MaterializeResult:
        facts = build_filtered_index(settings, context.run.run_id, logger(context))
        reasons = facts.pop("reasons")
        return MaterializeResult(
            metadata={
                **{k: v for k, v in facts.items() if v is not None},
                "exclusion_reasons": table([{"reason": r, "images": int(n)} for r, n in reasons], REASONS_SCHEMA),
            }
        )

    return filtered_index
