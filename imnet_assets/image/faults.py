"""Test hook of the index's scan workers and the eval set's hashing workers (IMNET_TEST_INDEX_FAULT,
settings.test_index_fault): a real fault met on one raw or eval image's decode, in a worker process
only, so tests cause what SPEC "Failure behaviour" is about instead of imitating it.

`arm(hook)` (a scan or eval job does, with the value its coordinator read: a worker's environment is
the forkserver's) and `hit(point, data)` at the points where an image is decoded: "probe"
(probe_image's header readers: the index only), "phash" (perceptual's thumbnail: the index and
the eval set's hashing, stages/eval_pool.py) and "repair" (decode's second, truncation-tolerant
decode, in its REPAIR_DECODE step: the index's trial decode and staged encodes; a shard run's
encoder where a test's codec arms it). Faults (`<fault>:<sha256>`, `*`: every image, the control
images included):

- crash: SIGSEGV (a read of address 0) at "probe", as a codec crashing on the bytes would;
  crash-phash: the same at "phash"; crash-repair: the same at "repair" (a repair path broken);
- memory-probe, memory-phash: MemoryError raised inside the probe's or the pHash's handling;
- hang: sleeps an hour at "probe" (the time limit's test); slow: sleeps SLOW_SECONDS there (a test
  kills the worker from outside meanwhile, or cuts the tar under its memory map); hang-phash,
  slow-phash: the same at "phash".

Unarmed (every production process), `hit` is one global read.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import time

SLOW_SECONDS = 1.5
_armed: tuple[str, str] | None = None  # (fault, sha256 or "*"), the fault one of settings.INDEX_FAULTS


def _point(fault: str) -> str:
    """Where a fault is met: "phash" for the `-phash` ones (memory-phash, crash-phash ...), "repair"
    for the `-repair` one, else "probe"."""
    for point in ("phash", "repair"):
        if fault.endswith(f"-{point}"):
            return point
    return "probe"


def arm(hook: str | None) -> None:
    """Arm this process's hook with `hook` (settings.test_index_fault's value), or disarm it (None)."""
    global _armed
    if hook is None or multiprocessing.parent_process() is None:  # never in the coordinating process
        _armed = None
        return
    fault, _, sha256 = hook.partition(":")
    _armed = (fault, sha256)


def hit(point: str, data) -> None:
    """Meet the armed fault when it is for `point` and for these bytes."""
    if _armed is None:
        return
    fault, sha256 = _armed
    if _point(fault) != point or (sha256 != "*" and hashlib.sha256(data).hexdigest() != sha256):
        return
    if fault.startswith("crash"):
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV
    elif fault.startswith("memory"):
        raise MemoryError(f"test hook IMNET_TEST_INDEX_FAULT ({fault})")
    else:
        time.sleep(3600 if fault.startswith("hang") else SLOW_SECONDS)
