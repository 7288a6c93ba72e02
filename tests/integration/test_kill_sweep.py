"""A sweep: `imnet build` stopped at every moment it has, each rerun made whole.

A fresh build (new out root, catalog and DAGSTER_HOME) of a small sample release is stopped right
after each *event* of its life, not at a wall-clock time: each line it prints (the instance
line, each catalog stage's, "shard runs at once", a shard's, the audit's) and a few file-system
events (the Dagster home's event_log.db appears, the catalog's .wal appears, a shard run's
lease appears, a shard's temporary file appears). Stopped with:

- kill -9 to the whole process group (OOM, a lost pod): no process of it is left;
- SIGTERM to the main process only (`docker stop`, a preempted pod), two shard runs in threads
  as on 2 cores: it ends within 30 s with exit 130 saying "imnet: interrupted" (or 0 when it had
  already finished; always 0, with no traceback, once the audit's line is printed: its work was
  done and recorded), and no process of it is left.

After each stop every file at a final shard path is a whole shard; then `imnet build` on the
same out root, catalog and DAGSTER_HOME exits 0 with "shard_audit      ok", shards and
`_info.json` byte-identical to an undisturbed build's, the same catalog row counts, no
temporary file, no lease and no run left in flight.

A second `imnet build` of the same out root started right after a few of those events refuses
naming the first, or finds everything built; the first ends ok; nothing is corrupted.

27 moments, about 2 minutes and a quarter on 2 cores (each costs a build and a half of 28 images).

SPEC "Failure behaviour": any stage killed at any moment, then rerun, gives the same catalog and
shards as an undisturbed build; SIGTERM stops a build as Ctrl-C does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from imnet_assets.sample.sample_raw import write_sample_raw
from tests.conftest import build_env, dagster_home, imnet
from tests.integration.test_concurrent_builds import REFUSED, holds_a_lock_on, shard_runs
from tests.integration.test_crash_safety import (
    TMP_SHARD,
    assert_final_shards_complete,
    assert_identical,
    cmdlines,
    group_members,
    start_build,
    temp_files,
    wait_for,
    wait_gone,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, sends signals")


@pytest.fixture(scope="module")
def small_release(tmp_path_factory) -> Path:
    """3 synsets x 12 images: every quirk of the sample release (exclusions, a repair) in 28 kept
    images, so every stage runs and a build takes seconds."""
    root = tmp_path_factory.mktemp("raw-small")
    write_sample_raw(root, synsets=3, images=12, seed=0)
    return root


def sweep_env(tmp: Path, raw: Path) -> dict[str, str]:
    return build_env(tmp, raw, DAGSTER_HOME=str(dagster_home(tmp)), IMNET_PARALLEL_SHARDS="2", IMNET_WORKERS="2")

# Tables whose row counts must equal the clean build's. `stages` (one row per stage and run)
# is not among them: a stage killed after its run began legitimately leaves its own row.
COUNTED = ["raw_tars", "tar_scans", "synsets", "release_synsets", "images", "duplicate_groups", "plan",
           "staged_images", "shards", "shard_samples", "shard_exclusions"]


def catalog_counts(path: Path) -> dict:
    with duckdb.connect(str(path), read_only=True) as con:
        counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in COUNTED}
        counts["images by status"] = sorted(
            con.execute("SELECT status, count(*), count(*) FILTER (repaired) FROM images GROUP BY 1").fetchall())
        counts["exclusion reasons"] = sorted(
            con.execute("SELECT reason, count(*) FROM images WHERE status = 'excluded' GROUP BY 1").fetchall())
    return counts


@pytest.fixture(scope="module")
def clean(small_release, tmp_path_factory) -> tuple[Path, dict]:
    """An undisturbed build: its out folder and catalog counts."""
    tmp = tmp_path_factory.mktemp("clean")
    done = imnet(["build"], sweep_env(tmp, small_release), cwd=tmp, timeout=300)
    assert "shard_audit      ok" in done.stdout, done.stdout
    return tmp / "out", catalog_counts(tmp / "catalog.duckdb")


def printed(pattern: str):
    return lambda tmp, _pid: re.search(pattern, (tmp / "build.log").read_text(), re.MULTILINE)


def any_shard_temp(tmp: Path, _pid: int):
    out = tmp / "out"
    return out.is_dir() and any(TMP_SHARD.match(p.name) for p in out.iterdir())


def shard_lease(tmp: Path, _pid: int):
    locks = tmp / "out" / "_locks"
    return locks.is_dir() and any(locks.glob("shard-*/*.json"))

EVENTS = {
    "event-log-db": lambda tmp, _pid: (tmp / "dagster_home" / "event_log.db").exists(),
    "instance-line": printed(r"^imnet build: raw "),
    "catalog-wal": lambda tmp, _pid: (tmp / "catalog.duckdb.wal").exists(),
    # inside a catalog stage: the build holds DuckDB's write lock on the catalog
    "catalog-write-lock": lambda tmp, pid: holds_a_lock_on(pid, tmp / "catalog.duckdb"),
    "raw-tars-line": printed(r"^  raw_tars +materialized"),
    "synset-manifest-line": printed(r"^  synset_manifest +materialized"),
    "filtered-index-line": printed(r"^  filtered_index +materialized"),
    "shuffled-plan-line": printed(r"^  shuffled_plan +materialized"),
    "shard-runs-at-once-line": printed(r"shard runs at once"),
    "shard-lease": shard_lease,
    "shard-temp-file": any_shard_temp,
    # a shard's tar committed at its final path (its state and manifest may not be yet)
    "shard-final-file": lambda tmp, _pid: any((tmp / "out").glob("imagenet12k-train-*.tar")),
    "first-shard-line": printed(r"^  \[1/\d+\] shard "),
    "third-shard-line": printed(r"^  \[3/\d+\] shard "),
    # the audit wrote _info.json; the card and the audit's record come after it
    "info-json": lambda tmp, _pid: (tmp / "out" / "_info.json").exists(),
    "audit-line": printed(r"^  shard_audit "),
    # the build's last line: only its cleanup (leases, the first look, the worker pools at exit) is left
    "shards-line": printed(r"^shards: "),
}
# Printed once the build's work is done and recorded (its last run, the audit's, ended): a SIGTERM after
# them has nothing to stop, and the build exits 0 as it would have (it exited 130 "interrupted", or 0
# with a KeyboardInterrupt traceback from multiprocessing's atexit join of the workers).
DONE_EVENTS = ("audit-line", "shards-line")
# SIGTERM at fewer of them (the module's time: each moment costs a build and a half).
SIGTERM_EVENTS = ["catalog-wal", "catalog-write-lock", "filtered-index-line", "shard-runs-at-once-line", "shard-temp-file",
                  "first-shard-line", "third-shard-line", "audit-line", "shards-line"]


def stopped_at(event: str, sig: int, raw: Path, tmp: Path) -> tuple[dict, str]:
    """Starts a fresh build in `tmp`, sends `sig` right after `event`; checks how it stopped.
    Returns the build's environment and what it printed."""
    env, log = sweep_env(tmp, raw), tmp / "build.log"
    proc = start_build(env, tmp, log)
    try:
        wait_for(event, lambda: EVENTS[event](tmp, proc.pid), proc, log, timeout=300)
        members = group_members(proc.pid)
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(sig)  # the main process only, as `docker stop` sends it
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the build did not stop within 30 s of {sig!r} at {event}:\n{log.read_text()}") \
                from None
    finally:
        if proc.poll() is None or group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    left = wait_gone(members - {proc.pid}, timeout=20)
    assert not left, f"processes of the build outlived it: {cmdlines(left)}\n{text}"
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL, text
    elif code == 0 or event in DONE_EVENTS:  # it had finished (its work, or all of it) before the signal came
        assert code == 0 and "shard_audit      ok" in text, (code, text)
        assert "Traceback" not in text and "interrupted" not in text, text
    else:
        assert code == 130 and "imnet: interrupted" in text, (code, text)
        assert "Traceback" not in text and "FAILED" not in text, text
    assert_final_shards_complete(tmp / "out")
    return env, text


def assert_rerun_is_whole(env: dict, tmp: Path, clean: tuple[Path, dict], stopped: str) -> None:
    done = imnet(["build"], env, cwd=tmp, check=False, timeout=300)
    said = f"first build:\n{stopped}\nrerun:\n{done.stdout}\n{done.stderr}"
    # the audit runs again, and passes; unless the stopped build had passed it already (stopped
    # after its last shard, the audit may have been recorded before the stop, its line not printed)
    audited = "shard_audit      ok" in done.stdout or (
        re.search(r"shard_audit      ok|\[4/4\] shard", stopped) and "shard_audit      fresh, skipped" in done.stdout)
    assert done.returncode == 0 and audited, said
    assert "in flight" not in done.stdout, said
    out = tmp / "out"
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(p.name for p in clean[0].glob("*.tar")), said
    assert_identical(clean[0], out)
    assert catalog_counts(tmp / "catalog.duckdb") == clean[1], said
    assert temp_files(tmp) == [], said
    locks = out / "_locks"
    assert not locks.exists() or not list(locks.rglob("*.json")), list(locks.rglob("*.json"))
    unfinished = [r.run_id for r in shard_runs(env["DAGSTER_HOME"]) if not r.is_finished]
    assert unfinished == [], (unfinished, said)


@pytest.mark.parametrize("event", list(EVENTS))
def test_kill_9_at_each_moment_then_the_rerun_is_whole(small_release, clean, tmp_path, event):
    env, text = stopped_at(event, signal.SIGKILL, small_release, tmp_path)
    assert_rerun_is_whole(env, tmp_path, clean, text)


@pytest.mark.parametrize("event", SIGTERM_EVENTS)
def test_sigterm_at_each_moment_stops_it_then_the_rerun_is_whole(small_release, clean, tmp_path, event):
    env, text = stopped_at(event, signal.SIGTERM, small_release, tmp_path)
    assert_rerun_is_whole(env, tmp_path, clean, text)


@pytest.mark.parametrize("event", ["catalog-wal", "shard-runs-at-once-line", "third-shard-line"])
def test_a_second_build_at_a_moment_refuses_naming_the_first_or_finds_it_built(small_release, clean, tmp_path,
                                                                               event):
    """A second `imnet build` of the same out root started right after the event: it refuses naming
    the first (exit 1) or finds everything built (exit 0); the first ends ok; nothing is corrupted."""
    env, log = sweep_env(tmp_path, small_release), tmp_path / "build.log"
    first = start_build(env, tmp_path, log)
    try:
        wait_for(event, lambda: EVENTS[event](tmp_path, first.pid), first, log, timeout=300)
        second = imnet(["build"], env, cwd=tmp_path, check=False, timeout=300)
        assert first.wait(timeout=300) == 0, log.read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    text = log.read_text()
    said = f"first:\n{text}\nsecond:\n{second.stdout}\n{second.stderr}"
    assert "shard_audit      ok" in text, said
    if second.returncode == 1:
        m = REFUSED.search(second.stderr)
        assert m and int(m.group(3)) == first.pid, said
    else:
        assert second.returncode == 0 and "0 to build" in second.stdout, said
    assert "Traceback" not in second.stdout + second.stderr, said
    assert_identical(clean[0], tmp_path / "out")
    assert catalog_counts(tmp_path / "catalog.duckdb") == clean[1], said
    assert temp_files(tmp_path) == [], said
