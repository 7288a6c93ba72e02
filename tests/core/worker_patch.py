"""Monkeypatching inside the worker pool's process (runtime/workerpool.py), for tests of code that
runs there (the index's scan: stages/scan_pool.py). With one worker (IMNET_WORKERS=1) the patch
reaches every job; `patched_worker` undoes it in that same process when the block ends."""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from imnet_assets.runtime.workerpool import shared_pool

_saved: dict[tuple[str, str], tuple[bool, object]] = {}  # in the worker: what a patch replaced


@dataclass
class SetAttr:
    """A pool job that sets `module`.`path` (`property(value)` with `as_property`) in the worker
    running it, or (`restore`) puts back what it replaced. Returns the worker's process id."""

    module: str
    path: str
    value: object = None
    as_property: bool = False
    restore: bool = False

    def prefetch(self, readers):
        return None

    def run(self, _state, _mark) -> int:
        owner = importlib.import_module(self.module)
        *parents, name = self.path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        key = (self.module, self.path)
        if self.restore:
            had, old = _saved.pop(key)
            if had:
                setattr(owner, name, old)
            else:
                delattr(owner, name)
        else:
            _saved.setdefault(key, (name in owner.__dict__, owner.__dict__.get(name)))
            setattr(owner, name, property(self.value) if self.as_property else self.value)
        return os.getpid()


@contextlib.contextmanager
def patched_worker(module: str, path: str, value, as_property: bool = False):
    """`module`.`path` replaced by `value` in the one worker of the shared pool (IMNET_WORKERS=1)."""
    pool = shared_pool(1)
    pid = pool.submit(SetAttr(module, path, value, as_property)).result()
    try:
        yield
    finally:
        assert pool.submit(SetAttr(module, path, restore=True)).result() == pid  # the same worker


def when_working(matches: Callable[[object, int], bool], act: Callable[[int], None],
                 workers: int = 2) -> tuple[threading.Thread, list[int]]:
    """A started thread that waits (up to 60 s) until a worker of this process's pool works on an
    item `matches(job, marked index)` says yes to, then calls `act(pid)` once on that worker; the
    returned list then holds its pid."""
    pool = shared_pool(workers)
    done: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + 60
        while not done and time.monotonic() < deadline:
            for pid, job, at in pool.working_on():
                if matches(job, at):
                    act(pid)
                    done.append(pid)
                    break
            time.sleep(0.01)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread, done
