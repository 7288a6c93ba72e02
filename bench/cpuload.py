"""Wall time, the CPU time of this process tree, and what the rest of the machine used meanwhile.

On a shared machine the wall time of a run depends on what else runs. `measure(fn)` also returns
the CPU seconds this process and its children used (including worker processes forked by a
multiprocessing forkserver, which are counted once the forkserver has reaped them) and the CPU
seconds the whole machine was busy (from /proc/stat), so a report can show how loaded the machine
was. Linux only; elsewhere the CPU figures are NaN.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class Sample:
    wall: float
    cpu: float  # this process tree
    machine: float  # every CPU's busy time, all processes
    own: float = 0.0  # this process alone (all its threads)

    @property
    def others_cores(self) -> float:
        """Cores' worth of CPU that other processes used during the run."""
        return max(0.0, (self.machine - self.cpu) / self.wall) if self.wall > 0 else 0.0

    @property
    def cores(self) -> float:
        return self.cpu / self.wall if self.wall > 0 else 0.0


def _machine_busy() -> float:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return float("nan")
    v = [int(x) for x in fields]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    guest = sum(v[8:10]) if len(v) > 9 else 0  # already counted in user / nice
    return (sum(v) - idle - guest) / _TICK


def proc_stats() -> dict[int, tuple[int, float, float, int]]:
    """pid -> (parent pid, its own CPU seconds, its reaped children's, start time in ticks) for
    every process /proc shows now."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {}
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
        out[int(pid)] = (int(rest[1]), (utime + stime) / _TICK, (cutime + cstime) / _TICK, int(rest[19]))
    return out


def _children_cpu() -> float:
    """CPU of every live descendant (and of their reaped children), from /proc: the encode
    workers are grandchildren (children of the forkserver) and live as long as this process
    (runtime.workerpool.shared_pool), so they are never reaped into RUSAGE_CHILDREN."""
    me = os.getpid()
    stats = proc_stats()
    if not stats:
        return float("nan")
    total = 0.0
    for ppid, own, reaped, _start in stats.values():
        p, seen = ppid, 0
        while p and p != me and seen < 64:
            p, seen = stats.get(p, (None,))[0], seen + 1
        if p == me:
            total += own + reaped
    return total


def own_cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def tree_cpu() -> float:
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own_cpu() + reaped.ru_utime + reaped.ru_stime + _children_cpu()


def measure(fn) -> Sample:
    o0, c0, m0, t0 = own_cpu(), tree_cpu(), _machine_busy(), time.perf_counter()
    fn()
    t1 = time.perf_counter()
    return Sample(t1 - t0, tree_cpu() - c0, _machine_busy() - m0, own_cpu() - o0)


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far; NaN once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(rest[11]) + int(rest[12])) / _TICK
