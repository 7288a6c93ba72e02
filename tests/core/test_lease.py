"""release.lease on a local folder and on moto's S3 server: one holder at a time, the holder named,
a killed holder taken over at once, another host's holder only once it stopped renewing, and
of many takers at once (threads, processes) exactly one wins."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from imnet_assets.release import lease
from imnet_assets.storage import atomic, fs
from tests.conftest import dead_pid, other_pid_namespace
from tests.s3server import MotoS3

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, sends SIGKILL")


@pytest.fixture(scope="module")
def moto():
    with MotoS3(secret=f"leaseSecret-{uuid.uuid4().hex}") as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, monkeypatch):
    """An out root: a local folder, or a prefix of a fresh bucket on moto's S3 server."""
    if request.param == "local":
        return str(tmp_path / "out")
    server = request.getfixturevalue("moto")
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    bucket = f"lease-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/wds"


def generations(root: str, name: str) -> list[str]:
    return [e["name"] for e in fs.listdir(lease.lease_folder(root, name)) if not e["name"].startswith(".")]


def plant(root: str, name: str, generation: int, **holder) -> None:
    """A lease object as another holder would have written it."""
    now = time.time()
    doc = {"what": "imnet build", "host": socket.gethostname(), "pid_namespace": os.readlink("/proc/self/ns/pid"),
           "pid": os.getpid(), "since": now, "renewed": now, "token": uuid.uuid4().hex, **holder}
    atomic.write_atomic(fs.join(lease.lease_folder(root, name), f"{generation:08d}.json"), json.dumps(doc).encode())


def test_one_holder_at_a_time_and_the_refusal_names_it(root):
    first = lease.acquire(root, "build", "imnet build")
    try:
        with pytest.raises(lease.LeaseHeld) as held:
            lease.acquire(root, "build", "imnet build")
        text = str(held.value)
        assert f"imnet build (host {socket.gethostname()}, pid {os.getpid()}, since " in text, text
        assert first.url in text and "\n" not in text
        other = lease.acquire(root, "shard-0001", "run abc")  # another name is another lease
        other.release()
    finally:
        first.release()
    again = lease.acquire(root, "build", "imnet build")  # released: free again
    again.release()
    assert generations(root, "build") == []  # nothing left behind


HOLDER = """
import sys, time
from imnet_assets.release import lease
held = lease.acquire(sys.argv[1], "build", "imnet build")
print(held.url, flush=True)
time.sleep(600)
"""


MOMENT_HOLDER = """
import sys
from imnet_assets.release import lease
held = lease.acquire(sys.argv[1], "shard-0001", sys.argv[2])
print("held", flush=True)
sys.stdin.readline()
held.release()
print("released", flush=True)
sys.stdin.readline()
"""


def test_a_moments_holder_is_waited_out_a_run_is_not(root):
    """acquire_waiting against a real process holding the lease: one that holds it for a moment
    (`imnet verify`, as waits_for says) is waited out when it lets go within the wait; past the wait
    it is refused naming the holder and the wait; a run holding it is refused at once."""
    from imnet_assets.release.verify_runs import FORGETTING

    moment = lambda holder: not lease.writes_shard(holder)  # noqa: E731

    def holding(what: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", MOMENT_HOLDER, root, what], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=os.environ.copy())
        assert proc.stdout.readline() == "held\n"
        return proc

    def let_go(proc: subprocess.Popen, after: float) -> threading.Thread:
        def go():
            time.sleep(after)
            proc.stdin.write("go\n")
            proc.stdin.flush()
        t = threading.Thread(target=go)
        t.start()
        return t

    verify = holding(FORGETTING)
    try:
        started = time.monotonic()
        with pytest.raises(lease.LeaseHeld, match=f"pid {verify.pid},.*waited 1s for it to let go"):
            lease.acquire_waiting(root, "shard-0001", "run r1", moment, seconds=1, poll=0.1)
        assert time.monotonic() - started >= 1
        said = []
        t = let_go(verify, 1.5)
        started = time.monotonic()
        with lease.acquire_waiting(root, "shard-0001", "run r1", moment, seconds=30, poll=0.1,
                                   waiting=said.append) as taken:
            assert time.monotonic() - started >= 1.4 and taken.holder["what"] == "run r1"
            assert verify.stdout.readline() == "released\n"
        t.join()
        assert len(said) == 1 and said[0].startswith(f"waiting up to 30s for the lease shard-0001: {FORGETTING} "), said
    finally:
        verify.kill()
        verify.wait()
    run = holding("run r2")
    try:
        started = time.monotonic()
        with pytest.raises(lease.LeaseHeld, match=f"^run r2 \\(host .*, pid {run.pid},") as held:
            lease.acquire_waiting(root, "shard-0001", "run r1", moment, seconds=30, poll=0.1)
        assert time.monotonic() - started < 10 and "waited" not in str(held.value)  # at once, not after 30 s
    finally:
        run.kill()
        run.wait()


def test_a_holder_killed_with_sigkill_is_taken_over_at_once(root):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, root], stdout=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    try:
        url = proc.stdout.readline().strip()
        assert url, "the holder did not start"
        with pytest.raises(lease.LeaseHeld, match=f"pid {proc.pid},"):
            lease.acquire(root, "build", "imnet build")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        taken = lease.acquire(root, "build", "imnet build")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        assert taken.generation == 2 and generations(root, "build") == ["00000002.json"]  # the dead one's removed
    finally:
        taken.release()


def test_a_reused_process_number_does_not_keep_a_dead_holder_alive(root):
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        # a live process has the number now, but it started after the lease's holder did
        plant(root, "build", 1, pid=stranger.pid, since=time.time() - 100)
        taken = lease.acquire(root, "build", "imnet build")
        taken.release()
    finally:
        stranger.kill()
        stranger.wait()


def test_another_hosts_holder_counts_until_it_stops_renewing(root):
    plant(root, "build", 3, host="elsewhere", pid=1)
    with pytest.raises(lease.LeaseHeld, match="host elsewhere, pid 1,"):
        lease.acquire(root, "build", "imnet build")
    plant(root, "build", 3, host="elsewhere", pid=1, renewed=time.time() - lease.EXPIRE_SECONDS - 5)
    taken = lease.acquire(root, "build", "imnet build")
    assert taken.generation == 4
    taken.release()


def test_another_pid_namespace_of_this_host_is_not_asked(root):
    """A process number of a container on this host's network means nothing here: its lease
    counts while it is renewed, even though no process of ours has that number."""
    proc, namespace = other_pid_namespace()
    try:
        plant(root, "build", 1, pid=dead_pid(), pid_namespace=namespace)
        with pytest.raises(lease.LeaseHeld):
            lease.acquire(root, "build", "imnet build")
    finally:
        proc.kill()
        proc.wait()


def test_of_many_threads_taking_at_once_exactly_one_wins(root):
    won, refused, start = [], [], threading.Barrier(8)

    def take():
        start.wait()
        try:
            won.append(lease.acquire(root, "shard-0003", "run x"))
        except lease.LeaseHeld as e:
            refused.append(e)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7, (won, refused)
    won[0].release()


TAKER = """
import sys, time
from imnet_assets.release import lease
while time.time() < float(sys.argv[2]):
    pass
try:
    held = lease.acquire(sys.argv[1], "build", "imnet build")
except lease.LeaseHeld as e:
    print("refused", e, flush=True)
else:
    print("won", flush=True)
    time.sleep(3)
    held.release()
"""


def test_of_many_processes_taking_at_once_exactly_one_wins(root):
    at = time.time() + 4  # all of them past their imports by then
    procs = [subprocess.Popen([sys.executable, "-c", TAKER, root, str(at)], stdout=subprocess.PIPE, text=True,
                              env=os.environ.copy()) for _ in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert sorted(o.split()[0] for o in outs) == ["refused", "refused", "refused", "won"], outs


def test_a_holder_taken_over_finds_its_lease_lost(root):
    held = lease.acquire(root, "build", "imnet build")
    # Taken for gone (say, it could not renew for EXPIRE_SECONDS): a newer generation by another.
    plant(root, "build", held.generation + 1, host="elsewhere", pid=1, what="imnet build")
    held.renew()
    with pytest.raises(lease.LeaseLost, match="taken over by imnet build \\(host elsewhere"):
        held.check()
    held.release()
    assert f"{held.generation + 1:08d}.json" in generations(root, "build")  # the taker's lease is left alone


def test_a_held_lease_is_renewed(root, monkeypatch):
    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.2)
    lease._wake.set()  # a renewer already waiting picks up the shorter period after one more round
    held = lease.acquire(root, "build", "imnet build")
    try:
        first = fs.read_json(held.url)["renewed"]
        deadline = time.time() + 30
        while fs.read_json(held.url)["renewed"] == first:
            assert time.time() < deadline, f"the lease was not renewed ({held.lost}, {lease._renewer}, {lease.RENEW_SECONDS})"
            time.sleep(0.1)
        held.check()
    finally:
        held.release()


RENEWING_HOLDER = """
import sys, time
from imnet_assets.release import lease
lease.RENEW_SECONDS = 0.3
held = lease.acquire(sys.argv[1], "build", "imnet build")
print(held.url, flush=True)
time.sleep(600)
"""


def _garble(url: str, how: str) -> None:
    data = fs.read_bytes(url)
    data = data[: len(data) // 2] if how == "cut" else data.replace(b'"pid"', b'"pjd"')
    if fs.is_remote(url):  # as a writer other than the lease's would: in place
        atomic.write_atomic(url, data)
    else:
        with open(url, "wb") as f:
            f.write(data)


@pytest.mark.parametrize("how", ["cut", "byte"])
def test_a_damaged_lease_of_a_live_holder_still_excludes_a_second_build_and_is_written_again(root, how):
    """The live build's lease object cut short or with a byte changed: a second taker refuses, naming
    the damaged file (never takes it for a gone holder's), the looks that list holders report it, and
    the holder's next renewal writes its object again; once the holder is killed it is taken over."""
    proc = subprocess.Popen([sys.executable, "-c", RENEWING_HOLDER, root], stdout=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    try:
        url = proc.stdout.readline().strip()
        assert url, "the holder did not start"
        lease._wake.set()
        _garble(url, how)
        refused = []
        with pytest.raises(lease.LeaseHeld) as held:
            lease.acquire(root, "build", "imnet build")
        refused.append(str(held.value))
        seen = lease.held_leases(root)  # may already see it written again: then the holder by its pid
        assert list(seen) == ["build"]
        assert f"its lease {url} is damaged" in refused[0] and "\n" not in refused[0], refused
        deadline = time.time() + 30
        while not isinstance((doc := fs.read_json(url)), dict) or doc.get("pid") != proc.pid:
            assert time.time() < deadline, "the holder did not write its damaged lease again"
            time.sleep(0.1)
        with pytest.raises(lease.LeaseHeld, match=f"pid {proc.pid},"):
            lease.acquire(root, "build", "imnet build")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        taken = lease.acquire(root, "build", "imnet build")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    taken.release()


def test_a_damaged_lease_no_one_renews_is_taken_over_once_it_is_old_and_removed(root, monkeypatch):
    plant(root, "build", 4)
    url = fs.join(lease.lease_folder(root, "build"), "00000004.json")
    _garble(url, "cut")
    assert lease.holder_of(root, "build")[1] == url
    with pytest.raises(lease.LeaseHeld, match=r"an unknown holder \(its lease .*00000004\.json is damaged"):
        lease.acquire(root, "build", "imnet build")
    monkeypatch.setattr(lease, "EXPIRE_SECONDS", 2.0)
    time.sleep(3.1)  # (S3's LastModified: whole seconds)
    assert lease.holder_of(root, "build") is None and lease.held_leases(root) == {}
    taken = lease.acquire(root, "build", "imnet build")
    try:
        assert taken.generation == 5 and generations(root, "build") == ["00000005.json"]  # the damaged one removed
    finally:
        taken.release()
