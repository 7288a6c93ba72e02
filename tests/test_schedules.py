"""The wds_shards_topup schedule and the shard_audit_when_complete sensor, evaluated against a real
release built by `imnet build` and the real Dagster instance (the project's dagster.yaml) that
recorded it.

The release has 8 shards so that one build holds every case at once: fresh, missing (tar or state
file gone), failed (a real run that failed), stale (rewritten by a real run at another WebP
quality, or changed on storage), and missing/stale shards that already have a run queued or
running (which the schedule must leave alone).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from dagster import (
    AssetKey,
    DagsterEvent,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    RunRequest,
    RunsFilter,
    build_schedule_context,
    build_sensor_context,
    instance_for_test,
    materialize,
)
from dagster._core.remote_origin import InProcessCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._daemon.auto_run_reexecution.auto_run_reexecution import should_retry

from imnet_assets.definitions import build_definitions
from imnet_assets.defs import schedules
from imnet_assets.defs.assets import wds_shards
from imnet_assets.release.outroot import state_url
from imnet_assets.settings import Settings
from tests.conftest import REPO, build_env, dagster_home, dead_pid, imnet, other_pid_namespace, settings_of

NUM_SHARDS = 8
KEYS = [f"{i:04d}" for i in range(NUM_SHARDS)]
SHARDS = AssetKey("wds_shards")
AUDIT = AssetKey("shard_audit")
LIFECYCLE = {
    DagsterRunStatus.QUEUED: DagsterEventType.RUN_ENQUEUED,
    DagsterRunStatus.STARTING: DagsterEventType.RUN_STARTING,
    DagsterRunStatus.STARTED: DagsterEventType.RUN_START,
    DagsterRunStatus.CANCELING: DagsterEventType.RUN_CANCELING,
    DagsterRunStatus.FAILURE: DagsterEventType.RUN_FAILURE,
}


@pytest.fixture(scope="module")
def release(sample_release, tmp_path_factory):
    """The sample release built once by `imnet build` into a DAGSTER_HOME with the project's dagster.yaml."""
    tmp = tmp_path_factory.mktemp("topup")
    env = build_env(tmp, sample_release[0], DAGSTER_HOME=str(dagster_home(tmp)),
                    IMNET_NUM_SHARDS=str(NUM_SHARDS), IMNET_WORKERS="1")
    imnet(["build"], env)
    return tmp, env


@dataclass
class Site:
    env: dict
    settings: Settings
    instance: DagsterInstance
    out: Path

    def with_env(self, **extra: str) -> Settings:
        return settings_of({**self.env, **extra})

    def tar(self, key: str) -> Path:
        return self.out / self.settings.shard_name(key)

    def state(self, key: str) -> Path:
        return Path(state_url(str(self.out), key))

    def run_shard(self, key: str, settings: Settings | None = None):
        """A real in-process materialization of one partition, recorded in the instance."""
        defs = build_definitions(settings or self.settings)
        return materialize(list(defs.assets), selection=["wds_shards"], partition_key=key,
                           instance=self.instance, raise_on_error=False)

    def add_run(self, key: str, status: DagsterRunStatus, host: str | None = None, pid: int | None = None,
                at: float | None = None, tags: dict[str, str] | None = None) -> str:
        """A run of one wds_shards partition, moved to `status` by the event the daemon would report
        (from process `pid`, by default this one, at Unix time `at`); `host`: the run's HOST_TAG."""
        job = build_definitions(self.settings).resolve_implicit_global_asset_job_def()
        tags = {schedules.PARTITION_TAG: key, **({schedules.HOST_TAG: host} if host else {}), **(tags or {})}
        run = self.instance.create_run_for_job(
            job_def=job, asset_selection={SHARDS}, tags=tags, remote_job_origin=_job_origin(job.name),
        )
        event = DagsterEvent(event_type_value=LIFECYCLE[status].value, job_name=run.job_name,
                             pid=os.getpid() if pid is None else pid)
        self.instance.report_dagster_event(event, run_id=run.run_id, timestamp=at)
        assert self.instance.get_run_by_id(run.run_id).status == status
        return run.run_id


def _job_origin(job_name: str) -> RemoteJobOrigin:
    """Where the daemon would load the job from (queued runs must say), as workspace.yaml names it."""
    target = LoadableTargetOrigin(module_name="imnet_assets.definitions", attribute="defs")
    location = InProcessCodeLocationOrigin(target, location_name="imnet_assets.definitions:defs")
    return RemoteJobOrigin(RemoteRepositoryOrigin(location, "__repository__"), job_name)


@pytest.fixture
def site(release, tmp_path):
    """A private copy of the built out root and of the instance that recorded the build."""
    src, env = release
    shutil.copytree(src / "out", tmp_path / "out")
    shutil.copytree(src / "dagster_home", tmp_path / "dagster_home")
    env = {**env, "IMNET_OUT_ROOT": str(tmp_path / "out"), "IMNET_CATALOG": str(tmp_path / "catalog.duckdb"),
           "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    with instance_for_test(overrides=config, temp_dir=str(tmp_path / "dagster_home")) as instance:
        yield Site(env, settings_of(env), instance, tmp_path / "out")


def tick(schedule_settings: Settings, instance: DagsterInstance):
    topup, _ = schedules.make(schedule_settings)
    repo = build_definitions(schedule_settings).get_repository_def()
    return topup.evaluate_tick(build_schedule_context(instance=instance, repository_def=repo))


def requested(data) -> list[str]:
    for req in data.run_requests or []:
        assert isinstance(req, RunRequest)
        assert list(req.asset_selection) == [SHARDS]
        assert req.tags.get("imnet/reason") == "topup"
        assert req.run_key == f"wds_shards-{req.partition_key}"  # several per tick need run keys
    return [req.partition_key for req in data.run_requests or []]


def sense(settings: Settings, instance: DagsterInstance, cursor: str | None = None):
    _, sensor = schedules.make(settings)
    return sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=build_definitions(settings),
                                                     cursor=cursor))


# ----------------------------------------------------------------------------- schedule


def test_fresh_build_needs_nothing(site):
    status = schedules.shard_partition_status(site.settings, site.instance)
    assert status == dict.fromkeys(KEYS, "fresh")
    data = tick(site.settings, site.instance)
    assert data.run_requests == [] and "fresh" in data.skip_message


class LeaseHolder:
    """A real process holding the lease of shard `key`'s run under `out` (release.lease, as the
    wds_shards asset takes it), as a run of another instance building that shard now."""

    def __init__(self, out: Path, key: str):
        import sys

        code = ("import sys, time; from imnet_assets.release import lease; "
                "held = lease.acquire(sys.argv[1], lease.shard_lease_name(sys.argv[2]), 'run elsewhere'); "
                "print('held', flush=True); time.sleep(120)")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(out), key], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: its lease object stays behind, its holder gone
        self.proc.wait()


def test_topup_skips_a_shard_whose_lease_a_run_holds(site):
    """A shard being built by a run the instance does not know (another instance, `imnet build`
    with another DAGSTER_HOME) holds its lease: the tick does not request it (that run would fail
    at once with ShardBusy). Once the holder is gone (killed: its lease left behind), it is."""
    from imnet_assets.release import lease

    for key in ("0002", "0005"):
        site.tar(key).unlink()
    holder = LeaseHolder(site.out, "0002")
    try:
        assert schedules.shard_partition_status(site.settings, site.instance)["0002"] == "missing"
        assert set(lease.held_shard_leases(str(site.out))) == {"0002"}
        assert requested(tick(site.settings, site.instance)) == ["0005"]
    finally:
        holder.kill()
    assert (site.out / "_locks" / "shard-0002").exists()  # left behind by the killed holder
    assert lease.held_shard_leases(str(site.out)) == {}
    assert requested(tick(site.settings, site.instance)) == ["0002", "0005"]


def test_topup_requests_missing_failed_and_stale_partitions_only(site, monkeypatch):
    s = site
    # 0000: fresh, though an older run of it failed
    s.add_run("0000", DagsterRunStatus.FAILURE)
    # 0001: its tar is gone; 0002: its commit record is gone
    s.tar("0001").unlink()
    s.state("0002").unlink()
    # 0003: a real run failed (its plan slice unreadable) after the shard was lost
    s.tar("0003").unlink()
    s.state("0003").unlink()
    plan_slice = s.out / "_plan" / "0003.csv"
    saved = plan_slice.read_bytes()
    plan_slice.write_text("not a plan slice\n")
    failed = s.run_shard("0003")
    plan_slice.write_bytes(saved)
    assert not failed.success
    # 0004: rewritten by a real (successful) run at another WebP quality
    other = s.with_env(IMNET_WEBP_QUALITY=str(s.settings.webp_quality - 15))
    assert s.run_shard("0004", other).success
    # 0005: missing, but a run for it waits in the queue; 0006: changed on storage, and running
    s.tar("0005").unlink()
    s.add_run("0005", DagsterRunStatus.QUEUED)
    with open(s.tar("0006"), "r+b") as f:
        f.truncate(10240)
    s.add_run("0006", DagsterRunStatus.STARTED)
    # 0007: lost, and a run of it that the daemon launched (its job's origin known) failed moments ago
    s.tar("0007").unlink()
    s.add_run("0007", DagsterRunStatus.FAILURE)

    # 0007's run failed, and dagster.yaml's run retries will launch it again: the schedule leaves
    # it to that retry (else the shard would be built twice) ... 0003's in-process run is tagged
    # "will retry" as well, but no daemon can retry a run without its job's origin (it says "Run
    # does not have an external job origin, unable to retry the run"): it is failed, and requested.
    assert s.instance.get_run_by_id(failed.run_id).tags.get(schedules.WILL_RETRY_TAG) == "true"
    assert s.instance.get_run_by_id(failed.run_id).remote_job_origin is None
    status = schedules.shard_partition_status(s.settings, s.instance)
    assert status == {
        "0000": "fresh", "0001": "missing", "0002": "missing", "0003": "failed",
        "0004": "stale", "0005": "in_flight", "0006": "in_flight", "0007": "retrying",
    }
    assert requested(tick(s.settings, s.instance)) == ["0001", "0002", "0003", "0004"]
    # ... for a while: when no retry came (no daemon running retries), it is requested again.
    monkeypatch.setattr(schedules, "RETRY_GRACE_SECONDS", 0)
    assert schedules.shard_partition_status(s.settings, s.instance)["0007"] == "failed"
    assert requested(tick(s.settings, s.instance)) == ["0001", "0002", "0003", "0004", "0007"]

    # IMNET_SCHEDULE_MAX_RUNS bounds each tick; what the daemon queued is not asked for again.
    bounded = s.with_env(IMNET_SCHEDULE_MAX_RUNS="3")
    first = requested(tick(bounded, s.instance))
    assert first == ["0001", "0002", "0003"]
    for key in first:
        s.add_run(key, DagsterRunStatus.QUEUED)
    assert requested(tick(bounded, s.instance)) == ["0004", "0007"]
    s.add_run("0004", DagsterRunStatus.STARTING)
    s.add_run("0007", DagsterRunStatus.QUEUED)
    data = tick(bounded, s.instance)
    assert data.run_requests == [] and data.skip_message


def test_runs_whose_worker_process_is_gone_are_failed_and_their_shards_requested(site):
    """kill -9 of a run's worker (or of `imnet build`) leaves its run "started" for good. On this
    host the schedule (and `imnet build`) see that the process is gone and fail the run; a run on
    another host, or whose worker is alive, stays in flight."""
    s = site
    here = socket.gethostname()
    for key in ("0001", "0002", "0003", "0004"):
        s.tar(key).unlink()
    killed = s.add_run("0001", DagsterRunStatus.STARTED, host=here, pid=dead_pid())
    alive = s.add_run("0002", DagsterRunStatus.STARTED, host=here)  # this process: alive
    elsewhere = s.add_run("0003", DagsterRunStatus.STARTED, host="another-host", pid=dead_pid())
    untagged = s.add_run("0004", DagsterRunStatus.STARTED, pid=dead_pid())  # killed before it said where
    # Being canceled when its worker died: canceled (as asked), not failed (which would be retried).
    canceling = s.add_run("0006", DagsterRunStatus.STARTED, host=here, pid=dead_pid())
    s.instance.report_dagster_event(DagsterEvent(event_type_value=DagsterEventType.RUN_CANCELING.value,
                                                 job_name=s.instance.get_run_by_id(canceling).job_name),
                                    run_id=canceling)
    assert s.instance.get_run_by_id(canceling).status == DagsterRunStatus.CANCELING
    # A live process that started after the run did holds a reused number: the run's worker is gone.
    younger = subprocess.Popen(["sleep", "120"])
    reused = s.add_run("0005", DagsterRunStatus.STARTED, host=here, pid=younger.pid, at=time.time() - 3600)

    status = schedules.shard_partition_status(s.settings, s.instance)  # reads, changes nothing
    assert [status[k] for k in ("0001", "0002", "0003", "0004")] == ["missing", "in_flight", "in_flight", "in_flight"]
    assert status["0005"] == "fresh"
    assert s.instance.get_run_by_id(killed).status == DagsterRunStatus.STARTED

    # Failed now, and requested by the same tick: never left to Dagster's run retries, which would
    # relaunch it (a second writer of a shard that `imnet build` may have redone meanwhile).
    assert requested(tick(s.settings, s.instance)) == ["0001"]
    runs = {r: s.instance.get_run_by_id(r).status for r in (killed, alive, elsewhere, untagged, reused, canceling)}
    assert runs == {killed: DagsterRunStatus.FAILURE, alive: DagsterRunStatus.STARTED,
                    elsewhere: DagsterRunStatus.STARTED, untagged: DagsterRunStatus.STARTED,
                    reused: DagsterRunStatus.FAILURE, canceling: DagsterRunStatus.CANCELED}
    younger.kill()
    younger.wait()
    failure = s.instance.get_records_for_run(killed, of_type=DagsterEventType.RUN_FAILURE).records[0]
    assert failure.event_log_entry.dagster_event.message == (
        f"run worker process on {here} is gone (killed?): marked failed by imnet; not retried: its shard is "
        "built again by imnet build or the top-up schedule")
    assert schedules.shard_partition_status(s.settings, s.instance)["0001"] == "failed"  # not "retrying"
    # What the daemon's run retries decide of it (their own code, on the real instance): no retry.
    for run_id in (killed, reused):
        run = s.instance.get_run_by_id(run_id)
        assert run.tags.get(schedules.WILL_RETRY_TAG) == "false", run.tags
        assert not should_retry(run, s.instance)


CREATE_AND_DIE = """
import os, signal, sys
from dagster import AssetKey, DagsterInstance
from imnet_assets.defs import schedules
from imnet_assets.definitions import build_definitions
from imnet_assets.settings import Settings

job = build_definitions(Settings.from_env()).resolve_implicit_global_asset_job_def()
with DagsterInstance.get() as instance:
    shard = instance.create_run_for_job(job_def=job, asset_selection={AssetKey("wds_shards")},
                                        tags={schedules.PARTITION_TAG: sys.argv[1], **schedules.build_run_tags()})
    audit = instance.create_run_for_job(job_def=job, asset_selection={AssetKey("shard_audit")},
                                        tags=schedules.build_run_tags())
    print(shard.run_id, audit.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as a kill -9 between the run's creation and its start
"""


def test_a_run_whose_build_died_before_starting_it_does_not_hold_its_partition(site):
    """`imnet build` creates a run, then executes it in its own process: killed in between (kill -9,
    or the os._exit of a build interrupted while its shard runs go on in threads), the run stays
    "not started" forever. It held its partition "in flight" for every later build ("left to it")
    and the audit then failed on the missing shard. Now such a run is failed and its partition
    built again; a run whose build still lives, and one the daemon or the UI made (no build pid),
    stay in flight. The killed build's run of the audit (no partition) is failed too: the UI
    would show it running forever."""
    s = site
    for key in ("0001", "0002", "0003"):
        s.tar(key).unlink()
    proc = subprocess.run([sys.executable, "-c", CREATE_AND_DIE, "0001"], env={**os.environ, **s.env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    orphan, orphan_audit = proc.stdout.split()
    job = build_definitions(s.settings).resolve_implicit_global_asset_job_def()
    live = s.instance.create_run_for_job(job_def=job, asset_selection={SHARDS}, tags={
        schedules.PARTITION_TAG: "0002", **schedules.build_run_tags()}).run_id  # this process: alive
    daemons = s.instance.create_run_for_job(job_def=job, asset_selection={SHARDS}, tags={
        schedules.PARTITION_TAG: "0003", **schedules.worker_place()}).run_id
    for run_id in (orphan, orphan_audit, live, daemons):
        assert s.instance.get_run_by_id(run_id).status == DagsterRunStatus.NOT_STARTED

    status = schedules.shard_partition_status(s.settings, s.instance)
    assert [status[k] for k in ("0001", "0002", "0003")] == ["missing", "in_flight", "in_flight"]
    assert schedules.fail_dead_runs(s.instance) == ["0001"]
    assert {s.instance.get_run_by_id(r).status for r in (orphan, orphan_audit)} == {DagsterRunStatus.FAILURE}
    assert {s.instance.get_run_by_id(r).status for r in (live, daemons)} == {DagsterRunStatus.NOT_STARTED}
    failure = s.instance.get_records_for_run(orphan, of_type=DagsterEventType.RUN_FAILURE).records[0]
    assert "before the run started" in failure.event_log_entry.dagster_event.message
    # failed, not "retrying" for RETRY_GRACE_SECONDS: nothing retries a dead build's runs
    assert {s.instance.get_run_by_id(r).tags.get(schedules.WILL_RETRY_TAG) for r in (orphan, orphan_audit)} == {"false"}
    assert schedules.shard_partition_status(s.settings, s.instance)["0001"] == "failed"


def test_a_run_of_an_older_build_never_started_is_failed_once_it_is_old(site, monkeypatch):
    """Instances upgraded with such an orphan: a run made by an `imnet build` from before runs carried
    the build's pid, still not started long after its creation (a build starts its runs within a
    second), is failed too; a young one is left in flight."""
    s = site
    s.tar("0001").unlink()
    job = build_definitions(s.settings).resolve_implicit_global_asset_job_def()
    tags = {schedules.PARTITION_TAG: "0001", schedules.LAUNCHED_BY_TAG: "imnet build", **schedules.worker_place()}
    orphan = s.instance.create_run_for_job(job_def=job, asset_selection={SHARDS}, tags=tags).run_id
    assert schedules.shard_partition_status(s.settings, s.instance)["0001"] == "in_flight"  # young
    assert schedules.fail_dead_runs(s.instance) == []
    monkeypatch.setattr(schedules, "UNTAGGED_NOT_STARTED_SECONDS", 0)
    time.sleep(0.01)
    assert schedules.fail_dead_runs(s.instance) == ["0001"]
    assert s.instance.get_run_by_id(orphan).status == DagsterRunStatus.FAILURE


def test_a_run_in_another_pid_namespace_of_this_host_is_not_judged_by_our_process_numbers(site):
    """Containers on the host's network (the Docker launcher's `network: host`) have this host's
    name but process numbers of their own: a run whose worker lives in one is left to Dagster's run
    monitoring, whatever its worker's number means here. A run of this namespace whose worker is
    gone is still failed, and so is one tagged before namespaces were recorded."""
    s = site
    container, namespace = other_pid_namespace()
    try:
        here = schedules.worker_place()
        assert namespace != here[schedules.PID_NAMESPACE_TAG]
        for key in ("0001", "0002", "0003"):
            s.tar(key).unlink()
        theirs = s.add_run("0001", DagsterRunStatus.STARTED, pid=dead_pid(),
                           tags={**here, schedules.PID_NAMESPACE_TAG: namespace})
        ours = s.add_run("0002", DagsterRunStatus.STARTED, pid=dead_pid(), tags=here)
        older = s.add_run("0003", DagsterRunStatus.STARTED, host=here[schedules.HOST_TAG], pid=dead_pid())
        assert sorted(schedules.fail_dead_runs(s.instance)) == ["0002", "0003"]
        assert s.instance.get_run_by_id(theirs).status == DagsterRunStatus.STARTED
        assert s.instance.get_run_by_id(ours).status == DagsterRunStatus.FAILURE
        assert s.instance.get_run_by_id(older).status == DagsterRunStatus.FAILURE
        assert schedules.shard_partition_status(s.settings, s.instance)["0001"] == "in_flight"
    finally:
        container.kill()
        container.wait()


def test_topup_skips_before_the_plan_exists(site):
    shutil.rmtree(site.out / "_plan")
    data = tick(site.settings, site.instance)
    assert data.run_requests == [] and "plan" in data.skip_message


def test_a_shard_edited_in_place_or_retimed_is_stale(site):
    """Same size, other bytes (a flipped byte): stale and requested, and the audit sensor waits.
    Same bytes under a new mtime (a copy that did not keep times): stale too, never hashed."""
    os.utime(site.tar("0002"), ns=(1, 1))
    flipped = site.tar("0005")
    with open(flipped, "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0x01]))
    status = schedules.shard_partition_status(site.settings, site.instance)
    assert [k for k, v in status.items() if v != "fresh"] == ["0002", "0005"]
    assert {status["0002"], status["0005"]} == {"stale"}
    assert requested(tick(site.settings, site.instance)) == ["0002", "0005"]
    assert "0002 is not in yet (stale" in sense(site.settings, site.instance).skip_message


def test_a_holdout_change_leaves_every_shard_fresh(site):
    """The holdout names splits in _info.json only: no shard depends on it."""
    held = site.with_env(IMNET_HOLDOUT="validation:1")
    assert schedules.shard_partition_status(held, site.instance) == dict.fromkeys(KEYS, "fresh")


@pytest.mark.parametrize("change", [{"IMNET_SEED": "3"}, {"IMNET_NUM_SHARDS": str(NUM_SHARDS + 2)}])
def test_a_layout_change_leaves_no_shard_fresh_and_nothing_requested_before_the_new_plan(site, change):
    """Seed, shard count or holdout changed: the published plan is another layout's, so no shard is
    fresh; the schedule asks for no shard cut from it (nor for keys it has no slice for) but says
    why, the audit sensor waits, and a shard run fails naming the settings, writing nothing."""
    changed = site.with_env(**change)
    status = schedules.shard_partition_status(changed, site.instance)
    assert sorted(status) == changed.partition_keys
    assert {status[k] for k in KEYS if k in status} == {"stale"}
    assert {v for k, v in status.items() if k not in KEYS} <= {"missing"}
    data = tick(changed, site.instance)
    assert data.run_requests == [] and "the settings ask for" in data.skip_message, data.skip_message
    assert "materialize shuffled_plan" in data.skip_message
    assert "the settings ask for" in sense(changed, site.instance).skip_message
    before = {p.name: p.stat().st_mtime_ns for p in site.out.iterdir()}
    result = site.run_shard(changed.partition_keys[-1], changed)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "PlanOutdated" in str(failure.event_specific_data.error) or "the settings ask for" in str(
        failure.event_specific_data.error)
    assert {p.name: p.stat().st_mtime_ns for p in site.out.iterdir()} == before


def test_a_quality_change_makes_every_shard_stale_and_changes_the_code_version(release):
    _, env = release
    settings = settings_of(env)
    again = settings_of(env)
    lower = settings_of({**env, "IMNET_WEBP_QUALITY": str(settings.webp_quality - 10)})

    def code_version(s: Settings) -> str:
        asset, _ = wds_shards.make(s)
        return asset.code_versions_by_key[SHARDS]

    assert code_version(again) == code_version(settings)
    assert code_version(lower) != code_version(settings)
    assert schedules.shard_partition_status(again, None) == dict.fromkeys(KEYS, "fresh")
    assert schedules.shard_partition_status(lower, None) == dict.fromkeys(KEYS, "stale")
    with instance_for_test() as instance:
        assert requested(tick(again, instance)) == []
        assert requested(tick(lower, instance)) == KEYS
        bounded = settings_of({**env, "IMNET_WEBP_QUALITY": str(lower.webp_quality), "IMNET_SCHEDULE_MAX_RUNS": "5"})
        assert requested(tick(bounded, instance)) == KEYS[:5]


# ----------------------------------------------------------------------------- sensor


def test_audit_sensor_waits_for_every_shard_then_asks_once_per_change(site):
    s = site
    cursor = None

    def look(settings=None):
        """One sensor tick, carrying the cursor from tick to tick as the daemon does."""
        nonlocal cursor
        data = sense(settings or s.settings, s.instance, cursor)
        cursor = data.cursor if data.cursor is not None else cursor
        return data

    data = look()
    assert len(data.run_requests) == 1
    req = data.run_requests[0]
    assert list(req.asset_selection) == [AUDIT]
    assert req.run_key

    # nothing changed: no new request, so the daemon launches the audit only once
    data = look()
    assert data.run_requests == [] and "already asked" in data.skip_message
    # a rerun that writes the same bytes is another run: audited again, so lineage names it
    assert s.run_shard("0001").success
    again = look().run_requests
    assert len(again) == 1 and again[0].run_key != req.run_key
    req = again[0]
    assert look().run_requests == []

    # a shard missing (its commit record, or its tar) or changed on storage: skip, naming it
    saved = s.state("0002").read_bytes()
    s.state("0002").unlink()
    data = look()
    assert data.run_requests == [] and "shard 0002" in data.skip_message
    s.state("0002").write_bytes(saved)
    tar, mtime = s.tar("0006").read_bytes(), s.tar("0006").stat().st_mtime_ns
    s.tar("0006").unlink()
    data = look()
    assert data.run_requests == [] and "shard 0006" in data.skip_message
    s.tar("0006").write_bytes(tar[:-10240])
    data = look()
    assert data.run_requests == [] and "shard 0006" in data.skip_message
    s.tar("0006").write_bytes(tar)
    assert "shard 0006" in look().skip_message  # the same bytes, but not the file committed (mtime)
    os.utime(s.tar("0006"), ns=(mtime, mtime))
    assert look().run_requests == []  # back as they were when the audit was asked for

    # stray shard files (which fail the audit) appear, then are deleted: a new audit each time,
    # the second one although the shards are again what the first audit saw
    keys = {req.run_key}
    stray = s.out / s.settings.shard_name("0012")
    stray.write_bytes(tar)
    for _ in range(2):
        changed = look().run_requests
        assert len(changed) == 1 and changed[0].run_key not in keys
        keys.add(changed[0].run_key)
        assert look().run_requests == []
        if stray.exists():
            stray.unlink()

    # a shard committed with other bytes: a new audit
    state = json.loads(saved)
    s.state("0002").write_text(json.dumps({**state, "sha256": "0" * 64}))
    changed = look().run_requests
    assert len(changed) == 1 and changed[0].run_key not in keys

    # stale shards (other settings) are not "in": no audit
    data = look(s.with_env(IMNET_WEBP_QUALITY=str(s.settings.webp_quality - 10)))
    assert data.run_requests == [] and data.skip_message


def test_audit_sensor_asks_for_no_audit_the_build_already_made(site, release):
    """A sensor with no cursor (a new instance, or the sensor turned on again) right after `imnet
    build` audited these very shards: no run requested, the cursor recorded; once a shard is
    removed and built again by a real run, the audit is asked for."""
    s = site
    for f in release[0].glob("catalog.duckdb*"):  # the catalog that recorded the build's audit
        shutil.copy2(f, Path(s.settings.catalog).parent / f.name)
    writer = subprocess.Popen([sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
                               "print('held', flush=True); sys.stdin.read()", s.settings.catalog],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:  # another process writes the catalog (the audit, say): asked again next tick, nothing recorded
        assert writer.stdout.readline() == "held\n"
        data = sense(s.settings, s.instance)
        assert data.run_requests == [] and "being written" in data.skip_message and data.cursor is None
    finally:
        writer.communicate("")
    data = sense(s.settings, s.instance)
    assert data.run_requests == [] and "already fresh" in data.skip_message
    assert data.cursor
    again = sense(s.settings, s.instance, data.cursor)
    assert again.run_requests == [] and "already asked" in again.skip_message

    s.tar("0003").unlink()
    s.state("0003").unlink()
    assert "shard 0003" in sense(s.settings, s.instance, data.cursor).skip_message
    assert s.run_shard("0003").success
    for cursor in (data.cursor, None):
        changed = sense(s.settings, s.instance, cursor).run_requests
        assert len(changed) == 1 and list(changed[0].asset_selection) == [AUDIT]


def test_a_partition_that_keeps_failing_is_backed_off_and_the_tick_says_so(site, monkeypatch):
    """Real runs of one partition fail (its plan slice is unreadable): after BACKOFF_AFTER failures
    in a row the schedule stops asking for it until a wait that doubles with each further failure
    has passed, and says so; other partitions are still requested; a success ends the streak."""
    s = site
    monkeypatch.setattr(schedules, "RETRY_GRACE_SECONDS", 0)  # no daemon here runs the retries
    for key in ("0003", "0005"):
        s.tar(key).unlink()
    plan_slice = s.out / "_plan" / "0003.csv"
    saved = plan_slice.read_bytes()
    plan_slice.write_text("not a plan slice\n")

    def fail_once() -> float:
        result = s.run_shard("0003")
        assert not result.success
        return s.instance.get_run_records(RunsFilter(run_ids=[result.run_id]))[0].end_time

    for attempt in range(schedules.BACKOFF_AFTER):
        assert schedules.shard_partition_status(s.settings, s.instance)["0003"] == ("missing" if attempt == 0 else "failed")
        assert requested(tick(s.settings, s.instance)) == ["0003", "0005"]
        ended = fail_once()

    status = schedules.shard_partition_status(s.settings, s.instance)
    assert status["0003"] == "backoff" and status["0005"] == "missing"
    assert requested(tick(s.settings, s.instance)) == ["0005"]  # the others are still asked for
    s.add_run("0005", DagsterRunStatus.QUEUED)
    data = tick(s.settings, s.instance)
    assert data.run_requests == []
    assert f"0003 ({schedules.BACKOFF_AFTER} failures, again after" in data.skip_message, data.skip_message

    # once the wait is over it is tried again; one more failure doubles the wait
    wait = schedules.BACKOFF_SECONDS
    assert schedules.shard_partition_status(s.settings, s.instance, now=ended + wait - 5)["0003"] == "backoff"
    assert schedules.shard_partition_status(s.settings, s.instance, now=ended + wait + 5)["0003"] == "failed"
    ended = fail_once()
    assert schedules.shard_partition_status(s.settings, s.instance, now=ended + wait + 5)["0003"] == "backoff"
    assert schedules.shard_partition_status(s.settings, s.instance, now=ended + 2 * wait + 5)["0003"] == "failed"

    # a successful run ends the streak: a shard lost later is requested at once
    plan_slice.write_bytes(saved)
    assert s.run_shard("0003").success
    assert schedules.shard_partition_status(s.settings, s.instance)["0003"] == "fresh"
    s.tar("0003").unlink()
    assert schedules.shard_partition_status(s.settings, s.instance)["0003"] == "missing"
