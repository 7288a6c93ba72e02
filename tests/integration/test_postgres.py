"""A 4-shard build on a real PostgreSQL-backed Dagster instance (deploy/dagster.yaml), with shard runs
in concurrent processes, as on several machines sharing one instance.

PostgreSQL comes from Debian's packages (/usr/lib/postgresql/<version>/bin; `.ci/run` installs
them). A server is started for the test on 127.0.0.1 with a free port, password authentication
over TCP, and its socket in its own folder; it is stopped in a `finally`. No PostgreSQL: the test
fails (it never skips).

Sequence: `imnet build --shards 0000` (upstream stages and shard 0000), then
`dagster asset materialize --select wds_shards --partition 000N` for 0001-0003 as three processes
at once (what each worker machine runs), then `imnet build` (the audit, the catalog's one writer).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pytest

from tests.checks import catalog, check_release
from tests.conftest import REPO, build_env, imnet

SHARDS = ["0000", "0001", "0002", "0003"]
CONCURRENT = SHARDS[1:]
LOCK_ERROR = re.compile(r"conflicting lock|could not set lock|\block\b", re.IGNORECASE)


def postgres_bindir() -> Path:
    """Debian's newest /usr/lib/postgresql/<version>/bin, else initdb/pg_ctl on PATH."""
    found = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "initdb").exists()]
    if found:
        return max(found, key=lambda p: float(p.parent.name) if p.parent.name.replace(".", "").isdigit() else 0)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    pytest.fail(
        "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb or initdb on PATH): "
        "install Debian's `postgresql` package (.ci/run does: apt-get install postgresql)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server(password: str):
    """A throwaway PostgreSQL: yields (host, port, user); stopped and deleted afterwards.

    As root the server runs as the `postgres` user (it refuses root), in a folder under /tmp
    owned by that user (pytest's tmp folders are private to root).
    """
    bindir = postgres_bindir()
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root but there is no `postgres` user to run the server as")
        runuser = shutil.which("runuser")
        as_user = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]
    base = Path(tempfile.mkdtemp(prefix="imnet-pg-", dir="/tmp"))
    data, sock, log, pwfile = base / "data", base / "sock", base / "server.log", base / "pwfile"
    sock.mkdir()
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if owner:
        for p in (base, sock, pwfile):
            os.chown(p, owner.pw_uid, owner.pw_gid)

    def run(*cmd: str) -> subprocess.CompletedProcess:
        argv = [str(c) for c in cmd]
        if as_user and as_user[0] == "su":
            argv = [*as_user, " ".join(f"'{a}'" for a in argv)]
        else:
            argv = [*as_user, *argv]
        proc = subprocess.run(argv, cwd=base, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n{server_log}")
        return proc

    port = free_port()
    started = False
    try:
        run(bindir / "initdb", "-D", data, "-U", "imnet", f"--pwfile={pwfile}", "--auth-host=scram-sha-256",
            "--auth-local=trust", "-E", "UTF8", "--locale=C", "--no-sync")
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off -c max_connections=200"
        run(bindir / "pg_ctl", "-D", data, "-l", log, "-o", opts, "-w", "-t", "60", "start")
        started = True
        yield "127.0.0.1", port, "imnet"
    finally:
        if started:
            run(bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(base, ignore_errors=True)


def create_database(host: str, port: int, user: str, password: str, name: str) -> None:
    import psycopg2

    con = psycopg2.connect(host=host, port=port, user=user, password=password, dbname="postgres")
    try:
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        con.close()


def overlapping_pairs(spans: dict[str, tuple[float, float]]) -> list[tuple[str, str]]:
    keys = sorted(spans)
    return [
        (a, b) for i, a in enumerate(keys) for b in keys[i + 1:]
        if max(spans[a][0], spans[b][0]) < min(spans[a][1], spans[b][1])
    ]


def test_concurrent_shard_runs_on_a_postgres_instance(sample_release, tmp_path, monkeypatch):
    password = f"pg-{uuid.uuid4().hex}"
    with postgres_server(password) as (host, port, user):
        create_database(host, port, user, password, "dagster_imnet")
        home = tmp_path / "dagster_home"
        home.mkdir()
        shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
        pg_env = {
            "DAGSTER_PG_HOST": host, "DAGSTER_PG_PORT": str(port), "DAGSTER_PG_DB": "dagster_imnet",
            "DAGSTER_PG_USERNAME": user, "DAGSTER_PG_PASSWORD": password,
        }
        # One encoder process per shard run: the runs themselves are the parallelism here.
        env = build_env(tmp_path, sample_release[0], DAGSTER_HOME=str(home), IMNET_WORKERS="1", **pg_env)

        outputs: dict[str, str] = {}
        first = imnet(["build", "--shards", "0000"], env)
        outputs["imnet build --shards 0000"] = first.stdout + first.stderr

        dagster = shutil.which("dagster", path=os.path.dirname(sys.executable)) or "dagster"
        # While the shard runs go, this process holds the catalog's write lock: a shard run that
        # opened the catalog at all (even read-only) would fail on DuckDB's lock.
        holder = duckdb.connect(str(tmp_path / "catalog.duckdb"))
        try:
            procs = {
                key: subprocess.Popen(
                    [dagster, "asset", "materialize", "-m", "imnet_assets.definitions", "--select", "wds_shards",
                     "--partition", key],
                    env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                )
                for key in CONCURRENT
            }
            deadline = time.monotonic() + 900
            for key, proc in procs.items():
                out, _ = proc.communicate(timeout=max(1, deadline - time.monotonic()))
                outputs[f"dagster asset materialize --partition {key}"] = out
                assert proc.returncode == 0, f"shard run {key} exited {proc.returncode}\n{out[-4000:]}"
        finally:
            holder.close()

        last = imnet(["build"], env)
        outputs["imnet build"] = last.stdout + last.stderr
        assert "3 of 4 selected shards fresh" not in last.stdout  # all four were fresh: nothing rebuilt
        assert "0 to build" in last.stdout, last.stdout
        assert "shard_audit      ok" in last.stdout, last.stdout

        for name, text in outputs.items():
            hits = [m.group(0) for m in LOCK_ERROR.finditer(text)]
            assert not hits, f"{name}: DuckDB lock errors {hits}\n{text[-3000:]}"
            assert password not in text, f"{name}: the PostgreSQL password is in the output"

        from dagster import AssetCheckKey, AssetKey, DagsterInstance, RunsFilter

        monkeypatch.setenv("DAGSTER_HOME", str(home))
        for k, v in pg_env.items():
            monkeypatch.setenv(k, v)
        with DagsterInstance.get() as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
            assert instance.get_materialized_partitions(AssetKey("wds_shards")) == set(SHARDS)
            for asset in ("raw_tars", "synset_manifest", "filtered_index", "shuffled_plan", "shard_audit"):
                assert instance.get_latest_materialization_event(AssetKey(asset)) is not None, asset

            spans, run_ids = {}, {}
            for key in CONCURRENT:
                records = instance.get_run_records(RunsFilter(tags={"dagster/partition": key}))
                assert len(records) == 1, (key, [r.dagster_run.status for r in records])
                rec = records[0]
                assert rec.dagster_run.is_success, (key, rec.dagster_run.status)
                spans[key] = (rec.start_time, rec.end_time)
                run_ids[key] = rec.dagster_run.run_id
            assert overlapping_pairs(spans), f"shard runs did not overlap in time: {spans}"

            checks = instance.event_log_storage.get_latest_asset_check_execution_by_key([
                AssetCheckKey(AssetKey("shard_audit"), "nothing_lost_or_duplicated"),
                AssetCheckKey(AssetKey("shard_audit"), "info_json_agrees"),
            ])
            assert len(checks) == 2
            for key, record in checks.items():
                evaluation = record.event.dagster_event.event_specific_data
                assert evaluation.passed, (key, evaluation.description)

        # The catalog's shard facts came from the manifests of the concurrent runs.
        with catalog(tmp_path / "catalog.duckdb") as con:
            recorded = dict(con.execute("SELECT shard, run_id FROM shards").fetchall())
        assert {k: recorded[k] for k in CONCURRENT} == run_ids
        check_release(tmp_path / "out", tmp_path / "catalog.duckdb", sample_release[1].wnids, len(SHARDS))
