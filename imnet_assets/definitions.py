"""Assembles the Dagster definitions: the three shared stages once, then per release (IMNET_RELEASES;
unset: the one default release, with today's plain keys) its plan, shards, audit and checks in a
group of its own, its top-up schedule and its two sensors."""

from dagster import Definitions, in_process_executor

from imnet_assets.defs.assets import (
    filtered_index,
    raw_tars,
    shard_audit,
    shuffled_plan,
    synset_manifest,
    wds_shards,
)
from imnet_assets.defs.schedules import make as make_schedules
from imnet_assets.defs.shard_sensor import make as make_shard_sensor
from imnet_assets.release import releases as release_file
from imnet_assets.settings import Settings
from imnet_assets.stages.staged_encodes import staging_plan


def release_assets(settings: Settings, marker_roots: list[str]) -> list:
    """One release's assets, keyed by its name (defs/release_keys.py)."""
    shards, _partitions = wds_shards.make(settings)
    return [shuffled_plan.make(settings, marker_roots), shards, shard_audit.make(settings)]


def build_definitions(settings: Settings, releases: list[Settings] | None = None) -> Definitions:
    """`settings`: the base (the shared stages read its raw root and catalog); `releases`: one
    Settings per release (default: `settings` alone, the default release)."""
    releases = [settings] if releases is None else releases
    # every release's shard runs leave their markers of changed sources under its own out root: the
    # shared index answers for all of them
    marker_roots = [r.out_root for r in releases]
    assets = [raw_tars.make(settings), synset_manifest.make(settings), filtered_index.make(settings, marker_roots, staging_plan(releases))]
    schedules, sensors = [], []
    for release in releases:
        assets += release_assets(release, marker_roots)
        topup, audit_sensor = make_schedules(release)
        schedules.append(topup)
        sensors += [audit_sensor, make_shard_sensor(release)]
    return Definitions(
        assets=assets,
        schedules=schedules,
        sensors=sensors,
        # Each run is one stage or one shard: in-process keeps a shard run's start-up small; the
        # parallelism is inside the shard (IMNET_WORKERS) and across runs (the run queue).
        executor=in_process_executor,
    )


settings = Settings.from_env()
releases = release_file.from_env()
defs = build_definitions(settings, releases)
