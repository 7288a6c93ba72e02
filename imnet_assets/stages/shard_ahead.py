"""Encoding ahead of a shard run: the first jobs of the shard `imnet build` runs first go to the
worker pool while the build is still starting (Dagster's imports, the instance, its runs' set-up),
and the shard run takes their results over once it starts (`shard.build_shard(ahead=...)`), so
the cores encode from the build's first second instead of from its first run.

Nothing is written ahead and nothing is decided ahead: the run takes its lease, reads its plan
slice and submits its jobs as always; a job submitted ahead is taken over only when it is equal to
the job the run is about to submit (same rows, encode settings, decode sampling, time limit and
test hooks), and whatever is not taken over is cancelled (`drop`). What is held ahead is bounded
(AHEAD_IMAGES_PER_WORKER per worker, at most AHEAD_MAX_IMAGES): the run consumes it in order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from imnet_assets.release.plan import read_slice
from imnet_assets.runtime.workerpool import next_priority, shared_pool
from imnet_assets.stages.shard_jobs import encode_jobs
from imnet_assets.stages.staged_encodes import read_lookup

AHEAD_IMAGES_PER_WORKER = 96  # ~3.5 s of encoding per worker: what a build's start takes on 2 cores
AHEAD_MAX_IMAGES = 2048  # ~100-200 MB of encoded samples held at most, however many workers


@dataclass
class Ahead:
    """A shard's first jobs, submitted to the pool with the priority its run keeps."""

    priority: int
    jobs: list = field(default_factory=list)  # (EncodeJob, Future) in order

    @property
    def images(self) -> int:
        return sum(len(job.rows) for job, _ in self.jobs)


_lock = threading.Lock()
_ahead: dict[tuple[str, str], Ahead] = {}  # (out root, shard key) -> its jobs submitted ahead


def start(out_root: str, raw_root: str, shard_key: str, settings, workers: int, decode_every: int,
          encode: Callable | None = None) -> Ahead:
    """Submit the first jobs of `shard_key` (as its run would make them) to this process's pool."""
    rows, _digest = read_slice(out_root, shard_key, set_aside=False)  # the run itself sets a damaged one aside
    staged = read_lookup(out_root, shard_key, rows, settings, log=lambda _m: None)  # the run reads it again, and says so
    budget = min(AHEAD_MAX_IMAGES, AHEAD_IMAGES_PER_WORKER * workers)
    pool = shared_pool(workers)
    ahead = Ahead(next_priority())
    for job in encode_jobs(rows, raw_root, settings, workers, decode_every, encode, staged):
        if ahead.images >= budget:
            break
        ahead.jobs.append((job, pool.submit(job, ahead.priority)))
    with _lock:
        old = _ahead.pop((out_root, shard_key), None)
        _ahead[(out_root, shard_key)] = ahead
    if old is not None:
        _cancel(old)
    return ahead


def take(out_root: str, shard_key: str) -> Ahead | None:
    """The jobs submitted ahead for this shard (once: the run that takes them consumes them)."""
    with _lock:
        return _ahead.pop((out_root, shard_key), None)


def drop() -> None:
    """Cancel every job submitted ahead that no run took over (the build ends, or did not run them)."""
    with _lock:
        left = list(_ahead.values())
        _ahead.clear()
    for ahead in left:
        _cancel(ahead)


def _cancel(ahead: Ahead) -> None:
    for _job, future in ahead.jobs:
        future.cancel()
