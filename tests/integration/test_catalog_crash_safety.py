"""Crash safety of the catalog stages, with `imnet build` run as a real process and SIGKILLed.

A release of 200 synset tars is indexed with small commits (IMNET_INDEX_BATCH_ROWS=40), and the
build is killed at several moments inside filtered_index: before its first commit, after a few,
after many. After each kill the catalog holds only whole tars (every tar recorded as scanned has
exactly the images rows its header walk counted). Another build is killed inside the audit. A
normal build then finishes, and its catalog and shards are exactly an undisturbed build's: no
member lost (the bug this guards against: a tar recorded as scanned before its rows were loaded).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from imnet_assets.sample.sample_raw import write_sample_raw
from tests.conftest import build_env, imnet

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sends SIGKILL")

SYNSETS, IMAGES = 200, 2
# What the catalog must hold after the final build, table by table, as an undisturbed build has it
# (run ids and times aside).
TABLES = {
    "raw_tars": "SELECT * FROM raw_tars ORDER BY tar",
    "tar_scans": "SELECT * FROM tar_scans ORDER BY tar",
    "synsets": "SELECT * FROM synsets ORDER BY wnid",
    "images": "SELECT * FROM images ORDER BY tar, \"offset\", key",
    "plan": "SELECT * FROM plan ORDER BY shard, position",
    "shards": "SELECT shard, path, num_samples, planned, bytes, sha256, fingerprint, plan_digest, code_version "
              "FROM shards ORDER BY shard",
    "shard_samples": "SELECT * FROM shard_samples ORDER BY shard, position",
    "shard_exclusions": "SELECT * FROM shard_exclusions ORDER BY shard, position",
}


@pytest.fixture(scope="module")
def many_tars(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw200")
    write_sample_raw(root, synsets=SYNSETS, images=IMAGES, seed=3)
    return root


def env_for(tmp: Path, raw: Path) -> dict:
    return build_env(tmp, raw, IMNET_INDEX_BATCH_ROWS="40")


@pytest.fixture(scope="module")
def reference(many_tars, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("undisturbed")
    imnet(["build"], env_for(tmp, many_tars), cwd=tmp)
    return tmp


def tables(catalog: Path) -> dict[str, list[tuple]]:
    with duckdb.connect(str(catalog), read_only=True) as con:
        return {name: con.execute(q).fetchall() for name, q in TABLES.items()}


def whole_tars_only(catalog: Path) -> int:
    """Asserts every tar recorded as scanned has exactly its counted rows; returns how many are."""
    with duckdb.connect(str(catalog), read_only=True) as con:
        bad = con.execute("""
            SELECT s.tar, s.num_records, r.num_members, (SELECT count(*) FROM images i WHERE i.tar = s.tar)
            FROM tar_scans s LEFT JOIN raw_tars r USING (tar)
            WHERE s.num_records <> (SELECT count(*) FROM images i WHERE i.tar = s.tar)
               OR r.num_members IS DISTINCT FROM s.num_records""").fetchall()
        orphans = con.execute("SELECT count(*) FROM images WHERE tar NOT IN (SELECT tar FROM tar_scans)").fetchone()[0]
        scanned = con.execute("SELECT count(*) FROM tar_scans").fetchone()[0]
    assert not bad, f"tars recorded as scanned without all their rows: {bad[:5]}"
    assert orphans == 0, f"{orphans} images rows of tars not recorded as scanned"
    return scanned


def start(env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    exe = shutil.which("imnet", path=os.path.dirname(sys.executable)) or "imnet"
    with open(log, "ab") as out:
        return subprocess.Popen([exe, "build"], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_when(proc: subprocess.Popen, log: Path, ready, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"imnet build ended ({proc.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()}")
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wal_bytes(catalog: Path) -> int:
    try:
        return os.path.getsize(f"{catalog}.wal")
    except FileNotFoundError:
        return 0


def test_kill_9_inside_filtered_index_and_the_audit_loses_nothing(many_tars, reference, tmp_path):
    env = env_for(tmp_path, many_tars)
    catalog, log = tmp_path / "catalog.duckdb", tmp_path / "build.log"
    scanned_after_kills = []

    # 1. Right as filtered_index starts (the synset stage has been printed): before its first commit.
    proc = start(env, tmp_path, log)
    kill_when(proc, log, lambda: "synset_manifest  materialized" in log.read_text(), "filtered_index to start")
    scanned_after_kills.append(whole_tars_only(catalog))

    # 2. and 3. After the first commits of the next attempt, then after several of a third. Each
    # stage closes the catalog (which empties its write-ahead log), so the log's growth once the
    # synset stage is done is the index's commits.
    for grown in (0, 30_000):
        proc = start(env, tmp_path, log)
        seen = log.read_text().count("synset_manifest  ")
        kill_when(proc, log, lambda seen=seen, grown=grown: log.read_text().count("synset_manifest  ") > seen
                  and wal_bytes(catalog) > grown, f"the index to commit {grown} bytes")
        scanned_after_kills.append(whole_tars_only(catalog))
    assert any(0 < n < SYNSETS for n in scanned_after_kills), (
        f"no kill landed between two commits of the index (tars committed: {scanned_after_kills})")
    assert scanned_after_kills[-1] < SYNSETS, "the index finished before the last kill: nothing was tested"

    # 4. Inside the audit: once the last shard is reported, the audit is what runs.
    proc = start(env, tmp_path, log)
    kill_when(proc, log, lambda: "[4/4] shard" in log.read_text() or "4 of 4 selected shards fresh" in log.read_text(),
              "the audit to start")
    whole_tars_only(catalog)

    # A normal build finishes the job: exactly the undisturbed build's catalog and shards.
    out = imnet(["build"], env, cwd=tmp_path).stdout
    assert "shard_audit      ok" in out, out
    assert whole_tars_only(catalog) == SYNSETS
    want, got = tables(reference / "catalog.duckdb"), tables(catalog)
    for name in TABLES:
        assert got[name] == want[name], f"table {name} differs from an undisturbed build's"
    with duckdb.connect(str(catalog), read_only=True) as con:
        members = con.execute("SELECT sum(num_members) FROM raw_tars").fetchone()[0]
    assert members == SYNSETS * IMAGES == len(got["images"])
    for name in sorted(os.listdir(reference / "out")):
        path = reference / "out" / name
        if path.is_file() and name.endswith((".tar", ".json")) and not name.startswith("_"):
            assert (tmp_path / "out" / name).read_bytes() == path.read_bytes(), name
    assert (tmp_path / "out" / "_info.json").read_bytes() == (reference / "out" / "_info.json").read_bytes()
    assert imnet(["verify"], env, cwd=tmp_path).stdout.strip().endswith("4 of 4 shards ok")
