"""The blocking asset checks: declared here, evaluated inside the asset that they guard."""

import warnings

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    PartitionsDefinition,
    PreviewWarning,
)

SHARD_COMPLETE = "shard_holds_its_plan"
AUDIT_RECONCILED = "nothing_lost_or_duplicated"
AUDIT_INFO = "info_json_agrees"



def wds_shards_checks(partitions: PartitionsDefinition, asset: AssetKey | str = "wds_shards") -> list[AssetCheckSpec]:
    """The shard check, partitioned like wds_shards: each result (the shard run's, and the one the
    `wds_shards_on_storage` sensor reports when a committed tar changes or goes) carries its
    partition key, so the check's Partitions view names the shard that failed it, 1 of 1,024."""
    with warnings.catch_warnings():  # "preview" in Dagster 1.13: the UI and GraphQL support it
        warnings.simplefilter("ignore", PreviewWarning)
        return [
            AssetCheckSpec(
                SHARD_COMPLETE,
                asset=asset,
                blocking=True,
                partitions_def=partitions,
                description=(
                    "The committed shard holds exactly its planned samples (minus exclusions recorded "
                    "with a reason), in plan order, each with .cls/.json/.webp (.jpg in a JPEG release); every image is the "
                    "encoder's output (sha256) with a header of the recorded size, and every "
                    "IMNET_CHECK_DECODE_EVERY-th one (default 16th) and every repaired one decodes in "
                    "full. Failed again, for that partition, by the wds_shards_on_storage sensor when "
                    "the committed tar changes on storage or goes (what `imnet status` calls stale "
                    "or missing)."
                ),
            )
        ]

def shard_audit_checks(asset: AssetKey | str = "shard_audit") -> list[AssetCheckSpec]:
    return [
        AssetCheckSpec(
            AUDIT_RECONCILED,
            asset=asset,
            blocking=True,
            description="Every planned image is in its shard or recorded as excluded: none lost, duplicated, "
            "misplaced or unplanned; every shard present and fresh; no file beside them named like a shard "
            "that is not one (left by a build with more shards).",
        ),
        AssetCheckSpec(
            AUDIT_INFO,
            asset=asset,
            blocking=True,
            description="`_info.json` is exactly the document the shards' manifests give: every shard once, "
            "in order, in its split, with the sample count it holds, and each split's total.",
        ),
    ]


def result(name: str, asset: AssetKey | str, problems: list[str], **metadata) -> AssetCheckResult:
    return AssetCheckResult(
        check_name=name,
        asset_key=asset,
        passed=not problems,
        severity=AssetCheckSeverity.ERROR,
        description="; ".join(problems[:20]) if problems else "ok",
        metadata={"problems": len(problems), **metadata},
    )
