"""Monkeypatching inside the worker pool's process (runtime/workerpool.py), for tests of code that
runs there (the index's scan: stages/scan_pool.py). With one worker (IMNET_WORKERS=1) the patch
reaches every job; `patched_worker` undoes it in that same process when the block ends."""

from __future__ import annotations

import contextlib
import importlib
import os
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
