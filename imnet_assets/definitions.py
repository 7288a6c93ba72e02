"""Assembles the Dagster definitions: six assets, their checks, the schedule and the two sensors."""

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
from imnet_assets.settings import Settings


def build_definitions(settings: Settings) -> Definitions:
    shards, _partitions = wds_shards.make(settings)
    topup, audit_sensor = make_schedules(settings)
    return Definitions(
        assets=[
            raw_tars.make(settings),
            synset_manifest.make(settings),
            filtered_index.make(settings),
            shuffled_plan.make(settings),
            shards,
            shard_audit.make(settings),
        ],
        schedules=[topup],
        sensors=[audit_sensor, make_shard_sensor(settings)],
        # Each run is one stage or one shard: in-process keeps a shard run's start-up small; the
        # parallelism is inside the shard (IMNET_WORKERS) and across runs (the run queue).
        executor=in_process_executor,
    )


settings = Settings.from_env()
defs = build_definitions(settings)
