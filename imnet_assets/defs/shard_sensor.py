"""The `wds_shards_on_storage` sensor: what `imnet status` says of each shard partition, in Dagster.

Dagster colours a partition from its runs alone: green once materialized, red when its last run
failed. A shard whose tar then changed on storage, or went, stays green there while `imnet status`
says stale or missing. Each tick this sensor judges every partition as `imnet status` does
(`schedules.shard_partition_status`: two listings and one batch of small reads, whatever the shard
count) and, for each partition Dagster has materialized whose verdict changed since the last tick,
tells Dagster through its own means (Dagster 1.13):

- the partitioned check `shard_holds_its_plan` fails for that partition (passes again when the
  shard is fresh again without a rebuild). The check's Partitions view shows the shard in red by
  key, the asset's overview counts the failed check, and GraphQL (`assetCheckExecutions`, the
  check's `partitionStatuses`) says it.
- an observation of that partition, with the verdict as metadata and a new data version (the
  materialized one no longer describes what is stored): the partition's page shows
  `imnet_status: stale` above its materialization's metadata, and `shard_audit`, computed from the
  old bytes, shows as unsynced.
- the audit's `nothing_lost_or_duplicated` check ("every shard present and fresh") fails, naming
  the shards, and passes again once they are all fresh.

Why not the other means: `report_runless_asset_event` takes materializations, observations and
check evaluations but no failed materialization (the red of the asset's Partitions tab comes only
from a failed run, and a run that fails on purpose would count as a failed build for the top-up's
backoff), and a partition's own "stale" status follows only its code version and its upstream
data versions, never a change of its own stored bytes. A failed partitioned check is what Dagster
has for "this partition's data is not right now".

Partitions that never materialized are left to Dagster's grey "missing"; failed, retrying,
backed-off and in-flight partitions are already shown by their runs. Observations and the audit's
check go out in the tick's SensorResult (the daemon records them with the cursor); the shard
check's verdict is recorded at once (see `report_check_of_run`). The tick's skip reason says the
counts and what was reported, so the sensor's ticks read like `imnet status`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetKey,
    AssetObservation,
    AssetRecordsFilter,
    DagsterEventType,
    DefaultSensorStatus,
    MetadataValue,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,  # not exported by `dagster` in 1.13
)
from dagster._core.events import DagsterEvent

from imnet_assets.defs.checks import AUDIT_RECONCILED, SHARD_COMPLETE
from imnet_assets.defs.release_keys import asset_key, name
from imnet_assets.defs.schedules import SHARDS, shard_partition_status
from imnet_assets.release.plan import read_index
from imnet_assets.settings import Settings
from imnet_assets.stages.audit import plan_mismatch

SENSOR_NAME = "wds_shards_on_storage"
DATA_VERSION_TAG = "dagster/data_version"  # where an observation carries its data version (DataVersion)
AUDIT = AssetKey("shard_audit")
REPORTED = {
    "stale": "stale: its tar changed on storage since its commit, or it was written from another plan "
             "or settings (`imnet status` says stale; the top-up schedule or `imnet build` rebuilds it)",
    "missing": "missing: its tar or commit record is gone from storage (`imnet status` says missing; the "
               "top-up schedule or `imnet build` rebuilds it)",
}
FRESH_AGAIN = "fresh again: the committed tar is on storage as committed (`imnet status` says fresh)"
SHOWN = 16  # partition keys named in a skip reason


def verdict_events(key: str, state: str, now: float,
                   target: AssetCheckEvaluationTargetMaterializationData | None = None,
                   materialized_version: str | None = None, shards: AssetKey = SHARDS) -> list:
    """The check evaluation and the observation that tell Dagster partition `key` is `state`.
    `target`: the partition's latest materialization, which the evaluation judges (Dagster shows
    a check's partition status only from an evaluation of its current materialization);
    `materialized_version`: its data version, which a shard fresh again has again."""
    failed = state in REPORTED
    why = REPORTED.get(state, FRESH_AGAIN)
    metadata = {"imnet_status": MetadataValue.text(state), "shard": MetadataValue.text(key)}
    check = AssetCheckEvaluation(
        asset_key=shards, check_name=SHARD_COMPLETE, passed=not failed, partition=key,
        severity=AssetCheckSeverity.ERROR, description=f"shard {key} {why}", metadata=metadata,
        target_materialization_data=target,
    )
    # The partition's page shows the metadata of observations newer than its materialization above
    # the materialization's: so a shard fresh again is observed too. A new data version while the
    # stored bytes are not the materialized ones; the materialized one again once they are.
    version = f"{state}@{int(now)}" if failed else materialized_version
    return [check, AssetObservation(asset_key=shards, partition=key, description=f"shard {key} {why}",
                                    metadata=metadata, tags={DATA_VERSION_TAG: version} if version else {})]


def _targets(instance, storage_ids: list[int], shards: AssetKey = SHARDS) -> dict[int, tuple[AssetCheckEvaluationTargetMaterializationData,
                                                                   str | None]]:
    """Storage id -> (what an evaluation of that materialization points at, its data version), in
    one query."""
    if not storage_ids:
        return {}
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=shards, storage_ids=storage_ids),
                                              limit=len(storage_ids)).records
    out = {}
    for r in records:
        mat = r.asset_materialization
        out[r.storage_id] = (
            AssetCheckEvaluationTargetMaterializationData(storage_id=r.storage_id, run_id=r.run_id,
                                                          timestamp=r.timestamp),
            (mat.tags or {}).get(DATA_VERSION_TAG) if mat is not None else None,
        )
    return out


def audit_events(instance, before: dict[str, str], now: dict[str, str], audit: AssetKey = AUDIT) -> list:
    """The audit's reconciliation check says "every shard present and fresh": when the shards that are
    not (of those materialized) change after an audit, it fails, naming them, until they are fresh
    again (a rebuild then gets audited anew: the audit sensor asks for it)."""
    if before == now or instance is None:
        return []
    latest = instance.fetch_materializations(AssetRecordsFilter(asset_key=audit), limit=1).records
    if not latest:
        return []
    target = AssetCheckEvaluationTargetMaterializationData(
        storage_id=latest[0].storage_id, run_id=latest[0].run_id, timestamp=latest[0].timestamp)
    if not now:
        return [AssetCheckEvaluation(asset_key=audit, check_name=AUDIT_RECONCILED, passed=True,
                                     severity=AssetCheckSeverity.ERROR, target_materialization_data=target,
                                     description="every shard is fresh again (`imnet status`)")]
    named = ", ".join(f"{k} {v}" for k, v in list(now.items())[:SHOWN]) + (" ..." if len(now) > SHOWN else "")
    return [AssetCheckEvaluation(
        asset_key=audit, check_name=AUDIT_RECONCILED, passed=False, severity=AssetCheckSeverity.ERROR,
        description=f"since this audit, {len(now)} shards are no longer fresh (`imnet status`): {named}",
        metadata={"not_fresh_shards": MetadataValue.int(len(now)),
                  **{f"shard {k}": MetadataValue.text(v) for k, v in list(now.items())[:SHOWN]}},
        target_materialization_data=target,
    )]


def report_check_of_run(instance, evaluation: AssetCheckEvaluation, run_id: str) -> None:
    """Record `evaluation` as the shard check's result in the run that materialized the partition.

    Dagster 1.13 stores a run's check result in one row per (check, run, partition); a runless
    result (`report_runless_asset_event`, or a SensorResult's asset_events) takes run id "", so a
    second runless result for the same partition (stale again after a rebuild, or fresh again)
    breaks that row's uniqueness and fails the tick. Judged here is what that run wrote (the
    evaluation targets its materialization), so the verdict goes in as that run's check result:
    the row is updated in place (its status, the evaluation shown, the partition's check status)
    and the UI links the verdict to the run that built the shard. Reported at once, so a repeated
    tick (or a "Test sensor" dry run) only writes the same verdict again."""
    run = instance.get_run_by_id(run_id)
    event = DagsterEvent(
        event_type_value=DagsterEventType.ASSET_CHECK_EVALUATION.value,
        job_name=run.job_name if run is not None else "__RUNLESS_JOB__",
        event_specific_data=evaluation,
        message=evaluation.description,
    )
    instance.report_dagster_event(event, run_id=run_id,
                                  log_level=logging.INFO if evaluation.passed else logging.ERROR)


def evaluate(settings: Settings, instance, cursor: str | None, now: float | None = None) -> SensorResult:
    """One tick: the events for every partition whose verdict changed, the new cursor (partition key ->
    the not-fresh verdict last reported) and a skip reason with the counts."""
    now = time.time() if now is None else now
    shards = asset_key(settings, "wds_shards")
    if read_index(settings.out_root) is None:
        return SensorResult(skip_reason=SkipReason(
            "no shuffled plan under the out root yet: materialize the upstream stages first"), cursor=cursor)
    status = shard_partition_status(settings, instance, now=now)
    # partition key -> its latest materialization's storage id (one query)
    materialized = (instance.event_log_storage.get_latest_storage_id_by_partition(
        shards, DagsterEventType.ASSET_MATERIALIZATION) if instance is not None else {})
    reported: dict[str, str] = json.loads(cursor) if cursor else {}
    changes, now_reported = {}, {}
    for key, state in status.items():
        if state in REPORTED and key in materialized:
            now_reported[key] = state
            if reported.get(key) != state:
                changes[key] = state
        elif state == "fresh" and key in reported:
            changes[key] = state
        elif key in reported and state not in ("fresh", *REPORTED):
            now_reported[key] = reported[key]  # in flight or failed: its runs speak; keep what was said
    targets = _targets(instance, [materialized[k] for k in changes if k in materialized], shards)
    events, changed = [], []
    for key, state in changes.items():
        target, version = targets.get(materialized.get(key), (None, None))
        for event in verdict_events(key, state, now, target, version, shards):
            if isinstance(event, AssetCheckEvaluation) and target is not None and target.run_id:
                report_check_of_run(instance, event, target.run_id)
            else:
                events.append(event)
        changed.append(f"{key} {state if state != 'fresh' else 'fresh again'}")
    counts = Counter(status.values())
    summary = f"{len(status)} shards: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    not_fresh = [k for k, v in status.items() if v != "fresh"]
    if not_fresh:
        summary += " (not fresh: " + ", ".join(not_fresh[:SHOWN]) + (" ..." if len(not_fresh) > SHOWN else "") + ")"
    if why := plan_mismatch(settings, read_index(settings.out_root)):
        summary += f"; {why}"
    events += audit_events(instance, reported, now_reported, asset_key(settings, "shard_audit"))
    if changed:
        summary += "; reported to Dagster now: " + ", ".join(changed[:SHOWN]) + (" ..." if len(changed) > SHOWN else "")
    else:
        summary += "; no change since the last tick"
    return SensorResult(skip_reason=SkipReason(summary), cursor=json.dumps(now_reported, sort_keys=True),
                        asset_events=events)


def make(settings: Settings):
    """This release's sensor (one per release: each judges its own out root and reports on its own
    wds_shards; a sensor that fails for one release's storage leaves the others' reports going)."""
    @sensor(
        name=name(settings, SENSOR_NAME),
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            "Shows what `imnet status` says of each wds_shards partition: a shard whose tar changed on "
            "storage or went fails its partition of the shard_holds_its_plan check (and gets an "
            "observation saying why) within one tick. Requests no runs: the top-up schedule does."
        ),
    )
    def wds_shards_on_storage(context: SensorEvaluationContext):
        return evaluate(settings, context.instance, context.cursor)

    return wds_shards_on_storage
