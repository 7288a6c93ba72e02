"""How a release is named in Dagster (issue 25: a release is a Settings).

The shared stages (raw_tars, synset_manifest, filtered_index) keep their plain keys in the group
`imagenet_w21`. Each release's own assets (shuffled_plan, wds_shards, shard_audit) have the
release's name as their key prefix and group, and its schedule and sensors the name as a prefix:
`in12k/wds_shards`, group `in12k`, schedule `in12k_wds_shards_topup`. The default release
(IMNET_RELEASES unset, `release == ""`) keeps today's plain keys, group and names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imnet_assets.settings import Settings

if TYPE_CHECKING:
    from dagster import AssetKey

SHARED_GROUP = "imagenet_w21"
SHARED_STAGES = ("raw_tars", "synset_manifest", "filtered_index")
RELEASE_STAGES = ("shuffled_plan", "wds_shards", "shard_audit")
RELEASE_TAG = "imnet/release"  # on every run of a release's assets: which release it belongs to


def key_prefix(settings: Settings) -> list[str]:
    return [settings.release] if settings.release else []


def asset_key(settings: Settings, stage: str) -> AssetKey:
    """The key of `stage` for this release (shared stages: the one plain key)."""
    # Dagster is imported here, not above: `imnet` (cli -> orchestrate.build -> this module) and
    # its forkserver, which imports the main script's modules for every worker, start without it
    # (0.5 s of CPU each); `imnet build` imports it beside its first look (orchestrate/build.py).
    from dagster import AssetKey

    if stage in SHARED_STAGES:
        return AssetKey(stage)
    return AssetKey([*key_prefix(settings), stage])


def group(settings: Settings) -> str:
    return settings.release or SHARED_GROUP


def name(settings: Settings, base: str) -> str:
    """A schedule's or sensor's name for this release."""
    return f"{settings.release}_{base}" if settings.release else base


def label(settings: Settings) -> str:
    """How output lines name the release: `in12k: ` (nothing for the default release)."""
    return f"{settings.release}: " if settings.release else ""
