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
"""

from __future__ import annotations

import ast
import multiprocessing
import os
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import wait

EXIT_PARENT_GONE = 70
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
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", *main_script_imports(), *_preloaded])
    return ctx


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A forkserver pool of `workers` processes that exit when this process dies."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=forkserver_context(), initializer=watch_parent)


def start_forkserver() -> None:
    """Start this process's forkserver (and its imports of the pool modules, ~0.5 s) in the
    background now, so that the first pool started later forks its workers at once."""
    from multiprocessing import forkserver

    forkserver_context()
    threading.Thread(target=forkserver.ensure_running, name="forkserver-start", daemon=True).start()


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
