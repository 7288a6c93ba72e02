"""Process pools whose workers never outlive the process that started them.

A `ProcessPoolExecutor` worker blocks reading its task queue, and with the forkserver start
method every worker also holds the forkserver's "alive" pipe: when the parent is SIGKILLed
(OOM killer, a run terminated from the UI, `kill -9`), nothing ever wakes them, so the workers
and the forkserver would sit there forever. Each worker here watches its parent's sentinel (a
pipe the parent alone holds open) in a daemon thread and exits as soon as the parent is gone.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import wait

EXIT_PARENT_GONE = 70


def _watch_parent() -> None:
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


def process_pool(workers: int, preload: Sequence[str] = ()) -> ProcessPoolExecutor:
    """A forkserver pool of `workers` processes that exit when this process dies."""
    ctx = multiprocessing.get_context("forkserver")
    if preload:
        ctx.set_forkserver_preload(list(preload))
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_watch_parent)
