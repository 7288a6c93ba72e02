from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from imnet_assets.defs.assets.common import GROUP, logger
from imnet_assets.settings import Settings
from imnet_assets.stages.raw_tars import build_raw_tars


def make(settings: Settings):
    @asset(
        name="raw_tars",
        group_name=GROUP,
        code_version="1",
        description=(
            "Inventory of the per-synset raw tars `<wnid>.tar` (or per-synset folders `<wnid>/` of "
            "extracted files, read in place) under IMNET_RAW_ROOT (local folder or s3:// prefix): size "
            "and member count of each. Unpacks `winter21_whole.tar.gz` first when that is all the root "
            "holds. Member counts are reused for unchanged tars and folders."
        ),
    )
    def raw_tars(context: AssetExecutionContext) -> MaterializeResult:
        facts = build_raw_tars(settings, context.run.run_id, logger(context))
        return MaterializeResult(
            metadata={
                "tars": facts["tars"],
                "bytes": MetadataValue.int(int(facts["bytes"])),
                "members": MetadataValue.int(int(facts["members"])),
                "ignored_files": facts["ignored_files"],
                "layout": MetadataValue.text(facts["layout"]),
                "raw_root": MetadataValue.text(settings.raw_root),
            },
            data_version=None,
        )

    return raw_tars
