"""Shard runs as containers through Dagster's Docker run launcher, on a real Docker engine.

The sequence is deploy/README.md's "One Docker host", on this machine (tests/dockerhost.py sets
the engine up: Debian's docker.io, a dockerd of the test's own, an offline Debian base image):

1. `deploy/docker/make-context.sh` (sources + wheelhouse), then `docker build --network none` of
   deploy/docker/Dockerfile on the debootstrapped base: the image builds without any network.
2. PostgreSQL (the instance) and moto's S3 server (raw and out buckets) on 127.0.0.1.
3. The catalog stages on the host: `imnet build --shards none` (S3 roots, the catalog in a folder
   that the run containers mount at /catalog).
4. The code server as a container of the image (host network; DAGSTER_CURRENT_IMAGE names the
   image for its runs), and `dagster-daemon run` on the host with deploy/docker/dagster.yaml's
   DockerRunLauncher: host network, this test's CPU and memory sizes, the catalog folder as the
   volume, everything else as the file says.
5. A partition backfill of the 4 wds_shards partitions, launched through Dagster's GraphQL API
   (`dagster-graphql`, as the UI does). The daemon runs each as a container, several at once;
   then the audit sensor launches shard_audit, a container with the catalog volume.

Then: every partition was materialized by a run whose container ran and exited 0; two or more
ran at once; the output passes the local build's checks (`imnet verify`, tests/checks.py); the
secrets (AWS secret key, PostgreSQL password) are in no log, not in the instance (pg_dump of its
database), the catalog, the out bucket or DAGSTER_HOME. A catalog step in a container without
the catalog volume fails at once, with a clear message and no raw read. Containers, the project
image and the dockerd are removed even on failure; the base image's rootfs stays cached.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests import dockerhost
from tests.checks import check_release
from tests.conftest import REPO, build_env, imnet
from tests.integration.test_postgres import (
    create_database,
    free_port,
    overlapping_pairs,
    postgres_bindir,
    postgres_server,
)
from tests.s3server import MotoS3

pytestmark = pytest.mark.docker

SHARDS = ["0000", "0001", "0002", "0003"]
# Names of their own: moto keeps one S3 state per process, and test_s3 (run after this file in the
# same pytest process) builds the same sample release into buckets of its own.
RAW_BUCKET, OUT_BUCKET = "docker-raw-bucket", "docker-out-bucket"
RAW_ROOT, OUT_ROOT = f"s3://{RAW_BUCKET}/winter21", f"s3://{OUT_BUCKET}/wds"
OVERALL_SECONDS = 600
CONTAINER_CATALOG = "/catalog"
LABEL = "imnet-assets.test"


def bin_of(name: str) -> str:
    return shutil.which(name, path=os.path.dirname(sys.executable)) or name


def instance_config(catalog_dir: Path, run_label: str) -> dict:
    """deploy/docker/dagster.yaml with this machine's sizes: host network, 1 CPU and 1 encoder
    process per run container, the catalog folder as the catalog volume, a label for clean-up."""
    config = yaml.safe_load((REPO / "deploy" / "docker" / "dagster.yaml").read_text())
    launcher = config["run_launcher"]["config"]
    assert config["run_launcher"]["module"] == "imnet_assets.defs.launcher", config["run_launcher"]
    launcher["network"] = "host"
    launcher["env_vars"] = [("IMNET_WORKERS=1" if v.startswith("IMNET_WORKERS=") else v) for v in launcher["env_vars"]]
    kwargs = launcher["container_kwargs"]
    kwargs["nano_cpus"] = 1_000_000_000
    kwargs["mem_limit"] = "3g"
    kwargs["volumes"] = {str(catalog_dir): {"bind": CONTAINER_CATALOG, "mode": "rw"}}
    kwargs["labels"] = {LABEL: run_label}
    assert config["concurrency"]["pools"]["default_limit"] >= 2
    return config


class Stack:
    """Everything the test starts, stopped in reverse order by `close()` (also on failure)."""

    def __init__(self):
        self.closers: list = []

    def add(self, fn, *args) -> None:
        self.closers.append((fn, args))

    def close(self) -> list[str]:
        errors = []
        for fn, args in reversed(self.closers):
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - keep cleaning up, report at the end
                errors.append(f"{getattr(fn, '__name__', fn)}: {type(e).__name__}: {e}")
        return errors


def stop_process(proc: subprocess.Popen, grace: float = 30) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for(what: str, probe, deadline: float, every: float = 3, detail=lambda: ""):
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{detail()}")
        time.sleep(every)


def env_file(path: Path, env: dict[str, str], names: list[str]) -> Path:
    """A --env-file for `docker run`: keeps the secrets off command lines (ps, error messages)."""
    path.write_text("".join(f"{n}={env[n]}\n" for n in names))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def docker_run(sample_release, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("docker")
    started = time.monotonic()
    deadline = started + OVERALL_SECONDS
    timings: dict[str, float] = {}
    run_label = uuid.uuid4().hex[:12]
    image = f"imnet-assets:test-{run_label}"
    secret = f"imnetDockerSecret-{uuid.uuid4().hex}"
    pg_password = f"pg-{uuid.uuid4().hex}"
    stack = Stack()
    outputs: dict[str, str] = {}
    try:
        dockerhost.ensure_tools()
        postgres_bindir()  # fails with what to install, before anything slow
        engine = dockerhost.Dockerd().start()
        stack.add(engine.stop)

        def remove_containers_and_image():
            """On an engine that was already running: this test's containers and image go, the
            cached base image stays. An engine this test started goes whole (engine.stop)."""
            if engine.owned:
                return
            ids = engine.docker("ps", "-aq", "--filter", f"label={LABEL}={run_label}").stdout.split()
            if ids:
                engine.docker("rm", "-f", *ids)
            engine.docker("rmi", "-f", image)

        stack.add(remove_containers_and_image)

        # 1. the image, offline. The base image (debootstrap on a cold cache) and the wheelhouse
        # (pip wheel when pyproject.toml changed) both wait on the network: made side by side.
        with ThreadPoolExecutor(2) as pool:
            base_made, context_made = pool.submit(dockerhost.base_image, engine), pool.submit(dockerhost.build_context)
            base, context = base_made.result(), context_made.result()
        timings["base image and build context"] = time.monotonic() - started
        built = engine.docker("build", "--network", "none", "--build-arg", f"BASE_IMAGE={base}", "-t", image,
                              str(context), timeout=max(60, deadline - time.monotonic()))
        outputs["docker build"] = built.stdout + built.stderr
        timings["docker build"] = time.monotonic() - started

        # 2. PostgreSQL and S3 on 127.0.0.1
        pg = stack_enter(stack, postgres_server(pg_password))
        host, port, user = pg
        create_database(host, port, user, pg_password, "dagster_imnet")
        s3 = stack_enter(stack, MotoS3(secret=secret))
        client = s3.client()
        MotoS3.fresh_buckets(client, RAW_BUCKET, OUT_BUCKET)  # moto's state outlives a server
        s3.put_tree(client, sample_release[0], RAW_BUCKET, "winter21")

        # 3. the catalog stages on the host; the catalog folder is the run containers' volume
        home = tmp / "dagster_home"
        home.mkdir()
        catalog_dir = tmp / "catalog"
        catalog_dir.mkdir()
        (home / "dagster.yaml").write_text(yaml.safe_dump(instance_config(catalog_dir, run_label), sort_keys=False))
        pg_env = {"DAGSTER_PG_HOST": host, "DAGSTER_PG_PORT": str(port), "DAGSTER_PG_DB": "dagster_imnet",
                  "DAGSTER_PG_USERNAME": user, "DAGSTER_PG_PASSWORD": pg_password}
        env = build_env(tmp, RAW_ROOT, IMNET_OUT_ROOT=OUT_ROOT, IMNET_NUM_SHARDS=str(len(SHARDS)),
                        IMNET_CATALOG=str(catalog_dir / "catalog.duckdb"), IMNET_WORKERS="1", IMNET_SEED="0",
                        DAGSTER_HOME=str(home), **pg_env)
        for k in [k for k in env if k.startswith("AWS_")]:
            del env[k]
        env.update(s3.env())
        env["DOCKER_HOST"] = engine.host
        # deploy/docker: sized for 1,024 partitions (see deploy/README.md)
        env.update(DAGSTER_SCHEDULE_GRPC_TIMEOUT_SECONDS="300", DAGSTER_SENSOR_GRPC_TIMEOUT_SECONDS="300")
        first = imnet(["build", "--shards", "none"], env, cwd=tmp, timeout=300)
        timings["catalog stages on the host"] = time.monotonic() - started
        outputs["imnet build --shards none"] = first.stdout + first.stderr
        subprocess.run(["chown", "-R", "10001:10001", str(catalog_dir)], check=True)

        # A catalog step in a container without the catalog volume: fails at once, reads no raw image.
        names = [n for n in env if n.startswith(("AWS_", "IMNET_", "DAGSTER_PG_"))]
        container_env = {**env, "IMNET_CATALOG": f"{CONTAINER_CATALOG}/catalog.duckdb"}
        envs = env_file(tmp / "run.env", container_env, names)
        mark = s3.mark()
        unmounted = engine.docker("run", "--name", f"imnet-unmounted-{run_label}", "--label", f"{LABEL}={run_label}",
                                  "--network", "host", "--env-file", str(envs), "-e", "DAGSTER_HOME=/tmp", image,
                                  "imnet", "build", "--shards", "none", check=False, timeout=300)
        unmounted_requests = s3.since(mark)
        outputs["imnet build in a container without the catalog volume"] = unmounted.stdout + unmounted.stderr

        # 4. the code server (a container of the image) and the daemon (on the host)
        grpc_port = free_port()
        code = engine.docker(
            "run", "-d", "--name", f"imnet-code-{run_label}", "--label", f"{LABEL}={run_label}", "--network", "host",
            "--env-file", str(envs), "-e", f"DAGSTER_CURRENT_IMAGE={image}", image,
            "dagster", "api", "grpc", "-h", "127.0.0.1", "-p", str(grpc_port), "-m", "imnet_assets.definitions", "-a", "defs",
        ).stdout.strip()

        def code_server_up():
            health = subprocess.run([bin_of("dagster"), "api", "grpc-health-check", "-p", str(grpc_port)],
                                    capture_output=True, text=True, timeout=60)
            return health.returncode == 0

        wait_for("the code server container", code_server_up, min(deadline, time.monotonic() + 180),
                 detail=lambda: engine.docker("logs", code, check=False).stderr[-3000:])
        workspace = tmp / "workspace.yaml"
        workspace.write_text(yaml.safe_dump({"load_from": [{"grpc_server": {
            "host": "127.0.0.1", "port": grpc_port, "location_name": "imnet_assets"}}]}))
        daemon_log = tmp / "daemon.log"
        with open(daemon_log, "wb") as log:
            daemon = subprocess.Popen([bin_of("dagster-daemon"), "run", "-w", str(workspace)], cwd=tmp, env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        stack.add(stop_process, daemon)

        # 5. the backfill, as the UI launches it
        mutation = """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
            __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message stack } } }"""
        launched = subprocess.run(
            [bin_of("dagster-graphql"), "-w", str(workspace), "-t", mutation, "-v",
             json.dumps({"p": {"partitionNames": SHARDS, "assetSelection": [{"path": ["wds_shards"]}],
                               "title": "docker test"}})],
            cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
        outputs["dagster-graphql launchPartitionBackfill"] = launched.stdout + launched.stderr
        answer = json.loads(launched.stdout[launched.stdout.index("{"):])
        result = answer["data"]["launchPartitionBackfill"]
        assert result["__typename"] == "LaunchBackfillSuccess", result
        backfill_id = result["backfillId"]

        from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter

        with pytest.MonkeyPatch.context() as mp:
            for k in ("DAGSTER_HOME", "DOCKER_HOST", *pg_env):
                mp.setenv(k, env[k])
            with DagsterInstance.get() as instance:
                def detail():
                    return (daemon_log.read_text(errors="replace")[-5000:]
                            + engine.docker("ps", "-a", check=False).stdout)

                def backfill_runs_done():
                    records = instance.get_run_records(RunsFilter(tags={"dagster/backfill": backfill_id}))
                    if len(records) >= len(SHARDS) and all(r.dagster_run.is_finished for r in records):
                        return records
                    return None

                shard_records = wait_for("the 4 shard runs", backfill_runs_done, deadline, detail=detail)
                timings["shard runs done"] = time.monotonic() - started

                def audited():
                    event = instance.get_latest_materialization_event(AssetKey("shard_audit"))
                    if event is None:
                        failed = instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.FAILURE]))
                        assert not failed, [(r.dagster_run.run_id, r.dagster_run.tags) for r in failed]
                    return event

                audit_event = wait_for("the audit sensor's shard_audit run", audited, deadline, every=5, detail=detail)
                wait_for("the audit run to finish", lambda: instance.get_run_by_id(audit_event.run_id).is_finished,
                         deadline, every=2, detail=detail)
                audit_record = instance.get_run_records(RunsFilter(run_ids=[audit_event.run_id]))[0]
                materialized = instance.get_materialized_partitions(AssetKey("wds_shards"))
                shard_materializations = [
                    (r.partition_key, r.run_id)
                    for r in instance.fetch_materializations(AssetKey("wds_shards"), limit=100).records
                ]
        timings["audit done"] = time.monotonic() - started
        stop_process(daemon)
        outputs["dagster-daemon"] = daemon_log.read_text(errors="replace")

        containers = {r.dagster_run.run_id: r.dagster_run.tags.get("docker/container_id")
                      for r in [*shard_records, audit_record]}
        inspected = {run_id: dockerhost.inspect(engine, cid)[0] for run_id, cid in containers.items() if cid}
        for run_id, cid in containers.items():
            if cid:
                logs = engine.docker("logs", cid, check=False)
                outputs[f"run container {run_id}"] = logs.stdout + logs.stderr
        logs = engine.docker("logs", code, check=False)
        outputs["code server container"] = logs.stdout + logs.stderr

        # the output, as a user checks a build
        verify = imnet(["verify"], env, cwd=tmp, check=False, timeout=300)
        outputs["imnet verify"] = verify.stdout + verify.stderr
        objects = MotoS3.all_objects(client, OUT_BUCKET)
        out = tmp / "out_download"
        MotoS3.download(objects, "wds/", out)
        dump = subprocess.run(
            [str(postgres_bindir() / "pg_dump"), "-h", host, "-p", str(port), "-U", user, "dagster_imnet"],
            env={**os.environ, "PGPASSWORD": pg_password}, capture_output=True, text=True, timeout=120)
        assert dump.returncode == 0, dump.stderr
        yield SimpleNamespace(
            tmp=tmp, env=env, engine=engine, image=image, secrets=[secret, pg_password], outputs=outputs,
            shard_records=shard_records, audit_record=audit_record, inspected=inspected, containers=containers,
            materialized=materialized, shard_materializations=shard_materializations,
            verify=verify, objects=objects, out=out, catalog=catalog_dir / "catalog.duckdb", home=home,
            instance_dump=dump.stdout, unmounted=unmounted, unmounted_requests=unmounted_requests,
            summary=sample_release[1],
        )
    finally:
        errors = stack.close()
        timings["cleaned up"] = time.monotonic() - started
        print("docker test, seconds from the start:", json.dumps({k: round(v) for k, v in timings.items()}))
        if errors:
            print("docker test clean-up problems:", *errors, sep="\n  ")


def stack_enter(stack: Stack, cm):
    value = cm.__enter__()
    stack.add(cm.__exit__, None, None, None)
    return value


def test_every_shard_partition_was_built_by_a_run_container(docker_run):
    assert docker_run.materialized == set(SHARDS)
    runs = docker_run.shard_records
    assert sorted(r.dagster_run.tags["dagster/partition"] for r in runs) == SHARDS, "one run per partition"
    for r in runs:
        run = r.dagster_run
        assert run.is_success, (run.tags["dagster/partition"], run.status)
        cid = run.tags.get("docker/container_id")
        assert cid, f"run {run.run_id} has no container id: not launched by the DockerRunLauncher"
        state = docker_run.inspected[run.run_id]
        assert state["Config"]["Image"] == docker_run.image
        assert state["Config"]["Labels"]["dagster/run_id"] == run.run_id
        assert state["State"]["Status"] == "exited" and state["State"]["ExitCode"] == 0, state["State"]
        assert state["HostConfig"]["NetworkMode"] == "host"
        assert state["Config"]["Cmd"][:3] == ["dagster", "api", "execute_run"], state["Config"]["Cmd"][:3]
    # each partition's materialization came from that partition's container run, and only from it
    by_partition = {r.dagster_run.tags["dagster/partition"]: r.dagster_run.run_id for r in runs}
    assert sorted(docker_run.shard_materializations) == sorted(by_partition.items())


def test_shard_containers_ran_at_once(docker_run):
    spans = {r.dagster_run.tags["dagster/partition"]: (r.start_time, r.end_time) for r in docker_run.shard_records}
    assert all(s and e for s, e in spans.values()), spans
    pairs = overlapping_pairs(spans)
    assert pairs, f"no two shard runs overlapped: {spans}"
    # the containers' own clocks agree: two were running at the same moment
    from datetime import datetime

    def t(stamp: str) -> float:
        return datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp()

    states = {r.dagster_run.tags["dagster/partition"]: docker_run.inspected[r.dagster_run.run_id]["State"]
              for r in docker_run.shard_records}
    container_spans = {k: (t(s["StartedAt"]), t(s["FinishedAt"])) for k, s in states.items()}
    assert overlapping_pairs(container_spans), container_spans


def test_the_audit_ran_in_a_container_with_the_catalog_volume(docker_run):
    run = docker_run.audit_record.dagster_run
    assert run.is_success, run.status
    state = docker_run.inspected[run.run_id]
    assert state["State"]["ExitCode"] == 0
    mounts = {m["Destination"]: m for m in state["Mounts"]}
    assert mounts[CONTAINER_CATALOG]["Source"] == str(docker_run.catalog.parent), mounts
    assert "shard_audit" in docker_run.outputs[f"run container {run.run_id}"]


def test_output_passes_the_local_build_checks(docker_run):
    assert docker_run.verify.returncode == 0, docker_run.outputs["imnet verify"]
    assert f"verify: {len(SHARDS)} of {len(SHARDS)} shards ok" in docker_run.verify.stdout
    check_release(docker_run.out, docker_run.catalog, docker_run.summary.wnids, len(SHARDS))
    info = json.loads(docker_run.objects["wds/_info.json"])
    import duckdb

    with duckdb.connect(str(docker_run.catalog), read_only=True) as con:
        kept = con.execute("SELECT count(*) FROM shard_samples").fetchone()[0]
        planned = con.execute("SELECT count(*) FROM plan").fetchone()[0]
    assert info["splits"]["train"]["num_samples"] == kept == planned


def test_no_secret_in_logs_instance_catalog_or_output(docker_run):
    places = dict(docker_run.outputs)
    places["instance (pg_dump of the Dagster database)"] = docker_run.instance_dump
    places["catalog"] = docker_run.catalog.read_bytes().decode("latin-1")
    for key, data in docker_run.objects.items():
        places[f"s3://{OUT_BUCKET}/{key}"] = data.decode("latin-1")
    for p in docker_run.home.rglob("*"):
        if p.is_file():
            places[f"DAGSTER_HOME/{p.relative_to(docker_run.home)}"] = p.read_bytes().decode("latin-1")
    assert len(places) > 10
    for secret in docker_run.secrets:
        leaks = [name for name, text in places.items() if secret in text]
        assert not leaks, f"a secret appears in: {leaks}"
    # and the instance did record the runs (the dump is not empty)
    assert all(r.dagster_run.run_id in docker_run.instance_dump for r in docker_run.shard_records)


def test_a_catalog_step_without_the_catalog_volume_fails_at_once(docker_run):
    out = docker_run.outputs["imnet build in a container without the catalog volume"]
    assert docker_run.unmounted.returncode != 0, out
    assert "the catalog volume is not mounted at /catalog" in out, out
    raw_reads = [r for r in docker_run.unmounted_requests if r.bucket == RAW_BUCKET and r.method == "GET" and r.key]
    assert not raw_reads, f"the container read raw objects before failing: {raw_reads[:5]}"
    writes = [r for r in docker_run.unmounted_requests if r.method in ("PUT", "POST", "DELETE")]
    assert not writes, writes


def test_a_missing_launcher_variable_fails_the_launch_with_every_name(tmp_path, monkeypatch):
    """deploy/docker/dagster.yaml's env_vars against a daemon environment without two of them."""
    from dagster import DagsterInstance, DagsterRun
    from dagster._core.launcher import LaunchRunContext

    from imnet_assets.defs.launcher import LauncherEnvironmentError

    home = tmp_path / "home"
    home.mkdir()
    config = yaml.safe_load((REPO / "deploy" / "docker" / "dagster.yaml").read_text())
    (home / "dagster.yaml").write_text(yaml.safe_dump({"run_launcher": config["run_launcher"]}))
    names = [v for v in config["run_launcher"]["config"]["env_vars"] if "=" not in v]
    for name in names:
        monkeypatch.setenv(name, "x")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("IMNET_OUT_ROOT")
    # Nothing may reach Docker: a launch that got that far would fail on this socket instead.
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        assert type(instance.run_launcher).__module__ == "imnet_assets.defs.launcher"
        run = instance.add_run(DagsterRun(job_name="wds_shards_job", run_id=uuid.uuid4().hex))
        with pytest.raises(LauncherEnvironmentError) as failed:
            instance.run_launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    message = str(failed.value)
    assert "AWS_SECRET_ACCESS_KEY, IMNET_OUT_ROOT are named in the run launcher's env_vars" in message
    assert "dagster-daemon" in message


def test_catalog_writer_needs_the_declared_volume_mounted(tmp_path):
    """imnet_assets/storage/catalog.py's guard, on this host: a note names the volume, as the image's does."""
    from imnet_assets.storage.catalog import Catalog, CatalogVolumeMissing, check_catalog_volume

    note = tmp_path / "catalog-volume"
    folder = tmp_path / "catalog"
    folder.mkdir()
    note.write_text(f"{folder}\n")
    with pytest.raises(CatalogVolumeMissing, match=f"the catalog volume is not mounted at {folder}"):
        check_catalog_volume(str(folder / "catalog.duckdb"), note)
    with pytest.raises(CatalogVolumeMissing, match="is not on the catalog volume"):
        check_catalog_volume(str(tmp_path / "elsewhere" / "catalog.duckdb"), note)
    assert not list(folder.iterdir()) and not (tmp_path / "elsewhere").exists()
    note.write_text("/\n")  # the root is always a mount point: allowed
    check_catalog_volume("/catalog.duckdb", note)
    # Without a note (this host, any machine not running the image) nothing changes.
    with Catalog(str(tmp_path / "plain" / "catalog.duckdb")):
        pass
    assert (tmp_path / "plain" / "catalog.duckdb").exists()
