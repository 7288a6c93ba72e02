"""Process pools whose workers never outlive the process that started them.

A `ProcessPoolExecutor` worker blocks reading its task queue, and with the forkserver start
method every worker also holds the forkserver's "alive" pipe: when the parent is SIGKILLed
(OOM killer, a run terminated from the UI, `kill -9`), nothing ever wakes them, so the workers
and the forkserver would sit there forever. Each worker here watches its parent's sentinel (a
pipe the parent alone holds open) in a daemon thread and exits as soon as the parent is gone.

Workers start fast: the forkserver imports, once, what every worker would otherwise import again
before its first task. Python keeps one forkserver per process, started by whichever pool comes
first with that pool's preload list, so every pool asks for the same list: the modules whose
functions run in pools, and what the main script imports. (Multiprocessing's "safe importing of
main" re-runs the main script in each worker; for the `dagster` and `imnet` console scripts that
is all of Dagster, 0.7-2.5 s of CPU per worker per shard run. A "__main__" preload does not help:
Python 3.11's forkserver is never told the main script's path.)

The forkserver gets this process's sys.path, never the folder it was started from. Python 3.11
runs it as `python -c ...`, which puts the current folder first on sys.path, and ignores the path
the parent sends. Started from a folder holding another `imnet_assets` (a second checkout) or any
module named like one the workers import, the workers ran that code while this process ran its
own: a protocol mismatch at best ("EOFError"), different shard bytes at worst. So it starts with
PYTHONSAFEPATH (no current folder on its path), and its first import (this module) sets sys.path
to this process's (a test's `tests` package, an added folder).

The forkserver, the resource tracker and the workers never see Ctrl-C: they start with SIGINT
blocked (a mask survives fork and exec). Ctrl-C reaches the whole process group; this process
handles it, and its children end with it (watch_parent; the forkserver when its last client is
gone). Before, a Ctrl-C in the first second of a build printed the forkserver's KeyboardInterrupt
traceback from inside its imports (or "Fatal Python error: init_import_site"), and each worker's.
"""

from __future__ import annotations

import ast
import json
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import wait

EXIT_PARENT_GONE = 70
SYS_PATH_VAR = "_IMNET_FORKSERVER_SYS_PATH"  # no IMNET_ prefix: jobs never carry it (wire.ENV_PREFIXES)
_SAFE_PATH_VAR = "PYTHONSAFEPATH"
_start_lock = threading.Lock()

if SYS_PATH_VAR in os.environ:  # imported first in a forkserver this module started: its parent's path
    _told = json.loads(os.environ.pop(SYS_PATH_VAR))
    sys.path[:] = _told["sys_path"]
    if _told["safe_path_set"]:  # ours, not the user's: its workers' children get the usual path
        os.environ.pop(_SAFE_PATH_VAR, None)
# Modules whose functions run in these pools (the scan and the encoder): each names itself with
# preload(__name__), so the forkserver imports them once and every worker starts with them loaded.
_preloaded: list[str] = []


def preload(module: str) -> None:
    """Have the forkserver (when it starts after this call) import `module` before forking workers."""
    if module not in _preloaded:
        _preloaded.append(module)


def preloaded() -> list[str]:
    return list(_preloaded)


def watch_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    try:
        sentinel = parent.sentinel
    except ValueError:
        return

    def watch() -> None:
        wait([sentinel])  # readable (EOF) only once the parent has exited
        os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def forkserver_context():
    """The forkserver start method. Call `ensure_forkserver` before starting a process with it."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "__main__", *main_script_imports(), *_preloaded])
    return ctx


def ensure_forkserver() -> None:
    """Start this process's forkserver if it is not running, with this process's sys.path (see the
    module's docstring), as starting a process would. Its environment is this process's, plus the
    two variables for the moment it takes to start it: a process another thread starts in that
    moment inherits them too, so the environment is touched only when the forkserver starts (once
    a process, not at every worker's start)."""
    from multiprocessing import forkserver, resource_tracker

    # The forkserver starts the resource tracker first, and unblocks SIGINT after starting it
    # (blocked there too): started before, it is left alone and the mask below holds.
    resource_tracker.ensure_running()
    with _start_lock:
        if _forkserver_running():
            return
        told = {"sys_path": list(sys.path), "safe_path_set": _SAFE_PATH_VAR not in os.environ}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # this thread's, for the start
        try:
            os.environ[SYS_PATH_VAR] = json.dumps(told)
            if told["safe_path_set"]:
                os.environ[_SAFE_PATH_VAR] = "1"
            forkserver.ensure_running()
        finally:
            os.environ.pop(SYS_PATH_VAR, None)
            if told["safe_path_set"]:
                os.environ.pop(_SAFE_PATH_VAR, None)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _forkserver_running() -> bool:
    """Whether this process's forkserver was started and has not exited (asked without reaping it:
    multiprocessing's own check reaps it, and restarts it, when it has)."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid is None:
        return False
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:  # reaped by someone else: multiprocessing's check says what follows
        return False


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A forkserver pool of `workers` processes that exit when this process dies."""
    ctx = forkserver_context()
    ensure_forkserver()
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=watch_parent)


def start_forkserver() -> None:
    """Start this process's forkserver (and its imports of the pool modules, ~0.5 s) in the
    background now, so that the first pool started later forks its workers at once."""
    forkserver_context()
    threading.Thread(target=ensure_forkserver, name="forkserver-start", daemon=True).start()


def main_script_imports() -> list[str]:
    """Modules the main script imports at its top level (absolute imports only), or []."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read())
    except (TypeError, OSError, SyntaxError, ValueError):
        return []
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return [n for n in dict.fromkeys(names) if n != "__future__"]
