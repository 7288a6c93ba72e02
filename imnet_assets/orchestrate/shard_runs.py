"""`imnet build`'s shard runs, several at once on threads of this process: how many (runs_at_once),
and each run's result as it finishes (ShardRuns), with what a stop or an error leaves of the others."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from imnet_assets.orchestrate.interrupts import first_done


def runs_at_once(parallel: int | None, workers: int, instance, todo: int) -> int:
    """Shard runs to run at once: `parallel` (`--parallel` / IMNET_PARALLEL_SHARDS), else about the
    cores over `workers` (IMNET_WORKERS) and at least 2 (one run's start, commit and check leave its
    workers idle: a second run fills the gap), at most the instance's pool limit (dagster.yaml's
    `pools: default_limit`, which bounds the shard runs the daemon launches); never more than `todo`."""
    if parallel:
        return max(1, min(parallel, todo))
    cpus = os.cpu_count() or 1
    runs = max(2, round(cpus / workers))
    limit = instance.global_op_concurrency_default_limit if instance is not None else None
    if limit:
        runs = min(runs, limit)
    return max(1, min(runs, todo))


class ShardRuns:
    """Runs `run(key)` -> (result, failures) for shard keys, `runs` at once. `left_behind`: the runs
    still going in other threads when a Ctrl-C came (they end with this process)."""

    def __init__(self, run: Callable[[str], tuple[object, list[str]]], runs: int):
        self.run = run
        self.runs = runs
        self.left_behind = 0
        self._pool = None  # the runs' threads (runs > 1), and the runs started and not yet yielded
        self._pending: dict = {}
        self._stopped = False

    def interrupted(self) -> None:
        """Ctrl-C or SIGTERM came: no run starts any more and none is waited for; `left_behind` counts
        those still going (they end with this process: build.build). Said by `finished` when the
        signal came inside it, and by its caller when it came while the caller handled a result (its
        progress line being printed): the generator, suspended, never sees that one, and its close
        (GeneratorExit) waited for the runs in flight to end, which then committed after the stop."""
        self._stopped = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.left_behind = len(self._pending)

    def finished(self, todo: list[str], stop: Callable[[], bool]) -> Iterator[tuple[str, object, list[str]]]:
        """(key, result, failures) per shard run, as they finish; no new run starts once `stop()`."""
        if self.runs <= 1:  # in this thread: Ctrl-C interrupts the run itself
            for key in todo:
                if stop():
                    return
                yield (key, *self.run(key))
            return
        from concurrent.futures import ThreadPoolExecutor

        pool = self._pool = ThreadPoolExecutor(self.runs, thread_name_prefix="imnet-shard-run")
        queue = iter(todo)
        pending = self._pending
        try:
            for key in queue:
                pending[pool.submit(self.run, key)] = key
                if len(pending) >= self.runs:
                    break
            while pending:
                finished = first_done(pending)
                for fut in finished:
                    key = pending.pop(fut)
                    yield (key, *fut.result())
                    if not stop():
                        nxt = next(queue, None)
                        if nxt is not None:
                            pending[pool.submit(self.run, nxt)] = nxt
        except KeyboardInterrupt:
            # Ctrl-C reaches this thread only; the runs in the others cannot be interrupted from
            # here: they end with this process (build.build), and the next build marks them failed.
            self.interrupted()
            raise
        except BaseException:
            if self._stopped:  # closed after its caller was interrupted (`interrupted`): no wait
                raise
            # a run that could not even be recorded (DAGSTER_HOME full): the others end as they
            # would (the process waits for its threads anyway), none starts, and then the build
            # releases its lease (Build.run) instead of leaving it to a process that is gone
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
