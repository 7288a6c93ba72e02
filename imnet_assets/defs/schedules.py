"""The shard top-up schedule and the audit sensor.

The schedule asks for runs only for shard partitions that are missing, failed or stale (judged
from what sits in the out root against the current plan and settings), at most
IMNET_SCHEDULE_MAX_RUNS per tick, skipping partitions that already have a run queued or running,
a failed run that Dagster's run retries are about to launch again, or a run building them now
whatever launched it (its lease under `<out root>/_locks/` is held: one listing of that folder).
The sensor requests `shard_audit` once every shard is in and fresh, once per change of the shards
(or of stray shard files beside them), unless the audit's record in the catalog already matches the
shards as they are (`imnet build` audited them: the rule `imnet status` calls "fresh").
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRecord,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SkipReason,
    schedule,
    sensor,
)

from imnet_assets.defs.release_keys import RELEASE_TAG, asset_key, name
from imnet_assets.release.freshness import shard_states
from imnet_assets.release.lease import describe, held_shard_leases
from imnet_assets.release.plan import read_index
from imnet_assets.runtime.host import pid_alive, pid_namespace
from imnet_assets.settings import Settings
from imnet_assets.stages.audit import expected_shard_fingerprints, plan_mismatch
from imnet_assets.stages.audit_due import audit_recorded_fresh, looked_at_shards

IN_FLIGHT = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]
PARTITION_TAG = "dagster/partition"
WILL_RETRY_TAG = "dagster/will_retry"  # set by the instance on a failed run: "true" when run_retries will relaunch it
MAX_RETRIES_TAG = "dagster/max_retries"  # a run's own bound on run_retries (dagster.yaml's max_retries otherwise)
HOST_TAG = "imnet/host"  # where the run's worker process runs (set by `imnet build` and by wds_shards)
PID_NAMESPACE_TAG = "imnet/pid-namespace"  # and in which process numbers (see worker_place)
BUILD_PID_TAG = "imnet/build-pid"  # the `imnet build` process that created the run, to execute it itself
LAUNCHED_BY_TAG = "imnet/launched_by"  # BY_IMNET_BUILD on the runs `imnet build` creates (build_run_tags)
BY_IMNET_BUILD = "imnet build"
# A run an `imnet build` made before its runs carried BUILD_PID_TAG, still not started after this
# long, lost its build: a build starts each run it makes within a second.
UNTAGGED_NOT_STARTED_SECONDS = 600
# Statuses in which a run whose process is gone stays forever (nothing else will end it), and how
# fail_dead_runs ends it: (its end: failed, or canceled as the user asked; when it was left, in the
# reason; the log line's end). A failed one is never retried (MAX_RETRIES_TAG 0): see fail_dead_runs.
_NEVER_STARTED = ("failed", " before the run started",
                  "lost the build that made it before it started; marked failed")
DEAD_RUN_ENDS = {
    DagsterRunStatus.NOT_STARTED: _NEVER_STARTED,
    DagsterRunStatus.STARTING: _NEVER_STARTED,
    DagsterRunStatus.STARTED: ("failed", "", "had lost its process (killed?); marked failed"),
    DagsterRunStatus.CANCELING: ("canceled", " while canceling",
                                 "was being canceled and lost its process; marked canceled"),
}
WORKER_LOOKED_AT = tuple(DEAD_RUN_ENDS)
SHARDS = AssetKey("wds_shards")  # the default release's (IMNET_RELEASES unset); a release's: asset_key()


def _targets_shards(run, settings: Settings | None = None) -> bool:
    """Whether a partitioned run materializes this release's wds_shards (any release's: None).

    Runs launched from the UI, a backfill or this schedule carry an asset selection; runs of
    `imnet build` (in-process `materialize`, an ephemeral job) carry none. wds_shards is the only
    partitioned asset, so a partitioned run without a selection is a shard run: of the release
    its RELEASE_TAG names (`imnet build` and the asset itself set it; none: the default release),
    since every release's partition keys are 0000, 0001, ...
    """
    if settings is None:
        return not run.asset_selection or any(k.path[-1] == "wds_shards" for k in run.asset_selection)
    if run.asset_selection:
        return asset_key(settings, "wds_shards") in run.asset_selection
    return run.tags.get(RELEASE_TAG, "") == settings.release


def _shard_runs(instance: DagsterInstance, statuses, limit: int | None = None,
                settings: Settings | None = None) -> Iterator[tuple[str, RunRecord]]:
    """(partition key, run record) of the runs in these statuses that target this release's
    wds_shards (any release's: None), newest first."""
    for rec in instance.get_run_records(RunsFilter(statuses=statuses), limit=limit):
        key = rec.dagster_run.tags.get(PARTITION_TAG)
        if key and _targets_shards(rec.dagster_run, settings):
            yield key, rec


def _partitions_of(instance: DagsterInstance, statuses, settings: Settings, limit: int | None = None,
                   skip=lambda _rec: False) -> dict[str, RunRecord]:
    """Partition key -> the newest run record in these statuses that targets this release's wds_shards."""
    out: dict[str, RunRecord] = {}
    for key, rec in _shard_runs(instance, statuses, limit, settings):
        if not skip(rec):
            out.setdefault(key, rec)
    return out


RETRY_GRACE_SECONDS = 600  # how long a failed run that Dagster will retry is left to that retry


def _retry_pending(rec: RunRecord | None) -> bool:
    """Whether Dagster's run retries (dagster.yaml `run_retries`) will launch this failed run again:
    the instance tagged it so when it failed, and the daemon can load its job (a run the daemon, the
    UI or a schedule launched has its job's origin; a run of `imnet build`, executed in that process,
    has none: the instance tags it "will retry" all the same, and the daemon only logs "Run does not
    have an external job origin, unable to retry the run"). Bounded in time: if no retry shows up
    (no daemon running the retries), the partition counts as failed again and is requested."""
    return (rec is not None and rec.dagster_run.tags.get(WILL_RETRY_TAG) == "true"
            and rec.dagster_run.remote_job_origin is not None
            and rec.end_time is not None and time.time() - rec.end_time < RETRY_GRACE_SECONDS)


def worker_place() -> dict[str, str]:
    """The tags that say where this process runs: the host's name and, where /proc shows it, its
    pid namespace. Containers on the host's network share the host's name but not its process
    numbers: a run in one of them must not be judged by whether its worker's number is alive here."""
    namespace = pid_namespace()
    return {HOST_TAG: socket.gethostname(), **({PID_NAMESPACE_TAG: namespace} if namespace else {})}


def build_run_tags() -> dict[str, str]:
    """The tags of a run that `imnet build` creates and then executes in its own process."""
    return {LAUNCHED_BY_TAG: BY_IMNET_BUILD, **worker_place(), BUILD_PID_TAG: str(os.getpid())}


def run_worker_gone(instance: DagsterInstance, record: RunRecord) -> bool:
    """Whether a run the instance still has as started (or about to start) lost its run worker: a
    process of this host and pid namespace (worker_place) that is no longer running (kill -9, the
    OOM killer, a machine that rebooted). Such a run would stay "started" forever, since the worker
    writes a run's end; the default run launcher cannot tell Dagster's run monitoring about it.
    A run with no start yet is looked at only when `imnet build` made it (BUILD_PID_TAG): that
    process executes it, so once it is gone (killed between the run's creation and its start) the
    run never starts, and would hold its partition "in flight" for every later build. Runs of other
    hosts (or namespaces), and runs the daemon or the UI launch, are left to Dagster."""
    run = record.dagster_run
    if run.status not in WORKER_LOOKED_AT:
        return False
    here = worker_place()
    if run.tags.get(HOST_TAG) != here[HOST_TAG]:
        return False
    namespace = run.tags.get(PID_NAMESPACE_TAG)  # absent on runs tagged before it was recorded
    if namespace is not None and namespace != here.get(PID_NAMESPACE_TAG):
        return False  # a container on this host's network: its process numbers are not ours
    records = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.RUN_START, limit=1).records
    if not records:
        created = record.create_timestamp.timestamp()
        creator = run.tags.get(BUILD_PID_TAG)
        if creator is None:  # made by an `imnet build` of before BUILD_PID_TAG: its age says
            return (run.tags.get(LAUNCHED_BY_TAG) == BY_IMNET_BUILD
                    and time.time() - created > UNTAGGED_NOT_STARTED_SECONDS)
        return creator.isdigit() and not pid_alive(int(creator), started_by=created)
    entry = records[0].event_log_entry
    pid = entry.dagster_event.pid if entry.dagster_event else None
    return pid is not None and not pid_alive(pid, started_by=entry.timestamp)


def fail_dead_runs(instance: DagsterInstance, log=lambda _m: None) -> list[str]:
    """Mark started (or never started) runs whose worker is gone (`run_worker_gone`) as failed:
    shard runs, so their partitions count as failed and are built again, and the catalog stages'
    and the audit's runs of a killed `imnet build`, which the UI would show running forever.
    Returns the shard runs' partition keys.

    Failed, and never retried by Dagster's run retries (their MAX_RETRIES_TAG is set to 0 before the
    failure is reported, so the instance tags them will_retry false and the daemon leaves them):
    whoever finds them dead builds their partitions again itself (`imnet build` at once, the
    schedule as failed partitions), and a retry the daemon launched later would be a second writer
    of a shard already rewritten (and of a run of `imnet build`, the daemon cannot load the job)."""
    dead = []
    for rec in instance.get_run_records(RunsFilter(statuses=list(WORKER_LOOKED_AT))):
        if not run_worker_gone(instance, rec):
            continue
        # Its worker is gone, so its status can no longer change: read it again, in case the run
        # ended (and its worker exited) between the listing above and the look at its process.
        run = instance.get_run_by_id(rec.dagster_run.run_id)
        key = run.tags.get(PARTITION_TAG) if _targets_shards(run) else None
        what = f"shard {key}: run {run.run_id[:8]}" if key else f"run {run.run_id[:8]} (no shard)"
        if run.status not in DEAD_RUN_ENDS:  # it ended meanwhile
            continue
        end, when, said = DEAD_RUN_ENDS[run.status]
        why = f"run worker process on {run.tags.get(HOST_TAG)} is gone (killed?){when}"
        if end == "failed":
            instance.add_run_tags(run.run_id, {MAX_RETRIES_TAG: "0"})
            redone = "; not retried: its shard is built again by imnet build or the top-up schedule" if key else ""
            instance.report_run_failed(run, f"{why}: marked failed by imnet{redone}")
        else:  # what the user asked for: not to be retried
            instance.report_run_canceled(run, f"{why}: marked canceled by imnet")
        log(f"{what} {said}")
        if key:
            dead.append(key)
    return dead


# A partition whose last BACKOFF_AFTER runs all failed is not requested again until
# BACKOFF_SECONDS * 2**(failures - BACKOFF_AFTER) (at most BACKOFF_MAX_SECONDS) after the last one
# ended: a shard that fails for good (a source that crashes the encoder's process, a bucket it may
# not write) would otherwise take a run every tick, forever. `imnet build` still builds it.
BACKOFF_AFTER = 3
BACKOFF_SECONDS = 1800
BACKOFF_MAX_SECONDS = 6 * 3600
RUN_HISTORY_LIMIT = 10000  # newest shard runs read (one query) to find each partition's failures in a row


@dataclass(frozen=True)
class FailureStreak:
    """A partition's failed runs since its last successful one (newest first)."""

    latest: RunRecord
    count: int

    def backoff_until(self) -> float | None:
        """Unix time before which the partition is not requested again, or None (no backoff)."""
        if self.count < BACKOFF_AFTER or self.latest.end_time is None:
            return None
        wait = min(BACKOFF_SECONDS * 2 ** (self.count - BACKOFF_AFTER), BACKOFF_MAX_SECONDS)
        return self.latest.end_time + wait


def _failure_streaks(instance: DagsterInstance, settings: Settings) -> dict[str, FailureStreak]:
    """Partition key -> its failures in a row, from one query of the newest ended shard runs."""
    streaks: dict[str, FailureStreak] = {}
    done: set[str] = set()
    ended = [DagsterRunStatus.FAILURE, DagsterRunStatus.SUCCESS]
    for key, rec in _shard_runs(instance, ended, limit=RUN_HISTORY_LIMIT, settings=settings):
        if key in done:
            continue
        if rec.dagster_run.status == DagsterRunStatus.SUCCESS:
            done.add(key)
            continue
        streak = streaks.get(key)
        streaks[key] = FailureStreak(rec, 1) if streak is None else FailureStreak(streak.latest, streak.count + 1)
    return streaks


def shard_partition_status(settings: Settings, instance: DagsterInstance | None,
                           now: float | None = None, read_streaks: bool = True) -> dict[str, str]:
    """Every partition's status: fresh, missing, stale, failed, retrying (failed, and Dagster's run
    retries will launch it again: the schedule leaves it to them), backoff (failed BACKOFF_AFTER
    or more times in a row, the last one too recently: see FailureStreak), or in_flight (a run
    queued or running; not one whose worker is gone, see `run_worker_gone`).

    Two listings of the out root, one concurrent batch of commit-record reads (release.freshness) and
    two queries of the instance, whatever the number of shards. Without `read_streaks` (`imnet build`,
    which builds every partition that is not fresh and leaves alone only those in flight), the
    failures in a row are not read: one query (the second reads up to RUN_HISTORY_LIMIT runs), and
    a partition not fresh says only what its files say (missing, stale, failed)."""
    expected = expected_shard_fingerprints(settings)
    in_flight = (_partitions_of(instance, IN_FLIGHT, settings, skip=partial(run_worker_gone, instance))
                 if instance else {})
    streaks = _failure_streaks(instance, settings) if instance and read_streaks else {}
    now = time.time() if now is None else now
    keys = settings.partition_keys
    states = shard_states(settings.out_root, keys, [settings.shard_name(k) for k in keys], expected)
    status = {}
    for key in keys:
        if key in in_flight:
            status[key] = "in_flight"
            continue
        state = states[key]
        streak = streaks.get(key)
        if state != "fresh" and streak is not None:
            until = streak.backoff_until()
            if _retry_pending(streak.latest):
                state = "retrying"
            elif until is not None and now < until:
                state = "backoff"
            else:
                state = "failed"
        status[key] = state
    return status


def backoff_note(settings: Settings, instance: DagsterInstance | None, status: dict[str, str]) -> str:
    """A line naming the partitions held back after repeated failures, and when each is tried again."""
    held = [k for k, v in status.items() if v == "backoff"]
    if not held or instance is None:
        return ""
    streaks = _failure_streaks(instance, settings)
    parts = [f"{k} ({streaks[k].count} failures, again after "
             f"{time.strftime('%H:%M:%SZ', time.gmtime(streaks[k].backoff_until()))})" for k in held[:16] if k in streaks]
    return (f"{len(held)} partitions backed off after {BACKOFF_AFTER}+ failed runs in a row: "
            + ", ".join(parts) + (" ..." if len(held) > 16 else ""))


REQUESTED = ("missing", "stale", "failed")  # the partition states the schedule requests runs for


def shards_to_request(settings: Settings, instance: DagsterInstance | None, limit: int,
                      status: dict[str, str] | None = None, busy: set[str] | frozenset = frozenset()) -> list[str]:
    """Up to `limit` partitions that are missing, stale or failed, but not `busy` (their lease is
    held: a run is building them now, whatever instance launched it)."""
    status = shard_partition_status(settings, instance) if status is None else status
    return [k for k, s in status.items() if s in REQUESTED and k not in busy][:limit]


def leased_shards(settings: Settings, status: dict[str, str]) -> dict[str, dict]:
    """Partition key -> holder of each partition to request (missing, stale, failed) whose run lease is held
    (release.lease: one listing of the out root's `_locks/`, a read only per lease present): a
    run of another instance, or of `imnet build` with another DAGSTER_HOME, is building it now;
    a run requested for it would fail at once with ShardBusy."""
    if not any(v in REQUESTED for v in status.values()):
        return {}  # nothing to request: no listing
    return {k: h for k, h in held_shard_leases(settings.out_root).items() if status.get(k) in REQUESTED}


def make(settings: Settings):
    """This release's top-up schedule and audit sensor (one each per release: a schedule's run
    requests carry a partition key, which means one partitions definition per target; and each
    release's schedule can be started or stopped on its own)."""
    shards = asset_key(settings, "wds_shards")
    release_tags = {RELEASE_TAG: settings.release} if settings.release else {}

    @schedule(
        name=name(settings, "wds_shards_topup"),
        cron_schedule=settings.schedule_cron,
        target=[shards],
        default_status=DefaultScheduleStatus.STOPPED,
        description=(
            "Requests runs for shard partitions that are missing, failed or stale, at most "
            f"{settings.schedule_max_runs} per tick; partitions with a run queued or running, or whose "
            "lease a run holds, are skipped."
        ),
    )
    def wds_shards_topup(context: ScheduleEvaluationContext):
        index = read_index(settings.out_root)
        if index is None:
            return SkipReason("no shuffled plan under the out root yet: materialize the upstream stages first")
        if why := plan_mismatch(settings, index):
            return SkipReason(why)  # shards cut from it would be rebuilt again once it is redone
        fail_dead_runs(context.instance, log=context.log.warning)
        status = shard_partition_status(settings, context.instance)
        busy = leased_shards(settings, status)
        if busy:
            context.log.info(f"{len(busy)} shard partitions are being built by runs holding their lease, not "
                             f"requested: " + ", ".join(f"{k} ({describe(h)})" for k, h in sorted(busy.items())[:8])
                             + (" ..." if len(busy) > 8 else ""))
        keys = shards_to_request(settings, context.instance, settings.schedule_max_runs, status, set(busy))
        held = backoff_note(settings, context.instance, status)
        if held:
            context.log.warning(held)
        if not keys:
            return SkipReason(f"nothing to request: {held}" if held else
                              "every shard partition is fresh, queued or running, or held by a run building it")
        # Several requests per tick need run keys; the scheduler scopes them to the tick's
        # scheduled time, so the same partition can be asked for again on a later tick.
        return [
            RunRequest(run_key=f"{name(settings, 'wds_shards')}-{k}", partition_key=k, asset_selection=[shards],
                       tags={"imnet/reason": "topup", **release_tags})
            for k in keys
        ]

    @sensor(
        name=name(settings, "shard_audit_when_complete"),
        target=[asset_key(settings, "shard_audit")],
        minimum_interval_seconds=30,
        # Off (IMNET_AUDIT_SENSOR=off) where ordinary run pods cannot reach the catalog (deploy/k8s).
        default_status=DefaultSensorStatus.RUNNING if settings.audit_sensor else DefaultSensorStatus.STOPPED,
        description=("Materializes shard_audit once every shard partition is in and fresh, unless the audit "
                     "is already fresh for them."),
    )
    def shard_audit_when_complete(context: SensorEvaluationContext):
        shards_now, why, look = looked_at_shards(settings)
        if shards_now is None:
            return SkipReason(why)
        # One request per change of the shards, including a change back to an earlier one (strays
        # come, fail the audit, and go: the shards are as they were, the audit must run again).
        seen = json.loads(context.cursor) if context.cursor else {}
        if seen.get("state") == shards_now:
            return SkipReason("shard_audit was already asked for with the shards as they are")
        n = int(seen.get("n", 0))
        # A first tick (no cursor), or shards changed back: the audit may have been made already
        # (`imnet build` audits what it built), which is known from its record, as status knows it.
        fresh = audit_recorded_fresh(settings, look)
        if fresh is None:
            return SkipReason("the catalog is being written (perhaps by shard_audit itself): "
                              "whether the audit is fresh is looked at again on the next tick")
        if fresh:
            context.update_cursor(json.dumps({"state": shards_now, "n": n}))
            return SkipReason("shard_audit is already fresh for the shards as they are (its record in the "
                              "catalog matches them, as `imnet status` says): not asked for")
        n += 1
        context.update_cursor(json.dumps({"state": shards_now, "n": n}))
        return RunRequest(run_key=f"{shards_now}-{n}", asset_selection=[asset_key(settings, "shard_audit")],
                          tags=release_tags)

    return wds_shards_topup, shard_audit_when_complete
