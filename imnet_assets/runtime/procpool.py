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
own: a protocol mismatch at best ("EOFError"), different shard bytes at worst. So its command,
however it is started (a pool, a process's start, a restart), first sets sys.path to this
process's (the current folder gone from it) before any import: multiprocessing's spawn
(util.spawnv_passfds) is wrapped, for the forkserver's command alone. Nothing goes through the
environment: a variable set there for the start is seen by every thread (a job's submit reading
it, wire.environment) and inherited by any process another thread starts meanwhile.

The forkserver, the resource tracker and the workers never see Ctrl-C: they start with SIGINT
blocked (a mask survives fork and exec). Ctrl-C reaches the whole process group; this process
handles it, and its children end with it (watch_parent; the forkserver when its last client is
gone); the wrapped spawn blocks it in the starting thread for the forkserver's start alone.
Before, a Ctrl-C in the first second of a build printed the forkserver's KeyboardInterrupt
traceback from inside its imports (or "Fatal Python error: init_import_site"), and each worker's.
"""

from __future__ import annotations

import ast
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import wait

from imnet_assets.runtime.worker_memory import keep_freed_memory

EXIT_PARENT_GONE = 70
_FORKSERVER_COMMAND = "from multiprocessing.forkserver import main"  # how multiprocessing's starts


def _forkserver_spawn(spawnv_passfds):
    """multiprocessing's spawn of a process, for the forkserver's start (`python -c 'from
    multiprocessing.forkserver import main; ...'`): with this process's sys.path set before its
    first import, and with SIGINT blocked (see the module's docstring). Other spawns (the
    resource tracker, the spawn start method) pass unchanged."""

    def spawn(path, args, passfds):
        if len(args) < 2 or args[-2] != "-c" or not str(args[-1]).startswith(_FORKSERVER_COMMAND):
            return spawnv_passfds(path, args, passfds)
        here = [p for p in sys.path if isinstance(p, str)]  # the import system skips other entries
        args = [*args[:-2], "-c", f"import sys; sys.path[:] = {here!r}; {args[-1]}"]
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # this thread's, for the start
        try:
            return spawnv_passfds(path, args, passfds)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    spawn.unwrapped = spawnv_passfds
    return spawn


if not hasattr(multiprocessing.util.spawnv_passfds, "unwrapped"):  # once a process
    multiprocessing.util.spawnv_passfds = _forkserver_spawn(multiprocessing.util.spawnv_passfds)

# Modules whose functions run in these pools (the scan and the encoder): each names itself with
# preload(__name__), so the forkserver imports them once and every worker starts with them loaded.
_preloaded: list[str] = []


def preload(module: str) -> None:
    """Have the forkserver (when it starts after this call) import `module` before forking workers."""
    if module not in _preloaded:
        _preloaded.append(module)


def preloaded() -> list[str]:
    return list(_preloaded)


def worker_start() -> None:
    """What every pool worker does first: exit with its parent (watch_parent), and keep the memory
    it frees for its next task (worker_memory)."""
    keep_freed_memory()
    watch_parent()


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
    """The forkserver start method, its preloads this process's (see the module's docstring)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "__main__", *main_script_imports(), *_preloaded])
    return ctx


def ensure_forkserver() -> None:
    """Start this process's forkserver if it is not running (as starting a process with it would)."""
    from multiprocessing import forkserver

    forkserver.ensure_running()


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A forkserver pool of `workers` processes that exit when this process dies."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=forkserver_context(), initializer=worker_start)


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
