"""Builds that meet, and builds that are told to stop, with `imnet build` run as real processes.

- Two builds started together on a fresh DAGSTER_HOME: neither crashes, no partition runs twice,
  one refuses naming the other (or finds everything built), and the shards equal a clean build's.
- A build started while another writes the catalog (inside a stage) refuses at once.
- A build started while another is writing a shard (the first is frozen with SIGSTOP meanwhile,
  so the overlap is certain): the second refuses at once naming the first's host and pid.
- The holder killed with kill -9: a new build takes its lease over and finishes the job.
- One shard partition materialized by two Dagster processes at once (as the UI, a schedule and
  a sensor would launch runs): the second run fails naming the first run, is not retried, and
  the shard is built once.
- The same on an s3:// out root (moto): refusal, then a kill -9d holder taken over.
- Four processes creating a fresh DAGSTER_HOME's instance at once: none crashes.
- SIGTERM stops a build started with SIGINT and SIGTERM ignored, as Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import build_env, dagster_home, environ, imnet
from tests.integration.test_crash_safety import (
    SHARDS,
    assert_final_shards_complete,
    assert_identical,
    group_members,
    start_build,
    temp_files,
    wait_for,
    wait_gone,
    writing_shard,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, sends signals")

BIN = os.path.dirname(sys.executable)
REFUSED = re.compile(r"imnet: the out root (\S+) is in use by another build: imnet build \(host (\S+), pid (\d+), "
                     r"since [0-9TZ:-]+\) holds it \(lease \S+\); wait for it to end")


@pytest.fixture(scope="module")
def planned(sample_release, tmp_path_factory):
    """The sample release's catalog stages and plan (no shards), and a clean build of it."""
    tmp = tmp_path_factory.mktemp("planned")
    env = build_env(tmp, sample_release[0])
    imnet(["build", "--shards", "none"], env)
    clean = tmp_path_factory.mktemp("clean")
    shutil.copytree(tmp / "out", clean / "out")
    shutil.copy(tmp / "catalog.duckdb", clean / "catalog.duckdb")
    imnet(["build"], {**env, "IMNET_OUT_ROOT": str(clean / "out"), "IMNET_CATALOG": str(clean / "catalog.duckdb")})
    return tmp, env, clean / "out"


def copy_of(planned, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A private copy of the planned release, with a Dagster home of its own."""
    tmp, env, _ = planned
    shutil.copytree(tmp / "out", tmp_path / "out")
    shutil.copy(tmp / "catalog.duckdb", tmp_path / "catalog.duckdb")
    return {**env, "IMNET_OUT_ROOT": str(tmp_path / "out"), "IMNET_CATALOG": str(tmp_path / "catalog.duckdb"),
            "DAGSTER_HOME": str(dagster_home(tmp_path)), **extra}


def shard_runs(home: str) -> list:
    """Every wds_shards run recorded in the instance at `home` (newest first)."""
    from dagster import DagsterInstance

    with environ(DAGSTER_HOME=home), DagsterInstance.get() as inst:
        return [r.dagster_run for r in inst.get_run_records() if "dagster/partition" in r.dagster_run.tags]


def runs_per_partition(home: str) -> Counter:
    return Counter(run.tags["dagster/partition"] for run in shard_runs(home))


def no_leases_left(out: Path) -> None:
    assert not (out / "_locks").exists() or not list((out / "_locks").rglob("*.json")), list(out.rglob("_locks/*/*"))


# ----------------------------------------------------------------------------- tests


def test_two_builds_started_together_on_a_fresh_instance_build_each_shard_once(sample_release, planned, tmp_path):
    env = build_env(tmp_path, sample_release[0], DAGSTER_HOME=str(dagster_home(tmp_path)))
    exe = os.path.join(BIN, "imnet")
    procs = [subprocess.Popen([exe, "build"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert "IntegrityError" not in "".join(outs) and "Traceback" not in "".join(outs), outs
    assert 0 in codes, outs
    if codes != [0, 0]:  # the usual case: one refused, naming the other
        loser, winner = (0, 1) if codes[0] else (1, 0)
        assert codes[loser] == 1, outs[loser]
        m = REFUSED.search(outs[loser])
        assert m and m.group(2) == socket.gethostname() and int(m.group(3)) == procs[winner].pid, outs[loser]
        assert "shard_audit      ok" in outs[winner], outs[winner]
    else:  # one ended before the other wanted to write: it found everything built
        assert any("0 to build" in o for o in outs), outs
    assert runs_per_partition(env["DAGSTER_HOME"]) == Counter({k: 1 for k in ["0000", "0001", "0002", "0003"]})
    assert_identical(planned[2], tmp_path / "out")
    no_leases_left(tmp_path / "out")
    verify = imnet(["verify"], env, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_build_started_during_another_refuses_naming_it(planned, tmp_path):
    env = copy_of(planned, tmp_path, IMNET_PARALLEL_SHARDS="1", IMNET_WORKERS="1")
    out, log = tmp_path / "out", tmp_path / "first.log"
    first = start_build(env, tmp_path, log)
    try:
        wait_for("shard 0000 being written", lambda: writing_shard(out, "0000"), first, log)
        os.killpg(first.pid, signal.SIGSTOP)  # it holds the out root for as long as this test needs
        try:
            started = time.monotonic()
            second = imnet(["build"], env, check=False, timeout=300)
            took = time.monotonic() - started
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        assert second.returncode == 1, second.stdout + second.stderr
        m = REFUSED.search(second.stderr)
        assert m, second.stderr
        assert (m.group(1), m.group(2), int(m.group(3))) == (str(out), socket.gethostname(), first.pid)
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert took < 120, took
        assert first.wait(timeout=300) == 0, log.read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert "shard_audit      ok" in log.read_text()
    assert runs_per_partition(env["DAGSTER_HOME"]) == Counter({k: 1 for k in ["0000", "0001", "0002", "0003"]})
    assert_identical(planned[2], out)
    no_leases_left(out)


def holds_a_lock_on(pid: int, path: Path) -> bool:
    """Whether process `pid` holds a lock on file `path` (/proc/locks: DuckDB's writer lock)."""
    try:
        inode = path.stat().st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        if len(fields) >= 6 and fields[4] == str(pid) and fields[5].rsplit(":", 1)[-1] == str(inode):
            return True
    return False


def test_a_build_started_while_another_writes_the_catalog_refuses_at_once(sample_release, tmp_path):
    """The first build is inside a catalog stage, holding the catalog's write lock (at full size the
    index stage holds it for an hour): the second refuses at once, naming it, rather than waiting
    for the catalog to read the stages' state."""
    env = build_env(tmp_path, sample_release[0], DAGSTER_HOME=str(dagster_home(tmp_path)))
    log = tmp_path / "first.log"
    first = start_build(env, tmp_path, log)
    try:
        wait_for("the catalog being written", lambda: holds_a_lock_on(first.pid, tmp_path / "catalog.duckdb"),
                 first, log, timeout=300)
        os.killpg(first.pid, signal.SIGSTOP)
        try:
            second = imnet(["build"], env, check=False, timeout=120)
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        assert second.returncode == 1, second.stdout + second.stderr
        m = REFUSED.search(second.stderr)
        assert m and int(m.group(3)) == first.pid, second.stdout + second.stderr
        assert "waiting" not in second.stdout + second.stderr
        assert first.wait(timeout=600) == 0, log.read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert "shard_audit      ok" in log.read_text()


def test_a_build_killed_with_sigkill_is_taken_over_by_the_next(planned, tmp_path):
    env = copy_of(planned, tmp_path, IMNET_PARALLEL_SHARDS="1", IMNET_WORKERS="1")
    out, log = tmp_path / "out", tmp_path / "build.log"
    first = start_build(env, tmp_path, log)
    try:
        wait_for("shard 0001 being written", lambda: writing_shard(out, "0001"), first, log)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    held = list((out / "_locks").rglob("*.json"))
    assert any(json.loads(p.read_text())["pid"] == first.pid for p in held), held  # the dead build's leases
    done = imnet(["build"], env, timeout=300)
    assert "shard_audit      ok" in done.stdout, done.stdout
    assert "2 to build" in done.stdout or "3 to build" in done.stdout, done.stdout
    assert_identical(planned[2], out)
    assert temp_files(out) == []
    no_leases_left(out)


MATERIALIZE = ["asset", "materialize", "-m", "imnet_assets.definitions", "--select", "wds_shards",
               "--partition", "0001"]


def test_one_partition_materialized_by_two_processes_is_built_once(planned, tmp_path):
    """Two Dagster runs of partition 0001 in two processes (`dagster asset materialize`, in-process
    execution as a launched run's worker does): the second fails at once naming the first run, is
    not retried, and wrote nothing; the first builds the shard."""
    env = copy_of(planned, tmp_path, IMNET_WORKERS="1")
    out, log = tmp_path / "out", tmp_path / "first.log"
    exe = os.path.join(BIN, "dagster")
    with open(log, "wb") as f:
        first = subprocess.Popen([exe, *MATERIALIZE], env=env, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        wait_for("shard 0001 being written", lambda: writing_shard(out, "0001"), first, log, timeout=300)
        lease = next((out / "_locks" / "shard-0001").glob("*.json"))
        holder = json.loads(lease.read_text())
        os.killpg(first.pid, signal.SIGSTOP)
        try:
            second = subprocess.run([exe, *MATERIALIZE], env=env, cwd=tmp_path, capture_output=True, text=True,
                                    timeout=300)
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0, log.read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    runs = shard_runs(env["DAGSTER_HOME"])
    assert len(runs) == 2, runs
    by_status = {r.status.value: r for r in runs}
    assert set(by_status) == {"SUCCESS", "FAILURE"}, runs
    winner, loser = by_status["SUCCESS"], by_status["FAILURE"]
    assert holder["what"] == f"run {winner.run_id}" and holder["pid"] == first.pid
    text = second.stdout + second.stderr
    assert second.returncode != 0
    assert f"shard 0001 is being built by another run: run {winner.run_id} (host {socket.gethostname()}, " \
           f"pid {first.pid}," in text, text
    assert loser.tags.get("dagster/will_retry") == "false", loser.tags  # dagster.yaml's run_retries leave it
    manifest = json.loads((out / "_manifests" / "0001.json").read_text())
    assert manifest["run_id"] == winner.run_id
    clean = planned[2] / "imagenet12k-train-0001.tar"
    assert (out / "imagenet12k-train-0001.tar").read_bytes() == clean.read_bytes()
    assert not (out / "imagenet12k-train-0000.tar").exists()
    no_leases_left(out)


HOLD_AS_VERIFY = """
import sys, time
from imnet_assets.release.lease import acquire, shard_lease_name
from imnet_assets.release.verify_runs import FORGETTING
with acquire(sys.argv[1], shard_lease_name("0001"), FORGETTING):
    print("held", flush=True)
    sys.stdin.readline()  # until told to let go
print("released", flush=True)
time.sleep(600)
"""


def holding_as_verify(env, tmp_path) -> subprocess.Popen:
    """A real process holding partition 0001's lease as `imnet verify` does while it removes a commit
    record, until a line on its stdin."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AS_VERIFY, str(tmp_path / "out")], env=env,
                              cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_partition_whose_lease_imnet_verify_holds_past_the_wait_fails_naming_verify_not_another_run(
        planned, tmp_path):
    """A run of partition 0001 while `imnet verify` holds the shard's lease (as it does for a moment
    while it removes the commit record of a shard it failed: a real process holding it as verify
    does) past the time a run waits out such a holder (lease.MOMENT_SECONDS): the run fails naming
    what holds the lease (imnet verify, its host and pid) and the wait, never "being built by another
    run" (no run is building it), and wrote nothing."""
    from imnet_assets.release.lease import MOMENT_SECONDS

    env = copy_of(planned, tmp_path, IMNET_WORKERS="1")
    out = tmp_path / "out"
    holder = holding_as_verify(env, tmp_path)
    try:
        started = time.monotonic()
        run = subprocess.run([os.path.join(BIN, "dagster"), *MATERIALIZE], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        took = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    text = run.stdout + run.stderr
    assert run.returncode != 0
    assert took >= MOMENT_SECONDS, took  # waited it out first
    assert "being built by another run" not in text, text
    assert (f"shard 0001 is held by another holder, not a run building it: imnet verify (removing the commit "
            f"record of a shard it failed) (host {socket.gethostname()}, pid {holder.pid},") in text, text
    assert f"(waited {MOMENT_SECONDS:.0f}s for it to let go)" in text, text
    assert not (out / "imagenet12k-train-0001.tar").exists()
    assert not (out / "_manifests" / "0001.json").exists()


def test_a_run_waits_out_imnet_verify_holding_its_partitions_lease_for_a_moment_then_builds(planned, tmp_path):
    """`imnet verify` (a real process holding the lease as verify does) lets go of partition 0001's
    lease ~2 s after the run found it held: the run waits, saying so, then takes the lease and builds
    the shard, the same bytes as a clean build's."""
    env = copy_of(planned, tmp_path, IMNET_WORKERS="1")
    out, log = tmp_path / "out", tmp_path / "run.log"
    holder = holding_as_verify(env, tmp_path)
    waits = "waiting up to 30s for the lease shard-0001: imnet verify (removing the commit record"
    try:
        with open(log, "wb") as f:
            run = subprocess.Popen([os.path.join(BIN, "dagster"), *MATERIALIZE], env=env, cwd=tmp_path, stdout=f,
                                   stderr=subprocess.STDOUT)
        try:
            wait_for("the run waiting for the lease", lambda: waits in log.read_text(), run, log, timeout=300)
            time.sleep(2)
            holder.stdin.write("go\n")
            holder.stdin.flush()
            assert holder.stdout.readline() == "released\n"
            assert run.wait(timeout=300) == 0, log.read_text()
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    finally:
        holder.kill()
        holder.wait()
    clean = planned[2] / "imagenet12k-train-0001.tar"
    assert (out / "imagenet12k-train-0001.tar").read_bytes() == clean.read_bytes()
    no_leases_left(out)


INSTANCE = "from imnet_assets.orchestrate.instance import dagster_instance; dagster_instance().get_runs(limit=1)"


def test_processes_creating_a_fresh_instance_at_once_do_not_crash(tmp_path):
    """Without the lock, two or three of four such processes die (IntegrityError or 'table ...
    already exists' from SQLite while each creates the schema)."""
    for trial in range(2):  # (each trial: 4 processes on a fresh home)
        home = dagster_home(tmp_path / f"trial{trial}")
        env = {**os.environ, "DAGSTER_HOME": str(home)}
        procs = [subprocess.Popen([sys.executable, "-c", INSTANCE], env=env, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
        errors = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], errors


def ignoring(*signals):
    def preexec():
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
    return preexec


@pytest.mark.parametrize(("parallel", "ignored"), [("1", (signal.SIGINT,)), ("2", (signal.SIGINT, signal.SIGTERM))],
                         ids=["one-run-sigint-ignored", "two-runs-both-ignored"])
def test_sigterm_stops_a_build_started_with_signals_ignored(planned, tmp_path, parallel, ignored):
    """As from `imnet build &` in a script: SIGINT inherited ignored (Dagster then pointed SIGTERM
    at SIG_IGN too once a run in the main thread ended), or SIGTERM ignored as well. SIGTERM to
    the main process (as `docker stop` sends it) stops the build within seconds, as Ctrl-C does:
    "imnet: interrupted", exit 130, no file at a shard's final path that is not a whole committed
    shard, and no process of the build left."""
    env = copy_of(planned, tmp_path, IMNET_PARALLEL_SHARDS=parallel)
    out, log = tmp_path / "out", tmp_path / "build.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([os.path.join(BIN, "imnet"), "build"], env=env, cwd=tmp_path, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=ignoring(*ignored))
    try:
        tmp = wait_for("shard 0000 being written", lambda: writing_shard(out, "0000"), proc, log)
        members = group_members(proc.pid)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        took, ended = time.monotonic() - started, time.time()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 130, text
    assert took < 30, (took, text)
    assert "imnet: interrupted" in text and "FAILED" not in text, text
    assert tmp.name.startswith(".imagenet12k-train-0000.tar.tmp-")
    final = out / "imagenet12k-train-0000.tar"
    if final.exists():
        # It was being written: nothing at its final path, unless its last bytes and the commit
        # raced the signal (a sample shard is written in well under a second once its first bytes
        # show; CI met it once). Then it is whole (below) and its bytes were written before the build
        # ended: with two runs, the one in a thread goes on until the main thread's os._exit, which a
        # loaded machine can delay past a second after the signal, so that is the bound, not the signal.
        assert final.stat().st_mtime <= ended, (final.stat().st_mtime - ended, text)
    if parallel == "2":  # the runs in threads were left, not waited for (they would commit after the stop)
        assert "shard runs in flight stopped with it" in text, text
    assert_final_shards_complete(out)
    assert not wait_gone(members - {proc.pid}, timeout=20), "processes of the build outlived it"
    if parallel == "1":  # interrupted in the main thread: the shard's temporary file was removed
        assert temp_files(out) == []
    # the next build takes the interrupted one's leases over and finishes
    done = imnet(["build"], env, timeout=300)
    assert "shard_audit      ok" in done.stdout, done.stdout
    assert_identical(planned[2], out)
    assert sorted(p.name for p in out.glob("*.tar")) == SHARDS


def test_on_s3_a_second_build_refuses_and_a_killed_holder_is_taken_over(sample_release, planned, tmp_path):
    """The same on an s3:// out root (moto's server): the leases are objects created with a
    conditional PUT. A build frozen mid-shard holds the out root: a second refuses naming it; once
    the holder is killed with kill -9, a third takes both its leases over and finishes, with
    the shards of a clean (local) build."""
    from tests.s3server import MotoS3

    with MotoS3(secret=f"leaseBuild-{uuid.uuid4().hex}") as s3:
        client = s3.client()
        client.create_bucket(Bucket="lease-raw-bucket")
        client.create_bucket(Bucket="lease-out-bucket")
        s3.put_tree(client, sample_release[0], "lease-raw-bucket", "winter21")
        env = build_env(tmp_path, "s3://lease-raw-bucket/winter21", IMNET_OUT_ROOT="s3://lease-out-bucket/wds",
                        DAGSTER_HOME=str(dagster_home(tmp_path)), IMNET_PARALLEL_SHARDS="1", IMNET_WORKERS="1")
        env = {k: v for k, v in env.items() if not k.startswith("AWS_")} | s3.env()

        def leases() -> dict[str, dict]:
            found = client.list_objects_v2(Bucket="lease-out-bucket", Prefix="wds/_locks/").get("Contents", [])
            return {o["Key"]: json.loads(client.get_object(Bucket="lease-out-bucket", Key=o["Key"])["Body"].read())
                    for o in found}

        log = tmp_path / "first.log"
        first = start_build(env, tmp_path, log)
        try:
            wait_for("a shard run holding its lease",
                     lambda: any("/shard-" in k for k in leases()), first, log, timeout=300)
            os.killpg(first.pid, signal.SIGSTOP)
            held = leases()
            assert {v["pid"] for v in held.values()} == {first.pid}, held
            second = imnet(["build"], env, check=False, timeout=300)
            assert second.returncode == 1, second.stdout + second.stderr
            m = REFUSED.search(second.stderr)
            assert m and m.group(1) == "s3://lease-out-bucket/wds" and int(m.group(3)) == first.pid, second.stderr
            assert "s3://lease-out-bucket/wds/_locks/build/" in second.stderr
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
        third = imnet(["build"], env, timeout=600)
        assert "shard_audit      ok" in third.stdout, third.stdout
        assert leases() == {}, leases()  # released, and the dead holder's removed when taken over
        objects = MotoS3.all_objects(client, "lease-out-bucket", "wds/")
    for name in SHARDS:
        assert objects[f"wds/{name}"] == (planned[2] / name).read_bytes(), name


def _fill(fd: int) -> None:
    """Fill the pipe whose write end is `fd`: the next write blocks. Through a file description of its
    own (O_NONBLOCK on the shared one would make the build's writes fail instead of wait)."""
    own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
    try:
        for chunk in (4096, 1):
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(own, b"#" * chunk)
    finally:
        os.close(own)


def _writing(pid: int, pipe: int) -> bool:
    """Whether the main thread of `pid` is in write(2) (x86-64 numbers it 1, arm64 64) to the pipe
    whose write end is this process's `pipe`, and still is a tenth of a second later: held there."""
    nr = "64" if os.uname().machine == "aarch64" else "1"
    ours = os.readlink(f"/proc/self/fd/{pipe}")
    for look in range(3):
        try:
            call = Path(f"/proc/{pid}/syscall").read_text().split()
            if call[0] != nr or os.readlink(f"/proc/{pid}/fd/{int(call[1], 16)}") != ours:
                return False
        except (OSError, IndexError, ValueError):
            return False
        time.sleep(0.05 * (look < 2))
    return True


def test_ctrl_c_while_a_progress_line_is_printed_stops_the_runs_in_flight(planned, tmp_path):
    """Two shard runs at once; the first finishes and its progress line is printed to a terminal that
    takes no more (its output held: the pipe is full), so Ctrl-C (SIGINT to the group) comes in the
    middle of printing it, with the second run still going. The build stops at once as a Ctrl-C at
    any other moment does ("shard runs in flight stopped with it", exit 130): it waited for the run
    in flight to end, which then committed its shard after the stop."""
    env = copy_of(planned, tmp_path, IMNET_PARALLEL_SHARDS="2", IMNET_WORKERS="1")
    out, log = tmp_path / "out", tmp_path / "build.log"
    read_end, write_end = os.pipe()
    with open(log, "wb") as err:
        proc = subprocess.Popen([os.path.join(BIN, "imnet"), "build"], env=env, cwd=tmp_path, stdout=write_end,
                                stderr=err, start_new_session=True)
    text = b""
    try:
        while b"shard runs at once" not in text:  # the runs are about to start
            assert proc.poll() is None, (text, log.read_text())
            text += os.read(read_end, 65536)
        records = lambda: list((out / "_manifests").glob("*.state.json"))  # noqa: E731
        wait_for("a shard committed", records, proc, log)
        _fill(write_end)  # (its check and its run's end come before its line, a good part of a second)
        wait_for("a progress line being printed", lambda: _writing(proc.pid, write_end), proc, log)
        assert len(records()) < 4, records()  # a run still in flight
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        drain = os.open(f"/proc/self/fd/{read_end}", os.O_RDONLY | os.O_NONBLOCK)
        while proc.poll() is None and time.monotonic() - started < 120:
            with contextlib.suppress(BlockingIOError):
                os.read(drain, 1 << 20)
            time.sleep(0.01)
        os.close(drain)
        took, ended = time.monotonic() - started, time.time()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(read_end)
        os.close(write_end)
    text = log.read_text()
    assert proc.returncode == 130, (proc.returncode, text)
    late = [p.name for p in (out / "_manifests").glob("*.state.json") if p.stat().st_mtime > ended - took + 1]
    assert late == [] and "shard runs in flight stopped with it" in text, (late, took, text)  # none waited for
    assert took < 20, (took, text)
    assert_final_shards_complete(out)
