"""The Dagster UI as the control room, end to end on the real webserver.

`dagster dev` runs with the project's workspace.yaml and, in a fresh DAGSTER_HOME, the project's
dagster.yaml (queued runs, a pool of 2 for shard runs). Everything is driven and read through the
webserver's GraphQL API, the way the UI does it: the upstream stages are launched as one run of
the implicit asset job, every wds_shards partition as a partition backfill; the audit sensor
(running by default) then materializes shard_audit. Afterwards `imnet build` against the same
instance finds nothing to redo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, build_env, dagster_home, imnet

NUM_SHARDS = 4
KEYS = [f"{i:04d}" for i in range(NUM_SHARDS)]
ASSETS = ["raw_tars", "synset_manifest", "filtered_index", "shuffled_plan", "wds_shards", "shard_audit"]
UPSTREAM = ASSETS[:4]
POOL_LIMIT = 2  # concurrency.pools.default_limit in dagster.yaml
OVERALL_SECONDS = 600
ACTIVE = ["QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DagsterDev:
    """`dagster dev` in its own process group, and a small GraphQL client for its webserver."""

    def __init__(self, tmp: Path, env: dict[str, str]):
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/graphql"
        self.log_path = tmp / "dagster-dev.log"
        self.deadline = time.monotonic() + OVERALL_SECONDS
        exe = shutil.which("dagster", path=os.path.dirname(sys.executable)) or "dagster"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [exe, "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(self.port)],
                cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.location = ""
        self.repository = ""

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Interrupt the whole process group (webserver, daemon, code servers, run workers)."""
        if self.proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=grace)
                if sig == signal.SIGINT:
                    # the webserver may outlive its parent briefly; nothing of the group may stay
                    os.killpg(self.proc.pid, signal.SIGKILL)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return

    def remaining(self, cap: float) -> float:
        return max(0.0, min(cap, self.deadline - time.monotonic()))

    def query(self, text: str, **variables) -> dict:
        body = json.dumps({"query": text, "variables": variables}).encode()
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as e:  # GraphQL validation errors come back as HTTP 4xx/5xx
            raise AssertionError(f"GraphQL HTTP {e.code}: {e.read()[:2000]!r}") from None
        if doc.get("errors"):
            raise AssertionError(f"GraphQL errors: {doc['errors']}")
        return doc["data"]

    def wait(self, what: str, probe, cap: float, every: float = 2.0):
        """Poll probe() until it returns something truthy, within cap seconds and the overall bound."""
        end = time.monotonic() + self.remaining(cap)
        last = None
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"dagster dev exited ({self.proc.returncode}) while waiting for {what}\n"
                                     f"{self.log_tail()}")
            try:
                last = probe()
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = e
            else:
                if last:
                    return last
            if time.monotonic() >= end:
                raise AssertionError(f"timed out waiting for {what}; last: {last!r}\n{self.log_tail()}")
            time.sleep(every)

    # ------------------------------------------------------------------ GraphQL helpers

    def wait_ready(self) -> None:
        def loaded():
            data = self.query(
                "{ repositoriesOrError { __typename ... on RepositoryConnection { nodes { name location { name } } } } }"
            )
            nodes = data["repositoriesOrError"].get("nodes") or []
            return nodes[0] if nodes else None

        repo = self.wait("the webserver to load the workspace", loaded, cap=240)
        self.repository, self.location = repo["name"], repo["location"]["name"]

    def selector(self, **extra) -> dict:
        return {"repositoryLocationName": self.location, "repositoryName": self.repository, **extra}

    def launch_assets(self, assets: list[str]) -> str:
        data = self.query(
            """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
                 __typename ... on LaunchRunSuccess { run { runId status } } ... on PythonError { message }
                 ... on InvalidSubsetError { message } ... on RunConfigValidationInvalid { errors { message } } } }""",
            p={"selector": self.selector(jobName="__ASSET_JOB", assetSelection=[{"path": [a]} for a in assets])},
        )["launchRun"]
        assert data["__typename"] == "LaunchRunSuccess", data
        assert data["run"]["status"] == "QUEUED", data  # dagster.yaml's run queue takes every launch
        return data["run"]["runId"]

    def run(self, run_id: str) -> dict:
        return self.query(
            """query($id: ID!) { runOrError(runId: $id) { __typename ... on Run {
                 runId status startTime endTime tags { key value } assetSelection { path } } } }""",
            id=run_id,
        )["runOrError"]

    def wait_run(self, run_id: str, cap: float) -> dict:
        def done():
            r = self.run(run_id)
            return r if r.get("status") in ("SUCCESS", "FAILURE", "CANCELED") else None

        return self.wait(f"run {run_id}", done, cap)

    def runs(self, **run_filter) -> list[dict]:
        data = self.query(
            """query($f: RunsFilter) { runsOrError(filter: $f) { __typename ... on Runs { results {
                 runId status startTime endTime tags { key value } assetSelection { path } } } } }""",
            f=run_filter,
        )
        return data["runsOrError"]["results"]

    def materializations(self, asset: str, limit: int = 50) -> list[dict]:
        data = self.query(
            """query($k: AssetKeyInput!, $n: Int) { assetOrError(assetKey: $k) { __typename ... on Asset {
                 assetMaterializations(limit: $n) { partition runId metadataEntries { __typename label
                   ... on IntMetadataEntry { intValue intRepr } ... on FloatMetadataEntry { floatValue }
                   ... on TextMetadataEntry { text } ... on JsonMetadataEntry { jsonString }
                   ... on MarkdownMetadataEntry { mdStr } ... on PathMetadataEntry { path }
                   ... on TableMetadataEntry { table { records schema { columns { name type } } } } } } } } }""",
            k={"path": [asset]}, n=limit,
        )["assetOrError"]
        return data.get("assetMaterializations") or []

    def dry_run(self, kind: str, name: str) -> dict:
        """What the UI's "Test schedule" / "Test sensor" buttons evaluate, in the code server."""
        field, selector_type, key, arg = {
            "schedule": ("scheduleDryRun", "ScheduleSelector", "scheduleName", f"timestamp: {time.time()}"),
            "sensor": ("sensorDryRun", "SensorSelector", "sensorName", "cursor: null"),
        }[kind]
        data = self.query(
            f"""mutation($s: {selector_type}!) {{ {field}(selectorData: $s, {arg}) {{ __typename
                 ... on DryRunInstigationTick {{ evaluationResult {{ skipReason error {{ message }}
                   runRequests {{ runKey assetSelection {{ path }} }} }} }}
                 ... on PythonError {{ message }} }} }}""",
            s=self.selector(**{key: name}),
        )[field]
        assert data["__typename"] == "DryRunInstigationTick", data
        result = data["evaluationResult"]
        assert result["error"] is None, result["error"]
        return result

    def check_executions(self, asset: str, check: str, limit: int = 50) -> list[dict]:
        return self.query(
            """query($k: AssetKeyInput!, $c: String!, $n: Int!) {
                 assetCheckExecutions(assetKey: $k, checkName: $c, limit: $n) {
                   runId status partition evaluation { success description
                     metadataEntries { label ... on TextMetadataEntry { text } } } } }""",
            k={"path": [asset]}, c=check, n=limit,
        )["assetCheckExecutions"]


def tags_of(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["tags"]}


HANDOVER_SECONDS = 0.5


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most (start, end) spans in progress at one moment, HANDOVER_SECONDS after each start.

    The daemon counts a run against its pool until the run's status says it ended; the events
    that close a step land a few hundred milliseconds around that, so a queued run's step can be
    logged as started a moment before the previous step is logged as done. Without a pool all
    four steps (seconds each) would overlap far longer than that.
    """
    return max(sum(1 for s, e in spans if s <= t + HANDOVER_SECONDS < e) for t, _ in spans)


def step_spans(dev, runs: list[dict]) -> list[tuple[float, float]]:
    """When each run's steps executed. A pool limits op executions, not run lifetimes: a run
    gives its slot back when its step ends, a moment before the run itself is marked finished."""
    spans = []
    for r in runs:
        got = dev.query("""query($id: ID!) { runOrError(runId: $id) { ... on Run {
                             stepStats { stepKey startTime endTime } } } }""", id=r["runId"])
        spans += [(s["startTime"], s["endTime"]) for s in got["runOrError"]["stepStats"]]
    return spans


def metadata(mat: dict) -> dict[str, dict]:
    return {e["label"]: e for e in mat["metadataEntries"]}


@pytest.fixture(scope="module")
def dagster_dev(sample_release, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    env = build_env(tmp, sample_release[0], DAGSTER_HOME=str(dagster_home(tmp)),
                    IMNET_NUM_SHARDS=str(NUM_SHARDS), IMNET_WORKERS="1")
    dev = DagsterDev(tmp, env)
    try:
        dev.wait_ready()
        yield tmp, env, dev
    finally:
        dev.stop()


def test_repository_shows_six_assets_the_topup_schedule_and_the_audit_sensor(dagster_dev):
    _, _, dev = dagster_dev
    data = dev.query(
        """query($r: RepositorySelector!) { repositoryOrError(repositorySelector: $r) { __typename ... on Repository {
             assetNodes { assetKey { path } isPartitioned partitionKeysByDimension { partitionKeys }
                          assetChecksOrError { ... on AssetChecks { checks { name blocking } } } }
             schedules { name scheduleState { status } }
             sensors { name sensorState { status } } } }
           instance { info runQueuingSupported runQueueConfig { maxConcurrentRuns }
                      poolConfig { poolGranularity defaultPoolLimit } } }""",
        r=dev.selector(),
    )
    repo = data["repositoryOrError"]
    nodes = {"/".join(n["assetKey"]["path"]): n for n in repo["assetNodes"]}
    assert sorted(nodes) == sorted(ASSETS)
    assert [n for n, v in nodes.items() if v["isPartitioned"]] == ["wds_shards"]
    assert nodes["wds_shards"]["partitionKeysByDimension"][0]["partitionKeys"] == KEYS
    checks = {n: {c["name"]: c["blocking"] for c in v["assetChecksOrError"]["checks"]} for n, v in nodes.items()
              if v["assetChecksOrError"].get("checks")}
    assert checks == {"wds_shards": {"shard_holds_its_plan": True},
                      "shard_audit": {"nothing_lost_or_duplicated": True, "info_json_agrees": True}}
    assert [(s["name"], s["scheduleState"]["status"]) for s in repo["schedules"]] == [("wds_shards_topup", "STOPPED")]
    assert sorted((s["name"], s["sensorState"]["status"]) for s in repo["sensors"]) == [
        ("shard_audit_when_complete", "RUNNING"), ("wds_shards_on_storage", "RUNNING")]
    # the project's dagster.yaml is what the instance runs with
    assert data["instance"]["runQueueConfig"]["maxConcurrentRuns"] == 4
    assert data["instance"]["poolConfig"] == {"poolGranularity": "run", "defaultPoolLimit": POOL_LIMIT}
    info = data["instance"]["info"]
    assert data["instance"]["runQueuingSupported"]  # the QueuedRunCoordinator
    for setting in ("ConsolidatedSqliteEventLogStorage",
                    "free_slots_after_run_end_seconds: 120", "retention:", "max_retries: 1"):
        assert setting in info, info

    def daemons_healthy():
        statuses = dev.query("{ instance { daemonHealth { allDaemonStatuses { daemonType required healthy "
                             "lastHeartbeatErrors { message } } } } }")["instance"]["daemonHealth"]["allDaemonStatuses"]
        sick = [d for d in statuses if d["required"] and not d["healthy"]]
        return statuses if not sick else None

    statuses = dev.wait("every required daemon to report healthy", daemons_healthy, cap=120, every=3)
    assert {"SCHEDULER", "SENSOR", "BACKFILL", "QUEUED_RUN_COORDINATOR", "MONITORING"} <= {
        d["daemonType"] for d in statuses if d["required"]}


def test_backfill_every_shard_then_the_sensor_audits_and_imnet_build_redoes_nothing(dagster_dev):
    tmp, env, dev = dagster_dev
    out = tmp / "out"

    # 1. the four catalog stages, as one run of the implicit asset job
    upstream = dev.wait_run(dev.launch_assets(UPSTREAM), cap=240)
    assert upstream["status"] == "SUCCESS", dev.log_tail()
    assert (out / "_plan" / "_index.json").exists()

    # 2. a partition backfill of every wds_shards partition
    launched = dev.query(
        """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
             __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
             ... on PartitionSetNotFoundError { message } ... on UnauthorizedError { message } } }""",
        p={"partitionNames": KEYS, "assetSelection": [{"path": ["wds_shards"]}], "title": "all shards"},
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    def backfill_done():
        b = dev.query(
            """query($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename
                 ... on PartitionBackfill { status numPartitions
                   runs { runId status startTime endTime tags { key value } } } } }""",
            id=backfill_id,
        )["partitionBackfillOrError"]
        return b if b["status"] not in ("REQUESTED", "CANCELING", "FAILING") else None

    backfill = dev.wait("the backfill to finish", backfill_done, cap=420, every=3)
    assert backfill["status"] in ("COMPLETED_SUCCESS", "COMPLETED"), backfill
    assert backfill["numPartitions"] == NUM_SHARDS
    runs = backfill["runs"]
    assert sorted(tags_of(r)["dagster/partition"] for r in runs) == KEYS
    assert all(r["status"] == "SUCCESS" for r in runs), runs
    # the pool: never more than POOL_LIMIT shard steps at once, though all four runs were queued together
    spans = step_spans(dev, runs)
    assert len(spans) == NUM_SHARDS and all(s and e for s, e in spans), spans
    assert max_overlap(spans) <= POOL_LIMIT, spans
    pool = dev.query('{ instance { concurrencyLimit(concurrencyKey: "imnet_shards") { slotCount } } }')
    assert pool["instance"]["concurrencyLimit"]["slotCount"] == POOL_LIMIT

    # every partition materialized, with what people look at, and its blocking check passed
    stats = dev.query('{ assetNodes(assetKeys: [{path: ["wds_shards"]}]) { partitionStats { '
                      "numMaterialized numPartitions numFailed numMaterializing } } }")
    assert stats["assetNodes"][0]["partitionStats"] == {
        "numMaterialized": NUM_SHARDS, "numPartitions": NUM_SHARDS, "numFailed": 0, "numMaterializing": 0}
    run_ids = {r["runId"] for r in runs}
    mats = [m for m in dev.materializations("wds_shards") if m["runId"] in run_ids]
    assert sorted(m["partition"] for m in mats) == KEYS
    kinds = {"samples": "IntMetadataEntry", "bytes": "IntMetadataEntry", "seconds": "FloatMetadataEntry",
             "images_per_s": "FloatMetadataEntry", "repaired": "IntMetadataEntry", "excluded": "IntMetadataEntry"}
    for m in mats:
        md = metadata(m)
        assert {k: md[k]["__typename"] for k in kinds if k in md} == kinds, md.keys()
        assert md["samples"]["intValue"] > 0 and md["bytes"]["intValue"] > 0
        assert md["images_per_s"]["floatValue"] > 0
        tar = out / f"imagenet12k-train-{m['partition']}.tar"
        assert md["bytes"]["intValue"] == tar.stat().st_size
    checks = [c for c in dev.check_executions("wds_shards", "shard_holds_its_plan") if c["runId"] in run_ids]
    assert len(checks) == NUM_SHARDS
    assert all(c["status"] == "SUCCEEDED" and c["evaluation"]["success"] for c in checks), checks
    judged = [metadata(c["evaluation"])["shard"]["text"] for c in checks]
    assert sorted(judged) == KEYS  # each check result names the shard it judged
    assert all(c["partition"] == metadata(c["evaluation"])["shard"]["text"] for c in checks)  # partitioned

    # 3. the audit sensor (RUNNING by default, 30 s interval) materializes shard_audit once all are in
    def audited():
        done = [r for r in dev.runs(tags=[{"key": "dagster/sensor_name", "value": "shard_audit_when_complete"}])
                if r["status"] in ("SUCCESS", "FAILURE", "CANCELED")]
        return done[0] if done else None

    audit_run = dev.wait("the sensor's shard_audit run", audited, cap=240, every=3)
    assert audit_run["status"] == "SUCCESS", dev.log_tail()
    assert [a["path"] for a in audit_run["assetSelection"]] == [["shard_audit"]]
    for check in ("nothing_lost_or_duplicated", "info_json_agrees"):
        execs = [c for c in dev.check_executions("shard_audit", check) if c["runId"] == audit_run["runId"]]
        assert [(c["status"], c["evaluation"]["success"]) for c in execs] == [("SUCCEEDED", True)], execs
    (mat,) = [m for m in dev.materializations("shard_audit", 5) if m["runId"] == audit_run["runId"]]
    md = metadata(mat)
    for total in ("samples", "shards", "excluded", "repaired", "shard_bytes", "source_bytes"):
        assert md[total]["__typename"] == "IntMetadataEntry", total
    assert md["shards"]["intValue"] == NUM_SHARDS
    reasons = md["exclusion_reasons"]
    assert reasons["__typename"] == "TableMetadataEntry"
    assert {c["name"] for c in reasons["table"]["schema"]["columns"]} >= {"reason", "images"}
    rows = [json.loads(r) for r in reasons["table"]["records"]]
    assert sum(r["images"] for r in rows) == md["excluded"]["intValue"] > 0
    for name, unit in (("class_sizes", "samples"), ("image_short_sides", "px")):  # tables, every bucket labelled
        dist = md[name]
        assert dist["__typename"] == "TableMetadataEntry", dist
        rows = [json.loads(r) for r in dist["table"]["records"]]
        label = dist["table"]["schema"]["columns"][0]["name"]
        assert rows and all(re.fullmatch(rf"\d+(–\d+)? {unit}", r[label]) for r in rows), rows
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == md["samples"]["intValue"]

    # 4. nothing left running; `imnet build` on the same instance finds everything fresh
    dev.wait("the run queue to drain", lambda: not dev.runs(statuses=ACTIVE), cap=120)
    before_runs = len(dev.runs())
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert len(mtimes) == NUM_SHARDS
    build = imnet(["build"], env, cwd=tmp, timeout=int(dev.remaining(300)) or 1)
    assert "0 to build" in build.stdout, build.stdout
    assert f"{NUM_SHARDS} of {NUM_SHARDS} selected shards fresh" in build.stdout, build.stdout
    for stage in UPSTREAM + ["shard_audit"]:
        assert re.search(rf"{stage}\s+fresh, skipped", build.stdout), build.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    assert len(dev.runs()) == before_runs

    # 5. the UI's "Test" buttons: nothing for the schedule to ask for; the sensor (tested with no
    #    cursor) finds the audit already fresh for the shards as they are, so nothing new either; then
    #    one shard goes missing
    topup = dev.dry_run("schedule", "wds_shards_topup")
    assert not topup["runRequests"] and "fresh" in topup["skipReason"], topup
    sensed = dev.dry_run("sensor", "shard_audit_when_complete")
    assert not sensed["runRequests"] and "shard_audit is already fresh" in sensed["skipReason"], sensed
    (out / "imagenet12k-train-0002.tar").unlink()
    topup = dev.dry_run("schedule", "wds_shards_topup")
    assert [(r["runKey"], r["assetSelection"]) for r in topup["runRequests"]] == [
        ("wds_shards-0002", [{"path": ["wds_shards"]}])], topup
    sensed = dev.dry_run("sensor", "shard_audit_when_complete")
    assert not sensed["runRequests"] and "0002" in sensed["skipReason"], sensed


def test_audit_metadata_stays_valid_for_a_release_without_exclusions():
    """Typed tables even when empty (Dagster cannot infer a schema from no records)."""
    from dagster import AssetMaterialization, TableMetadataValue

    from imnet_assets.defs.assets.shard_audit import audit_metadata
    from imnet_assets.stages.audit import AuditReport

    totals = {"raw_images": 3, "kept": 3, "excluded": 0, "samples": 3, "repaired": 0, "shard_bytes": 3 << 31,
              "source_bytes": 0, "shards": 1, "synsets": 1}
    report = AuditReport(totals=totals, reconcile={}, per_shard=[], reasons=[], class_sizes=[], image_sizes=[])
    md = audit_metadata(report)
    AssetMaterialization("shard_audit", metadata=md)  # accepted as event metadata
    for name in ("exclusion_reasons", "per_shard"):
        assert isinstance(md[name], TableMetadataValue) and md[name].records == []
        assert md[name].schema.columns
    assert md["shard_bytes"].value == 3 << 31  # > 32 bit: the UI shows intRepr
    assert md["compression_ratio"].value == 0.0
    assert md["shard_size"].value == "6.0 GiB"  # humanized next to the exact bytes
    for name in ("class_sizes", "image_short_sides"):
        assert isinstance(md[name], TableMetadataValue) and md[name].records == []
