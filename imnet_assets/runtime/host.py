"""This host's identity for judging whether a process named in a record is gone: its pid namespace
and whether a process number is still held by the process meant. Runs (schedules.fail_dead_runs),
leases (lease.py) and upload leases (atomic.remove_partials) ask it; it imports nothing of the package.
"""

from __future__ import annotations

import os


def pid_namespace() -> str | None:
    """This process's pid namespace ("pid:[4026531836]"), where /proc shows it. Process numbers
    mean something only within one namespace: containers on the host's network have the host's
    name but numbers of their own, so a process of another namespace cannot be asked with
    `pid_alive` (None: not Linux, every process of the host is taken as one namespace)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def pid_alive(pid: int, started_by: float | None = None) -> bool:
    """Whether process `pid` of this host is running (not a zombie) and, when `started_by` (a Unix
    time) is given, started no later than that: a process that started after it is a reuse of the
    number by someone else, so the process that was meant is gone."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # is the number taken at all?
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # taken, by another user's process
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # no /proc (not Linux) or not ours to see (hidepid): the number is taken
        return True
    fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) ": state is field 3
    if fields[0] in (b"Z", b"X"):
        return False
    if started_by is None:
        return True
    return _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK") <= started_by + 1.0


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


def memory_limit(cgroup_root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int:
    """The bytes this process and those it starts may hold: the host's physical memory, or less
    where a cgroup limits it (a container's or a Kubernetes pod's limit, which /proc/meminfo and
    DuckDB's default of 80% of RAM do not see). This process's cgroups and those above them are
    looked at as this host mounts them (v2 `memory.max`, also under `unified/` on a hybrid host;
    v1 `memory.limit_in_bytes`); a container that sees its own cgroup as the root finds its limit
    there. A file that is not there or says "max" limits nothing."""
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:  # not Linux
        lines = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            places = [(cgroup_root, "memory.max"), (os.path.join(cgroup_root, "unified"), "memory.max")]
        elif "memory" in controllers.split(","):
            places = [(os.path.join(cgroup_root, "memory"), "memory.limit_in_bytes")]
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for base, name in places:
            for depth in range(len(parts), -1, -1):
                limits += [n for n in [_limit_in(os.path.join(base, *parts[:depth], name))] if n]
    return min(limits)


def _limit_in(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):  # not there, or "max"
        return None
