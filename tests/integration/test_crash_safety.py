"""Crash safety and byte-identical rebuilds, with `imnet build` run as a real process.

A build is SIGKILLed twice: once (whole process group) while the first shard's temporary file
is being written, once (the main process only, so its encode workers must notice by themselves)
while a later shard is being written. After each kill every final shard path holds either
nothing or a complete shard, and no process of the build is left. A normal build then finishes
the job, leaves no temporary file, and its shards and `_info.json` are byte-identical to an
undisturbed build of the same raw release in another folder, and to a one-worker build of a
copy of the release made from yet another folder with relative paths. The killed builds record
into a real instance (DAGSTER_HOME), where their shard runs are left "started" by the kill: the
next build must see that their process is gone, mark them failed and build those shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus

from imnet_assets.storage.rawtar import Damage, iter_tar
from tests.conftest import build_env, dagster_home, imnet

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, sends SIGKILL")

SHARDS = [f"imagenet12k-train-{i:04d}.tar" for i in range(4)]
TMP_SHARD = re.compile(r"^\.imagenet12k-train-(\d{4})\.tar\.tmp-\d+-[0-9a-f]{8}$")


@pytest.fixture(scope="module")
def reference(sample_release, tmp_path_factory) -> Path:
    """An undisturbed build; returns its out folder."""
    tmp = tmp_path_factory.mktemp("reference")
    imnet(["build"], build_env(tmp, sample_release[0]), cwd=tmp)
    return tmp / "out"


# ----------------------------------------------------------------------------- helpers


def start_build(env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    exe = shutil.which("imnet", path=os.path.dirname(sys.executable)) or "imnet"
    with open(log, "ab") as out:
        return subprocess.Popen([exe, "build"], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_for(what: str, found, proc: subprocess.Popen, log: Path, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"imnet build ended ({proc.returncode}) before {what}:\n{log.read_text()}")
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()}")


def writing_shard(out: Path, shard: str):
    """The temporary file of `shard` once it holds some bytes (the shard is being written)."""
    if not out.is_dir():
        return None
    for p in out.iterdir():
        m = TMP_SHARD.match(p.name)
        if m and m.group(1) == shard:
            try:
                if p.stat().st_size > 0:
                    return p
            except FileNotFoundError:
                pass
    return None


def group_members(pgid: int) -> set[int]:
    """Live (not zombie) processes in process group `pgid`."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, _ppid, pgrp = text[text.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            pids.add(int(stat.parent.name))
    return pids


def kill_group(pgid: int) -> None:
    """SIGKILL every process of group `pgid`; none left (the group ended since it was last looked
    at: os.killpg raises ProcessLookupError) is no error."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def test_killing_a_group_that_has_ended_is_no_error():
    proc = subprocess.Popen(["true"], start_new_session=True)
    proc.wait()
    assert group_members(proc.pid) == set()
    kill_group(proc.pid)


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    """Those of `pids` still alive (not zombies) after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = set()
        for pid in pids:
            try:
                text = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if text[text.rindex(")") + 2] not in "ZX":
                left.add(pid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def cmdlines(pids: set[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160])
        except OSError:
            pass
    return out


def assert_final_shards_complete(out: Path) -> set[str]:
    """Every `*.tar` at a final shard path is a whole shard; returns the names present."""
    present = set()
    for name in SHARDS:
        path = out / name
        if not path.exists():
            continue
        present.add(name)
        damage = [d for d in iter_tar(str(path), what="shard") if isinstance(d, Damage)]
        assert not damage, f"{name} is not a complete tar: {damage}"
        state_file = out / "_manifests" / f"{name[-8:-4]}.state.json"
        if state_file.exists():  # (a kill between the tar's and the state's commits leaves none)
            state = json.loads(state_file.read_text())
            data = path.read_bytes()
            assert len(data) == state["bytes"], name
            assert hashlib.sha256(data).hexdigest() == state["sha256"], name
    return present


def temp_files(*folders: Path) -> list[Path]:
    return [p for f in folders for p in f.rglob("*") if ".tmp-" in p.name or p.name.endswith(".tmp")]


def assert_identical(a: Path, b: Path) -> None:
    for name in [*SHARDS, "_info.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between {a} and {b}"
    for i in range(4):
        state = f"_manifests/{i:04d}.state.json"
        ours, theirs = (json.loads((x / state).read_text()) for x in (a, b))
        assert ours.pop("run_id") != theirs.pop("run_id")  # which run wrote it: all else is the same
        assert ours.pop("stamp") != theirs.pop("stamp")  # and when (the tar's mtime)
        for k in ("manifest_stamp", "manifest_bytes", "manifest_sha256"):  # the manifest names its run and time
            ours.pop(k), theirs.pop(k)
        assert ours == theirs, state


# ----------------------------------------------------------------------------- tests


def test_killed_builds_leave_no_partial_shard_and_the_rerun_is_byte_identical(
    sample_release, reference, tmp_path, monkeypatch
):
    # One shard run at a time: the kills below are timed by which shard is being written.
    env = build_env(tmp_path, sample_release[0], DAGSTER_HOME=str(dagster_home(tmp_path)), IMNET_PARALLEL_SHARDS="1")
    out, log = tmp_path / "out", tmp_path / "build.log"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()

    # 1. SIGKILL the whole process group while the first shard is being written.
    proc = start_build(env, cwd, log)
    try:
        tmp = wait_for("shard 0000 being written", lambda: writing_shard(out, "0000"), proc, log)
        members = group_members(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert len(members) >= 3, cmdlines(members)  # imnet, the forkserver, its encode workers
    left = wait_gone(members, timeout=10)
    assert not left, f"processes survived the kill: {cmdlines(left)}"
    assert tmp.exists(), "the kill should have caught shard 0000 mid-write"
    assert assert_final_shards_complete(out) == set(), "no shard was complete yet"

    # 2. Rerun; SIGKILL only the main process while shard 0002 is being written: the encode
    #    workers (and the forkserver) must exit on their own.
    proc = start_build(env, cwd, log)
    try:
        wait_for("shard 0002 being written", lambda: writing_shard(out, "0002"), proc, log)
        members = group_members(proc.pid) - {proc.pid}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        left = wait_gone(members, timeout=10)
    finally:
        if group_members(proc.pid):
            kill_group(proc.pid)  # (its last members may end meanwhile)
    assert members, "the build had no encode workers to watch"
    assert not left, f"workers outlived their killed parent: {cmdlines(left)}"
    assert not tmp.exists(), "the rerun should have removed the first kill's leftover"
    assert assert_final_shards_complete(out) == set(SHARDS[:2])
    assert not (out / "_info.json").exists()

    # The second build saw the first one's run of shard 0000 left "started" by the kill.
    assert re.search(r"shard 0000: run \w{8} had lost its process \(killed\?\); marked failed", log.read_text())

    # 3. A normal build finishes the job from there.
    done = imnet(["build"], env, cwd=cwd)
    assert re.search(r"shard 0002: run \w{8} had lost its process", done.stdout), done.stdout
    assert "2 to build" in done.stdout, done.stdout  # 0000 and 0001 were kept, not redone
    assert "in flight" not in done.stdout, done.stdout
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])  # the instance's storage reads it
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        statuses = [r.dagster_run.status for r in instance.get_run_records()]
    assert DagsterRunStatus.STARTED not in statuses, statuses
    assert statuses.count(DagsterRunStatus.FAILURE) == 2, statuses  # the two killed shard runs
    assert temp_files(out, tmp_path) == []
    assert assert_final_shards_complete(out) == set(SHARDS)
    assert_identical(reference, out)
    verify = imnet(["verify"], env, cwd=cwd, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_one_worker_build_elsewhere_is_byte_identical(sample_release, reference, tmp_path):
    raw = tmp_path / "copy" / "raw"
    shutil.copytree(sample_release[0], raw)
    cwd = tmp_path / "work"
    cwd.mkdir()
    # Relative out root and catalog, resolved against the project root, another folder than the tests'.
    env = build_env(tmp_path, raw, IMNET_OUT_ROOT="out", IMNET_CATALOG="cat/catalog.duckdb", IMNET_WORKERS="1",
                    IMNET_PROJECT_ROOT=str(cwd))
    imnet(["build"], env, cwd=cwd)
    assert (cwd / "cat" / "catalog.duckdb").exists()
    assert_identical(reference, cwd / "out")
    assert temp_files(cwd) == []


def test_ctrl_c_during_a_shard_says_interrupted_and_leaves_no_partial(sample_release, tmp_path):
    """SIGINT (Ctrl-C) while a shard is being written: the command says it was interrupted (exit
    130), not that the shard failed, and no file is left at the shard's final path."""
    env = build_env(tmp_path, sample_release[0], IMNET_WORKERS="1")
    log = tmp_path / "build.log"
    proc = start_build(env, tmp_path, log)
    try:
        wait_for("shard 0000 being written", lambda: writing_shard(tmp_path / "out", "0000"), proc, log)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "imnet: interrupted" in text and "FAILED" not in text, text
    assert not (tmp_path / "out" / "imagenet12k-train-0000.tar").exists()
