from dagster import AssetExecutionContext, DataVersion, MaterializeResult, asset

from imnet_assets.defs.assets.common import logger
from imnet_assets.defs.release_keys import asset_key, group, key_prefix
from imnet_assets.release.plan import PLAN_VERSION, read_index
from imnet_assets.settings import Settings
from imnet_assets.stages.shuffled_plan import build_shuffled_plan


def make(settings: Settings, marker_roots: list[str] | None = None):
    """`marker_roots`: as filtered_index's (the plan's fingerprint holds the index's input)."""

    holdout = ",".join(f"{n}:{c}" for n, c in settings.holdout) or "none"

    @asset(
        name="shuffled_plan",
        key_prefix=key_prefix(settings),
        group_name=group(settings),
        deps=[asset_key(settings, "filtered_index")],
        code_version=f"{PLAN_VERSION}-seed{settings.seed}-shards{settings.num_shards}-holdout:{holdout}",
        description=(
            "Seeded, reproducible global shuffle of the kept images into IMNET_NUM_SHARDS shards whose "
            "sizes differ by at most one (catalog table `plan`). Publishes one slice file per shard "
            "under `<out root>/_plan/`, which is all a shard run reads."
        ),
    )
    def shuffled_plan(context: AssetExecutionContext) -> MaterializeResult:
        facts = build_shuffled_plan(settings, context.run.run_id, logger(context), marker_roots=marker_roots)
        index = read_index(settings.out_root) or {}
        return MaterializeResult(
            metadata={k: v for k, v in facts.items() if v is not None},
            data_version=DataVersion(index.get("fingerprint", "")[:16]),
        )

    return shuffled_plan
