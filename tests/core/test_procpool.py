"""Process pools: workers start from a forkserver that already holds the modules pools run, and
the main script's imports (exit-with-parent is covered by tests/integration/test_crash_safety.py).
The shared worker pool: a job's fault (an exception, an unreadable reply, a job that does not
pickle or unpickle) fails that job only; late replies are dropped; a hung job is killed past its
time limit; a worker stopped holding big jobs, or halfway through a reply, does not stall the
dispatcher."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
import types
import typing

import pytest

from imnet_assets.runtime import host, procpool, wire, workerpool


def run_script(script, cwd):
    """A script run as a console script is (its own folder on its path, not `cwd`), in a process of
    its own, without PYTHONSAFEPATH; it must exit 0."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    out = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out


def test_workers_find_the_pool_modules_already_imported():
    """A module whose functions run in pools names itself (procpool.preload) when imported; a
    forkserver started after that imports it once, and every worker starts with it loaded. In a
    process of its own: this one's forkserver may have started before (other tests)."""
    import subprocess

    script = (
        "import sys\n"
        "from imnet_assets.stages import index, shard_jobs\n"
        "from imnet_assets.runtime import procpool\n"
        "assert {index.__name__, shard_jobs.__name__} <= set(procpool.preloaded())\n"
        "with procpool.process_pool(1) as pool:\n"
        "    loaded = pool.submit(eval, 'sorted(__import__(\"sys\").modules)').result(timeout=120)\n"
        "missing = [m for m in procpool.preloaded() + ['PIL.Image'] if m not in loaded]\n"
        "print('missing', missing)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "missing []"  # what those modules import came along too


def test_workers_run_this_process_code_from_whatever_folder_it_was_started(tmp_path):
    """Started from a folder holding another `imnet_assets` (a second checkout) and a module named
    like one the workers import, the workers still import this process's: Python 3.11's forkserver
    would put that folder first on its path (`python -c`) and ignore the path it is sent."""

    here = tmp_path / "elsewhere"
    (here / "imnet_assets").mkdir(parents=True)
    (here / "imnet_assets" / "__init__.py").write_text("raise SystemExit('the other checkout')\n")
    (here / "tarfile.py").write_text("raise SystemExit('the folder\\'s tarfile')\n")
    script = tmp_path / "bin" / "console.py"  # a console script: its own folder on its path, not the cwd
    script.parent.mkdir()
    script.write_text(
        "import sys\n"
        "from imnet_assets.runtime import procpool\n"
        "if __name__ == '__main__':\n"
        "    with procpool.process_pool(1) as pool:\n"
        "        seen = pool.submit(eval, '(__import__(\"imnet_assets\").__file__, __import__(\"tarfile\").__file__, "
        "__import__(\"os\").environ.get(\"PYTHONSAFEPATH\"))').result(timeout=120)\n"
        "    import imnet_assets, tarfile\n"
        "    print(seen == (imnet_assets.__file__, tarfile.__file__, None), seen)\n"
    )
    out = run_script(script, here)
    assert out.stdout.startswith("True "), out.stdout


def test_ctrl_c_reaches_neither_the_forkserver_starting_nor_the_workers(tmp_path):
    """Ctrl-C goes to the whole process group; the pool's process handles it. A forkserver hit in
    its start-up imports printed a KeyboardInterrupt traceback and was gone; a worker hit printed
    another. Both start with SIGINT blocked now: hit while starting and while working, the pool
    still runs its jobs, and nothing is printed."""
    import subprocess

    script = tmp_path / "ctrl_c.py"
    script.write_text(
        "import os, signal, time\n"
        "from multiprocessing import forkserver\n"
        "from imnet_assets.runtime import procpool\n"
        "if __name__ == '__main__':\n"
        "    procpool.forkserver_context()\n"
        "    procpool.ensure_forkserver()\n"
        "    time.sleep(0.05)  # in its imports (~0.5 s)\n"
        "    os.kill(forkserver._forkserver._forkserver_pid, signal.SIGINT)\n"
        "    with procpool.process_pool(1) as pool:\n"
        "        pid = pool.submit(os.getpid).result(timeout=120)\n"
        "        os.kill(pid, signal.SIGINT)\n"
        "        print(pool.submit(eval, '6 * 7').result(timeout=120), pool.submit(os.getpid).result(timeout=120) == pid)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "42 True\n" and out.stderr == "", (out.stdout, out.stderr)


def test_starting_the_forkserver_leaves_this_process_environment_alone(tmp_path):
    """The forkserver is told this process's path on its command line, not through the environment:
    a variable set in os.environ while it starts, then removed, was seen half by another thread
    reading the environment meanwhile (every job's submit reads it, wire.environment: KeyError on
    the variable gone between its listing and its read), and inherited by any process another thread
    started. Nothing changes the environment (an audit hook sees every os.putenv/os.unsetenv), at
    its first start or its restart, while another thread reads it all along."""

    script = tmp_path / "env_window.py"
    script.write_text(
        "import os, signal, sys, threading, time\n"
        "from multiprocessing import forkserver\n"
        "from imnet_assets.runtime import procpool, wire\n"
        "if __name__ == '__main__':\n"
        "    for i in range(200):\n"
        "        os.environ[f'FILLER_{i}'] = 'x' * 20\n"
        "    changes, errors, stop = [], [], threading.Event()\n"
        "    sys.addaudithook(lambda event, args: changes.append(args[0]) if event in ('os.putenv', "
        "'os.unsetenv') else None)\n"
        "    def read():\n"
        "        while not stop.is_set():\n"
        "            try:\n"
        "                wire.environment()\n"
        "            except KeyError as e:\n"
        "                errors.append(repr(e))\n"
        "    reader = threading.Thread(target=read)\n"
        "    reader.start()\n"
        "    procpool.forkserver_context()\n"
        "    for _ in range(20):  # started, killed, started again\n"
        "        procpool.ensure_forkserver()\n"
        "        pid = forkserver._forkserver._forkserver_pid\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:\n"
        "            time.sleep(0.001)\n"
        "    with procpool.process_pool(2) as pool:\n"
        "        assert pool.submit(eval, '6 * 7').result(timeout=120) == 42\n"
        "    stop.set()\n"
        "    reader.join()\n"
        "    print(changes, errors[:3])\n"
    )
    out = run_script(script, tmp_path)
    assert out.stdout == "[] []\n", out.stdout


def test_a_failed_forkserver_start_leaves_sigint_unblocked(tmp_path):
    """SIGINT is blocked in the starting thread only while the forkserver starts: a start that
    fails (here out of file descriptors at each step of the start in turn, the spawn's own among
    them) raises, and the thread, the main one here, gets Ctrl-C again."""
    import subprocess

    script = tmp_path / "failed_start.py"
    script.write_text(
        "import os, resource, signal, traceback\n"
        "from multiprocessing import resource_tracker\n"
        "from imnet_assets.runtime import procpool\n"
        "if __name__ == '__main__':\n"
        "    resource_tracker.ensure_running()  # started; the forkserver's start is the one to fail\n"
        "    procpool.forkserver_context()\n"
        "    lowest = os.dup(0)\n"
        "    os.close(lowest)\n"
        "    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "    seen = []\n"
        "    for room in range(2, 12):  # descriptors left: too few at one step of the start, then another\n"
        "        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest + room, hard))\n"
        "        try:\n"
        "            procpool.ensure_forkserver()\n"
        "            break\n"
        "        except OSError:\n"
        "            in_spawn = 'spawnv_passfds' in traceback.format_exc()\n"
        "            seen.append((in_spawn, sorted(signal.pthread_sigmask(signal.SIG_BLOCK, set()))))\n"
        "    print('failed in the spawn', any(s for s, _ in seen), 'blocked after', {str(m) for _, m in seen})\n"
    )
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "failed in the spawn True blocked after {'[]'}\n", out.stdout


def test_a_build_preloads_the_encode_workers_module_by_its_name():
    """`imnet build` names the encode workers' module for the forkserver without importing it
    first (the look's thread imports it while the forkserver starts): the name must stay its name."""
    from imnet_assets.orchestrate.build import SHARD_JOBS_MODULE
    from imnet_assets.stages import shard_jobs

    assert SHARD_JOBS_MODULE == shard_jobs.__name__


def test_main_script_imports_are_read_from_its_source(tmp_path, monkeypatch):
    """The forkserver cannot preload "__main__" itself (Python never hands it the main path), so
    the pool preloads the main script's top-level absolute imports instead."""
    script = tmp_path / "console_script.py"
    script.write_text("from __future__ import annotations\nimport re\nimport json, csv\n"
                      "from dagster.cli import main\nfrom . import relative\nif True:\n    import nested\n")
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__file__=str(script)))
    assert procpool.main_script_imports() == ["re", "json", "csv", "dagster.cli"]
    script.write_text("this is not python (")
    assert procpool.main_script_imports() == []
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace())  # e.g. an interactive session
    assert procpool.main_script_imports() == []


def test_pid_alive_sees_exited_zombie_and_reused_processes():
    import subprocess
    import time

    from imnet_assets.runtime.host import pid_alive

    assert pid_alive(os.getpid()) and pid_alive(os.getpid(), started_by=time.time())
    assert not pid_alive(os.getpid(), started_by=time.time() - 3600)  # "meant a process before mine"
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while pid_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid_alive(child.pid)  # exited, not yet reaped: a zombie is not running
    child.wait()
    assert not pid_alive(child.pid) and not pid_alive(0) and not pid_alive(-1)


@dataclasses.dataclass
class StampJob:
    """A pool job that takes `seconds` and says when it finished."""

    name: str
    seconds: float = 0.0

    def prefetch(self, readers):
        return None

    def run(self, state, mark):
        time.sleep(self.seconds)
        return self.name, time.monotonic()


@dataclasses.dataclass
class IdleOnlyJob:
    """A pool job for an idle worker only (`hold` 1, as the index's scan jobs): takes `seconds`,
    says which process ran it."""

    name: str
    seconds: float = 0.0
    hold: typing.ClassVar[int] = 1

    def prefetch(self, readers):
        return None

    def run(self, state, mark):
        time.sleep(self.seconds)
        return self.name, os.getpid()


def test_a_job_held_by_idle_workers_only_never_waits_behind_a_long_one():
    """Jobs with `hold` 1 wait in the pool's queue for an idle worker, as the old
    ProcessPoolExecutor's shared queue did: none is sent to the worker busy with a long job (where
    it would wait while the other worker idles), though the pool holds up to 4 jobs a worker."""
    pool = workerpool.WorkerPool(2, depth=4)
    long = pool.submit(IdleOnlyJob("long", 4.0))
    deadline = time.monotonic() + 60
    while not long.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    short = [pool.submit(IdleOnlyJob(f"short-{i}", 0.05)) for i in range(6)]
    ran = [f.result(timeout=60) for f in short]
    long_pid = long.result(timeout=60)[1]
    assert [name for name, _ in ran] == [f"short-{i}" for i in range(6)]
    assert {pid for _, pid in ran} == set(pool.pids()) - {long_pid}  # all on the other worker


def test_a_held_job_at_the_queues_head_does_not_stall_the_jobs_behind_it():
    """With both workers busy, a `hold` 1 job at the head of the queue waits for an idle worker, but
    the jobs of its own priority queued behind it (its run's, its stage's) still go to the workers'
    free slots meanwhile, instead of waiting behind it; the held job runs once a worker is idle.
    (Another priority's jobs wait: test_an_older_runs_held_tail_is_not_starved_by_a_younger_runs_jobs.)"""
    pool = workerpool.WorkerPool(2, depth=4)
    busy = [pool.submit(StampJob(f"busy-{i}", 1.5), 1) for i in range(2)]
    deadline = time.monotonic() + 60
    while not all(f.running() for f in busy) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(f.running() for f in busy)
    held = pool.submit(IdleOnlyJob("held", 0.0), 1)
    behind = [pool.submit(StampJob(f"behind-{i}"), 1) for i in range(4)]
    deadline = time.monotonic() + 60
    while not all(f.running() for f in behind) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(f.running() for f in behind) and not held.running()  # sent to the busy workers' free slots
    ends = [f.result(timeout=60)[1] for f in busy]
    held_name, held_pid = held.result(timeout=60)
    assert held_name == "held" and held_pid in pool.pids()
    assert all(f.result(timeout=60)[1] >= min(ends) for f in behind)


@dataclasses.dataclass
class EnvJob:
    """Says what the worker's environment holds for `names`, at its reads and at its run."""

    names: tuple[str, ...]

    def prefetch(self, readers):
        return {n: os.environ.get(n) for n in self.names}

    def run(self, state, mark):
        return state, {n: os.environ.get(n) for n in self.names}


def test_every_job_carries_the_submitters_storage_variables_as_they_are_at_submit():
    """A worker's own environment is the forkserver's, fixed when the first pool started: a storage
    endpoint or IMNET_* setting set later (a test's moto server, a proxy) reaches every job, the
    shard runs' encode jobs as the scan's, before its reads start; one unset later is gone there too."""
    pool = workerpool.WorkerPool(1)
    names = ("AWS_ENDPOINT_URL", "IMNET_TEST_LATE", "HTTPS_PROXY", "OTHER_TEST_LATE")
    saved = {n: os.environ.get(n) for n in names}
    try:
        os.environ["IMNET_TEST_LATE"] = "before"
        assert pool.submit(EnvJob(names)).result(timeout=60)[1]["IMNET_TEST_LATE"] == "before"
        os.environ.update(AWS_ENDPOINT_URL="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:8", OTHER_TEST_LATE="x")
        del os.environ["IMNET_TEST_LATE"]
        at_reads, at_run = pool.submit(EnvJob(names)).result(timeout=60)
        assert at_reads == at_run
        assert at_run["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and at_run["HTTPS_PROXY"] == "http://127.0.0.1:8"
        assert at_run["IMNET_TEST_LATE"] is None
        assert at_run["OTHER_TEST_LATE"] is None  # only the storage and IMNET_* variables travel
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def test_worker_pool_serves_the_oldest_runs_jobs_first():
    """Shard runs sharing the pool are served by priority (next_priority: oldest run first), then
    in submission order: a younger run's jobs wait while an older run has jobs queued."""
    from imnet_assets.runtime.workerpool import WorkerPool, next_priority

    older, younger = next_priority(), next_priority()
    assert older < younger
    pool = WorkerPool(1, depth=1)
    blocker = pool.submit(StampJob("blocker", 0.5), younger)
    deadline = time.monotonic() + 60
    while not blocker.running() and time.monotonic() < deadline:  # the worker holds it: the rest queue
        time.sleep(0.01)
    assert blocker.running()
    queued = [pool.submit(StampJob(f"younger-{i}"), younger) for i in range(3)]
    queued += [pool.submit(StampJob(f"older-{i}"), older) for i in range(3)]
    finished = sorted(f.result(timeout=60) for f in [blocker, *queued])
    order = [name for name, _ in sorted(finished, key=lambda r: r[1])]
    assert order == ["blocker", "older-0", "older-1", "older-2", "younger-0", "younger-1", "younger-2"]


@dataclasses.dataclass
class TailJob:
    """A shard run's tail job (`hold` 2, as shard_jobs.TAIL_HOLD): says when it finished."""

    name: str
    hold: typing.ClassVar[int] = 2

    def prefetch(self, readers):
        return None

    def run(self, state, mark):
        return self.name, time.monotonic()


def test_an_older_runs_held_tail_is_not_starved_by_a_younger_runs_jobs():
    """Runs sharing the pool are served oldest first, a held job too: an older run's tail job (`hold`
    2) waits only till a worker drains below 2 jobs, not while a younger run, which keeps its window
    of workers x depth jobs full as each result comes back (shard_jobs.prepared_samples), refills
    every worker's free slot (it used to wait till the younger run's whole shard was done)."""
    import threading

    from imnet_assets.runtime.workerpool import WorkerPool, next_priority

    older, younger = next_priority(), next_priority()
    pool = WorkerPool(2, depth=4)
    window, total, done = 8, 40, []

    def younger_run():
        futures = [pool.submit(StampJob(f"younger-{i}", 0.1), younger) for i in range(window)]
        for i in range(total):
            done.append(futures[i].result(timeout=120)[1])
            if i + window < total:
                futures.append(pool.submit(StampJob(f"younger-{i + window}", 0.1), younger))

    thread = threading.Thread(target=younger_run)
    thread.start()
    deadline = time.monotonic() + 60
    while len(done) < 2 and time.monotonic() < deadline:  # the younger run is under way, the pool full
        time.sleep(0.01)
    tail = pool.submit(TailJob("older-tail"), older)
    _name, tail_end = tail.result(timeout=120)
    thread.join(timeout=120)
    assert len(done) == total
    after = sum(end < tail_end for end in done)
    assert after < total // 2, f"the older run's tail ended after {after} of the younger run's {total} jobs"


def test_a_cancelled_held_job_holds_nothing_back():
    """A run that fails cancels its queued jobs: a cancelled tail job (`hold` 2) at the head of the
    queue, with every worker holding 2 jobs, does not keep another priority's job from a free slot."""
    pool = workerpool.WorkerPool(2, depth=4)
    busy = [pool.submit(StampJob(f"busy-{i}", 2.0), 0) for i in range(4)]
    deadline = time.monotonic() + 60
    while not all(f.running() for f in busy) and time.monotonic() < deadline:  # 2 in each worker
        time.sleep(0.01)
    assert all(f.running() for f in busy)
    held = pool.submit(TailJob("cancelled"), 1)
    assert held.cancel()
    other = pool.submit(StampJob("other"), 2)
    while not other.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    sent = time.monotonic()
    ends = [f.result(timeout=60)[1] for f in busy]
    assert sent < min(ends), "the other job waited for a worker to drain below the cancelled job's hold"
    assert other.result(timeout=60)[0] == "other" and held.cancelled()

def test_the_dispatch_past_a_held_head_costs_no_look_at_every_worker_per_queued_job():
    """At the real size a run's tail queues TAIL_SINGLES_PER_WORKER x 64 = 512 held single-image jobs
    while 64 workers each hold 2 or 3 jobs: the dispatcher looks for a job that fits at every reply
    (~1,600 a second), so one look must not walk every worker for every queued job (it took ~10 ms,
    the dispatcher's whole time). Measured against one pass over that queue reading each job's hold,
    so a loaded machine slows both alike (about 6 times the pass now; 280 times it before). The
    pool's own state, no processes: 64 workers are not to be had here."""
    import heapq
    from concurrent.futures import Future

    pool = workerpool.WorkerPool.__new__(workerpool.WorkerPool)
    pool.depth = 4
    pool._workers = []
    for i in range(64):
        w = workerpool._Worker(None, None, [-1, 0])
        w.tasks = dict.fromkeys(range(2 + i % 2))
        pool._workers.append(w)
    pool._queue = [(1, i, TailJob(f"tail-{i}"), Future(), ()) for i in range(512)]
    heapq.heapify(pool._queue)

    def best(call, times=20):
        took = []
        for _ in range(times):
            started = time.perf_counter()
            call()
            took.append(time.perf_counter() - started)
        return min(took)

    assert pool._next_job() is None  # every worker holds 2 or more: no single fits
    look = best(pool._next_job)
    walk = best(lambda: [getattr(e[2], "hold", None) for e in pool._queue])
    assert look < 40 * walk, f"one look past the held head took {look * 1e3:.2f} ms, a pass {walk * 1e3:.3f} ms"
    pool._workers[5].tasks = {0: None}  # one worker down to 1 job: the head goes there
    (_p, task_id, _job, _f, _env), fits = pool._next_job()
    assert task_id == 0 and fits == [pool._workers[5]]


def test_no_worker_starts_once_the_process_exits_and_the_exit_prints_nothing(tmp_path):
    """At exit, multiprocessing terminates the pool's workers while its dispatcher thread still
    runs. It must not start replacements then: a start that the exit cut short left the forked child
    printing an EOFError traceback (`preparation_data = reduction.pickle.load(from_parent)`), about
    one exit in ten. Real processes exit here; an exit hook that runs after multiprocessing's (it is
    registered before multiprocessing is imported) counts the workers the pool ever started."""
    import subprocess

    script = tmp_path / "exit.py"
    script.write_text(
        "import atexit, sys, time\n"
        "def report():\n"
        "    time.sleep(1.0)  # the dispatcher has seen the terminated workers by now\n"
        "    print('started', pool.started, flush=True)\n"
        "atexit.register(report)\n"
        "from imnet_assets.runtime.workerpool import shared_pool\n"
        "pool = shared_pool(2)\n"
        "deadline = time.time() + 60\n"
        "while len(pool.pids()) < 2 and time.time() < deadline:\n"
        "    time.sleep(0.05)\n"
        "time.sleep(float(sys.argv[1]))\n"
    )
    procs = [subprocess.Popen([sys.executable, str(script), str(0.5 * i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out == "started 2\n" and err == "", (out, err)


# ----------------------------------------------------------------------------- a job's faults stay its own


def _refuse_to_load():
    raise ValueError("this object cannot be unpickled here")


class Unloadable:
    """Pickles fine; unpickling it raises (a reply, or a job, the other side cannot read)."""

    def __reduce__(self):
        return _refuse_to_load, ()


@dataclasses.dataclass
class ReplyJob:
    """A job whose reply is `value` (or which raises `error`)."""

    value: object = None
    error: BaseException | None = None
    payload: bytes = b""  # sent along (a large job fills the socket of a worker that does not read)
    unloadable_reply: bool = False  # the reply is an Unloadable, made in the worker

    def prefetch(self, readers):
        return None

    def run(self, state, mark):
        if self.error is not None:
            raise self.error
        return Unloadable() if self.unloadable_reply else self.value


@dataclasses.dataclass
class UnloadableJob:
    """A job the worker cannot unpickle."""

    def __reduce__(self):
        return _refuse_to_load, ()


@dataclasses.dataclass
class HangJob:
    """A job whose item `index` never finishes (a hung codec), with a time limit."""

    time_limit: float | None = 1.0
    index: int = 0

    def prefetch(self, readers):
        return None

    def run(self, state, mark):
        mark(self.index)
        time.sleep(3600)


def test_a_jobs_failure_fails_that_job_only_and_the_pool_goes_on():
    """An exception in the worker, a reply that cannot be unpickled, a job that cannot be pickled
    and a job the worker cannot unpickle each fail their own future; the jobs around them (of two
    "runs", at two priorities) succeed, and no worker is replaced (none died)."""
    pool = workerpool.WorkerPool(2, depth=2)
    older, younger = workerpool.next_priority(), workerpool.next_priority()
    good = [pool.submit(ReplyJob(value=("older", i)), older) for i in range(6)]
    bad_reply = pool.submit(ReplyJob(unloadable_reply=True), younger)
    good += [pool.submit(ReplyJob(value=("younger", i)), younger) for i in range(6)]
    raising = pool.submit(ReplyJob(error=KeyError("in the worker")), older)
    unpicklable = pool.submit(ReplyJob(value=lambda: None), younger)  # a lambda does not pickle
    unloadable = pool.submit(UnloadableJob(), older)
    good += [pool.submit(ReplyJob(value=("after", i)), younger) for i in range(6)]
    assert [f.result(timeout=120) for f in good] == (
        [("older", i) for i in range(6)] + [("younger", i) for i in range(6)] + [("after", i) for i in range(6)])
    with pytest.raises(workerpool.ReplyUnreadable, match="cannot be unpickled: ValueError: this object cannot"):
        bad_reply.result(timeout=60)
    with pytest.raises(KeyError, match="in the worker"):
        raising.result(timeout=60)
    with pytest.raises(Exception, match="lambda|pickle"):
        unpicklable.result(timeout=60)
    with pytest.raises(ValueError, match="this object cannot be unpickled"):
        unloadable.result(timeout=60)
    assert pool.started == 2  # every fault was one job's: no worker died
    # and the same workers keep serving
    assert [pool.submit(ReplyJob(value=i)).result(timeout=60) for i in range(4)] == [0, 1, 2, 3]


def test_replies_to_jobs_the_dispatcher_gave_up_on_are_dropped():
    """The dispatcher's last resort (a fault of its own) fails every job it holds; the workers'
    replies to them arrive later and are dropped, never settling (or failing) a later job."""
    pool = workerpool.WorkerPool(1, depth=4)
    slow = [pool.submit(StampJob(f"slow-{i}", 0.5)) for i in range(3)]
    deadline = time.monotonic() + 60
    while not slow[0].running() and time.monotonic() < deadline:  # the worker holds them all
        time.sleep(0.01)
    pool._fail_everything(RuntimeError("the dispatcher failed"))  # what its loop does on an internal error
    for f in slow:
        with pytest.raises(RuntimeError, match="the dispatcher failed"):
            f.result(timeout=10)
    later = [pool.submit(StampJob(f"later-{i}")) for i in range(5)]
    assert [f.result(timeout=60)[0] for f in later] == [f"later-{i}" for i in range(5)]
    assert pool.started == 1


def test_a_hung_job_is_killed_past_its_time_limit_and_fails_alone():
    """A job whose item runs past its `time_limit` gets its worker SIGKILLed: it fails with
    WorkerDied naming the item and the limit; the worker is replaced; jobs on the other worker
    finish meanwhile, and the jobs queued behind the hung one fail as held (no culprit)."""
    pool = workerpool.WorkerPool(2, depth=2)
    hung = pool.submit(HangJob(time_limit=1, index=3))
    deadline = time.monotonic() + 60
    while not pool.working_on() and time.monotonic() < deadline:
        time.sleep(0.01)
    [(pid, job, index)] = pool.working_on()
    assert isinstance(job, HangJob) and index == 3
    others = [pool.submit(StampJob(f"other-{i}", 0.05)) for i in range(10)]
    with pytest.raises(workerpool.WorkerDied) as died:
        hung.result(timeout=120)
    assert died.value.culprit == 3 and died.value.timed_out == 1 and died.value.exitcode == -signal.SIGKILL
    assert not died.value.crashed and "time limit of 1 s" in str(died.value)
    assert not host.pid_alive(pid)
    finished = 0
    for f in others:  # the ones that sat behind the hung job died with it, as held jobs
        try:
            assert f.result(timeout=120)[0].startswith("other-")
            finished += 1
        except workerpool.WorkerDied as e:
            assert e.culprit is None and e.timed_out is None
    assert finished >= 9
    deadline = time.monotonic() + 60
    while pool.started < 3 and time.monotonic() < deadline:  # replaced right after the futures failed
        time.sleep(0.01)
    assert pool.started == 3 and pid not in pool.pids() and len(pool.pids()) == 2


def test_the_dispatcher_does_not_block_on_a_stopped_worker():
    """A worker stopped (SIGSTOP) while holding jobs too big for its socket's buffer: the
    dispatcher queues what the socket does not take and goes on serving the other worker; once
    continued, the stopped worker finishes its jobs."""
    pool = workerpool.WorkerPool(2, depth=2)
    # Wait until both workers are up and listening, then stop the first.
    assert [pool.submit(ReplyJob(value=i)).result(timeout=120) for i in range(4)] == [0, 1, 2, 3]
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        big = b"x" * (8 << 20)  # 8 MB a job: the socket's buffer takes a fraction of that
        # The first goes to the stopped worker (both idle: the first worker is taken); it takes at
        # most `depth` of them, whichever.
        jobs = [pool.submit(ReplyJob(value=i, payload=big if i < 4 else b"")) for i in range(24)]
        deadline = time.monotonic() + 120
        while sum(f.done() for f in jobs) < 24 - pool.depth and time.monotonic() < deadline:
            time.sleep(0.02)
        done = sum(f.done() for f in jobs)
        assert 24 - pool.depth <= done < 24
    finally:
        os.kill(victim, signal.SIGCONT)
    assert [f.result(timeout=120) for f in jobs] == list(range(24))
    assert pool.started == 2


@dataclasses.dataclass
class StallMidReplyJob:
    """A worker that stops (SIGSTOP) in the middle of a reply: it writes a header promising 1 MB and
    100 bytes of it on its own socket, then stops itself."""

    def prefetch(self, readers):
        return None

    def run(self, state, mark):
        import gc

        [conn] = [o for o in gc.get_objects() if isinstance(o, wire.Channel)]
        conn.sock.sendall(wire.HEADER.pack(1 << 20, 123456789) + b"x" * 100)
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(3600)


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rfind(b")") + 2:].split()[0] in (b"T", b"t")


def test_the_dispatcher_does_not_block_on_a_worker_stopped_mid_reply():
    """A worker stopped halfway through sending a reply: the dispatcher keeps what came and serves
    the other worker meanwhile; killed, the stopped worker's job fails alone and it is replaced."""
    pool = workerpool.WorkerPool(2, depth=1)
    assert [pool.submit(ReplyJob(value=i)).result(timeout=120) for i in range(4)] == [0, 1, 2, 3]
    stall = pool.submit(StallMidReplyJob())
    deadline = time.monotonic() + 60
    stopped: list[int] = []
    while not stopped and time.monotonic() < deadline:
        stopped = [p for p in pool.pids() if _stopped(p)]
        time.sleep(0.01)
    assert stopped, "the worker never stopped"
    rest = [pool.submit(ReplyJob(value=f"rest-{i}")) for i in range(20)]
    assert [f.result(timeout=120) for f in rest] == [f"rest-{i}" for i in range(20)]
    assert not stall.done()
    os.kill(stopped[0], signal.SIGKILL)
    with pytest.raises(workerpool.WorkerDied, match="signal 9"):
        stall.result(timeout=60)
    assert [pool.submit(ReplyJob(value=i)).result(timeout=120) for i in range(4)] == [0, 1, 2, 3]
    assert pool.started == 3
