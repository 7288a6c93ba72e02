"""Process pools: workers start from a forkserver that already holds the modules pools run, and
the main script's imports (exit-with-parent is covered by tests/integration/test_crash_safety.py)."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import types

from imnet_assets.core import procpool


def test_workers_find_the_pool_modules_already_imported():
    with procpool.process_pool(1) as pool:
        loaded = pool.submit(eval, "sorted(__import__('sys').modules)").result(timeout=120)
        pid = pool.submit(eval, "__import__('os').getpid()").result(timeout=120)
    assert pid != __import__("os").getpid()
    for name in procpool.POOL_MODULES:
        assert name in loaded
    assert "PIL.Image" in loaded  # what those modules import came along


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


def test_bounded_map_keeps_order_and_at_most_window_tasks_ahead():
    from concurrent.futures import ThreadPoolExecutor

    pulled = []

    def items():
        for i in range(50):
            pulled.append(i)
            yield i

    with ThreadPoolExecutor(4) as pool:
        results = procpool.bounded_map(pool, pow, items(), 5, 2)
        for consumed, value in enumerate(results, 1):
            assert value == (consumed - 1) ** 2
            assert len(pulled) <= consumed + 5  # never more than the window ahead of the consumer
    assert len(pulled) == 50


def test_pid_alive_sees_exited_zombie_and_reused_processes():
    import subprocess
    import time

    from imnet_assets.core.procpool import pid_alive

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


def test_worker_pool_serves_the_oldest_runs_jobs_first():
    """Shard runs sharing the pool are served by priority (next_priority: oldest run first), then
    in submission order: a younger run's jobs wait while an older run has jobs queued."""
    from imnet_assets.core.procpool import WorkerPool, next_priority

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
        "from imnet_assets.core.procpool import shared_pool\n"
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
