"""One shard run's encoding, as jobs for the process's worker pool (runtime/workerpool.py).

Everything per image runs in the encode workers: read the source by (tar, offset, size), check its
sha256 against the plan, encode, hash the stored image, decode the sampled ones, and build the
sample's three tar members (release/sample_tar.py) as one bytes object. `prepared_samples` hands
the coordinator (stages/shard.py) each sample in plan order, and settles what the workers' deaths
mean: a crash the image causes twice excludes it, once the control image of its kind passed the
same encoder (stages/crash_control.py; else a MachineryFault fails the run); kills from outside,
time-outs and memory errors cost retries, then fail the run naming the image (SPEC: Failure behaviour).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from imnet_assets.image.encode import Encoded, EncodeSettings, encode_or_refusal, path_settings
from imnet_assets.image.guard import MachineryFault
from imnet_assets.release.changed_sources import SourceChanged
from imnet_assets.release.outroot import sample_digest
from imnet_assets.release.plan import SliceRow
from imnet_assets.release.sample_tar import sample_bytes
from imnet_assets.release.verify import stored_image_problem
from imnet_assets.runtime.deaths import (
    CRASHED,
    HELD,
    KILLED,
    OUT_OF_MEMORY,
    TIMED_OUT,
    DeathCount,
)
from imnet_assets.runtime.procpool import preload
from imnet_assets.runtime.workerpool import (
    ReplyUnreadable,
    WorkerDied,
    WorkerPool,
    shared_pool,
)
from imnet_assets.stages.crash_control import crash_hook, settle_crash
from imnet_assets.stages.staged_encodes import StagedRef, read_staged
from imnet_assets.storage import fs
from imnet_assets.storage.rawfolders import source_location

preload(__name__)  # the forkserver imports this module once for all workers


class SourceUnreadable(OSError):
    """A raw tar could not be read at all (gone, no permission, an I/O or network error that
    outlasted the retries). Not a property of the image: the shard run fails, naming the tar, and
    commits nothing, so that a rerun builds the shard whole once the storage answers again."""


class EncoderOutOfMemory(MemoryError):
    """An image ran its encoder out of memory again and again. Memory is no property of the image
    (size limits are settled at index time, the same everywhere), so it is not excluded: the shard
    run fails, naming it, and commits nothing."""


class EncoderKilled(RuntimeError):
    """The encode process working on an image was killed from outside (SIGKILL: the OOM killer, a
    cgroup limit, preemption; SIGTERM) again and again, or ran past IMNET_IMAGE_TIMEOUT again and
    again (each time in a fresh process). Neither is a property of the image that may exclude it
    (shard contents never depend on memory pressure): the shard run fails, naming it, and commits
    nothing."""


READ_RETRY_SECONDS = (0.5, 2.0)  # waits before the second and third attempt of a failed read


BATCH = 8  # images per job sent to a worker (fewer for small shards, so every worker gets some)
# A run's last images go one a job, this many per worker: each worker holds up to `depth` jobs
# (workerpool), so at the end of the build's last shard, when no other run fills the pool, one
# worker could still hold several jobs of BATCH images (~0.3 s each) while the others idle. With
# single images last, the workers end within about one image of each other. A single goes only to a
# worker holding fewer than TAIL_HOLD jobs (workerpool's `hold`): pushed into the queue of a worker
# busy with a batch, it would wait there while another worker idles.
TAIL_SINGLES_PER_WORKER = 8
TAIL_HOLD = 2


_reader: tuple[int, fs.RangeReader] | None = None


def _range_reader() -> fs.RangeReader:
    """This process's reader of raw tars (its open files are per thread)."""
    global _reader
    if _reader is None or _reader[0] != os.getpid():
        _reader = (os.getpid(), fs.RangeReader())
    return _reader[1]


def _read_source(row: SliceRow, raw_root: str) -> tuple[bytes, str]:
    """The row's source bytes (and "": no problem). A tar that cannot be read at all raises
    SourceUnreadable once the retries are spent; bytes that are not the indexed ones (fewer, or
    another sha256: the tar changed since indexing) raise SourceChanged, which fails the run and
    marks the tar for the index (build_shard): no property of the image, so never an exclusion."""
    url, offset = source_location(raw_root, row.tar, row.member, row.offset)  # a tar member, or a whole file
    reader = _range_reader()
    for wait in (*READ_RETRY_SECONDS, None):
        try:
            data = reader.read(url, offset, row.size)
            break
        except Exception as e:  # noqa: BLE001 - retried, then raised as what it is
            if wait is None:
                raise SourceUnreadable(fs.redact(
                    f"cannot read raw tar {url} at byte {offset} (for {row.key}): {type(e).__name__}: {e}; "
                    "if it moved or changed since indexing, `imnet build` indexes it again")) from None
            time.sleep(wait)
    if len(data) != row.size:
        found = f"a read of {len(data)} of its {row.size} bytes"
    elif (got := hashlib.sha256(data).hexdigest()) != row.sha256:
        found = f"sha256 {got}, indexed {row.sha256}"
    else:
        return data, ""
    raise SourceChanged(
        f"source of {row.key} changed since indexing: raw tar {row.tar} member {row.member} at byte {row.offset}: "
        f"{found}. Nothing was committed; the tar is marked for the index: the next `imnet build` indexes it "
        "again", row.tar, row.member, found)


def _read_input(row: SliceRow, ref: StagedRef | None, raw_root: str) -> tuple[bytes | None, str, Encoded | None]:
    """(source bytes, "", None), or (None, "", the staged image) when the index staged it and its
    bytes read back exact, or (None, the encoder's reason, None) when it refused the image then.
    A staged image that cannot be had exactly is read and encoded from its source instead."""
    if ref is not None:
        if ref.reason is not None:
            return None, ref.reason, None
        staged = read_staged(_range_reader(), ref)
        if staged is not None:
            return None, "", staged
    return (*_read_source(row, raw_root), None)


def prepare_sample(row: SliceRow, data: bytes | None, problem: str, settings: EncodeSettings,
                   decode_every: int, encode: Callable | None = None, crash_sha256: str | None = None,
                   staged: Encoded | None = None) -> tuple:
    """("ok", sample bytes, manifest record, check problem, outroot.sample_digest of the sample bytes,
    whether the stored image was the staged one) or ("excluded", reason) for one row. `staged`: its
    stored image, encoded by the index's pass (stages/staged_encodes.py), checked like one encoded here.
    MemoryError propagates (the worker exits and the image is tried again in a fresh process);
    a MachineryFault (image/guard.py: the codec fails a known-good image too) fails the run."""
    if staged is not None:
        enc = staged
    elif data is None:
        return "excluded", problem
    else:
        crash_hook(row.sha256, crash_sha256)  # the test hook (crash_control.crash_hook)
        try:
            enc = encode_or_refusal(data, settings, encode)
        except MachineryFault as e:
            raise MachineryFault(f"{e} (met on {row.key}, raw tar {row.tar} at byte {row.offset}; nothing was "
                                 "committed)") from e
        if isinstance(enc, str):
            return "excluded", enc
    webp_sha256 = hashlib.sha256(enc.webp)
    record = {
        "key": row.key, "position": row.position, "width": enc.width, "height": enc.height,
        "orig_width": enc.orig_width, "orig_height": enc.orig_height, "webp_bytes": len(enc.webp),
        "webp_sha256": webp_sha256.hexdigest(), "repaired": enc.repaired,
    }
    decode = enc.repaired or (decode_every > 0 and row.position % decode_every == 0)
    blob = sample_bytes(row, enc, settings.alt_labels, settings.extension)
    problem = stored_image_problem(settings.extension, enc.webp, (enc.width, enc.height), decode)
    return "ok", blob, record, problem, sample_digest(blob, webp_sha256.digest(), len(enc.webp)), staged is not None


@dataclass
class EncodeJob:
    """A few consecutive rows of a plan slice, for one encode worker (workerpool.WorkerPool)."""

    raw_root: str
    rows: list[SliceRow]
    settings: EncodeSettings
    decode_every: int
    encode: Callable | None = None  # None: encode_image (bench/scaleup.py passes a null codec)
    crash_sha256: str | None = None  # test hook, see crash_control.crash_hook
    time_limit: float | None = None  # seconds per image (IMNET_IMAGE_TIMEOUT): the pool kills a worker past it
    staged: tuple | None = None  # per row its staged_encodes.StagedRef or None (None: no row staged)
    hold: int | None = None  # the pool sends it only to a worker holding fewer jobs (None: up to its depth)

    def prefetch(self, readers):
        staged = self.staged or (None,) * len(self.rows)
        return [readers.submit(_read_input, row, ref, self.raw_root) for row, ref in zip(self.rows, staged)]

    def run(self, reads, mark) -> list[tuple]:
        out = []
        for i, (row, read) in enumerate(zip(self.rows, reads)):
            data, problem, staged = read.result()
            mark(i)
            out.append(prepare_sample(row, data, problem, self.settings, self.decode_every, self.encode,
                                      self.crash_sha256, staged))
            mark(-1)  # waiting for the next read is not this image's time
        return out


def _batch_size(rows: int, workers: int) -> int:
    return max(1, min(BATCH, rows // (workers * 4)))


def encode_jobs(rows: list[SliceRow], raw_root: str, settings: EncodeSettings, workers: int, decode_every: int,
                encode: Callable | None = None, staged: tuple | None = None) -> Iterator[EncodeJob]:
    """The jobs a shard run's rows go to the encoders in, in order (shard_ahead submits the first
    ones of a run before it starts: equal jobs, so the run takes their results over)."""
    from imnet_assets.settings import image_timeout, test_crash_sha256

    crash, limit = test_crash_sha256(), image_timeout()
    tail = _tail_start(len(rows), workers)
    return (EncodeJob(raw_root, rows[a:b], settings, decode_every, encode, crash, limit, _part(staged, a, b),
                      TAIL_HOLD if a >= tail else None)  # one worker: no tail (_tail_start)
            for a, b in job_spans(len(rows), workers))


def _tail_start(rows: int, workers: int) -> int:
    """Where the run's single-image tail starts (rows: none, for one worker)."""
    return rows - min(rows, TAIL_SINGLES_PER_WORKER * workers) if workers > 1 else rows


def job_spans(rows: int, workers: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each job's rows, in order: jobs of _batch_size rows, then, with more than
    one worker, the last TAIL_SINGLES_PER_WORKER * workers rows one a job (one worker has no other
    to end with)."""
    batch = _batch_size(rows, max(workers, 1))
    tail = _tail_start(rows, workers)
    for a in range(0, tail, batch):
        yield a, min(a + batch, tail)
    for a in range(tail, rows):
        yield a, a + 1


def _part(staged: tuple | None, start: int, end: int) -> tuple | None:
    part = staged[start:end] if staged else None
    return part if part and any(part) else None


def prepared_samples(rows: list[SliceRow], raw_root: str, settings: EncodeSettings, workers: int,
                     decode_every: int = 16, log: Callable[[str], None] = lambda _m: None,
                     encode: Callable | None = None, priority: int = 0,
                     ahead: list | None = None, staged: tuple | None = None) -> Iterator[tuple[SliceRow, tuple]]:
    """(row, prepare_sample's result) per row, in plan order.

    Jobs of a few rows go to this process's shared worker pool (workerpool.shared_pool), at most
    `workers * pool.depth * BATCH` images ahead of the consumer, so memory stays bounded (counted in
    images, not jobs: the single-image jobs of the tail then keep every worker fed while the oldest
    job, a batch, is still encoding). A worker that dies
    costs a retry of its jobs (see `_settle` for which deaths exclude an image, which fail the
    run); an image that runs past IMNET_IMAGE_TIMEOUT gets its worker killed. IMNET_WORKERS=1 is a
    pool of one worker, never this process: an image that crashes or hangs the codec, or a kill
    from outside, costs that worker, under the same rules, not the shard run's own process.
    `ahead`: (job, future) pairs already submitted to the pool for these rows (shard_ahead): a
    job equal to the next one to submit is taken over; at the first that differs, the rest are
    cancelled. `staged`: per row its staged_encodes.StagedRef or None (staged_encodes.read_lookup).
    """
    workers = max(workers, 1)
    jobs = encode_jobs(rows, raw_root, settings, workers, decode_every, encode, staged)
    pool = shared_pool(workers)
    passed: set = set()  # control kinds whose control passed in this run (crash_control.settle_crash)
    window: collections.deque = collections.deque()
    in_window, most = 0, workers * pool.depth * BATCH  # images
    ahead = collections.deque(ahead or ())
    try:
        for job in jobs:
            if ahead and ahead[0][0] == job:
                window.append(ahead.popleft())
            else:
                while ahead:
                    ahead.popleft()[1].cancel()
                window.append((job, pool.submit(job, priority)))
            in_window += len(job.rows)
            if in_window >= most:
                in_window -= len(window[0][0].rows)
                yield from _settle(pool, *window.popleft(), log, priority, passed)
        while window:
            yield from _settle(pool, *window.popleft(), log, priority, passed)
    finally:
        for _job, fut in [*window, *ahead]:  # the consumer stopped (an error): drop what is not started
            fut.cancel()


def _settle(pool: WorkerPool, job: EncodeJob, future, log: Callable[[str], None],
            priority: int = 0, passed: set | None = None) -> Iterator[tuple]:
    """The results of one job, in row order, retrying it after worker deaths (SPEC "Failure
    behaviour"). Only a crash the image causes (workerpool.CRASH_SIGNALS), DEATHS_TO_EXCLUDE times,
    excludes it, naming the crashes, and only once the control image of its kind passed the same
    path in a worker (crash_control.settle_crash; `passed`: the run's kinds that did), else
    MachineryFault fails the run. A kill from outside (SIGKILL: the OOM killer, a cgroup limit,
    preemption; SIGTERM), a run past the time limit and a MemoryError are retried in fresh
    processes a bounded number of times, then fail the run naming the image (EncoderKilled,
    EncoderOutOfMemory): never an exclusion, so shard contents never depend on memory pressure."""
    decided: dict[int, tuple] = {}  # row index -> ("excluded", reason) for rows that crashed twice
    pending = list(range(len(job.rows)))
    deaths = DeathCount()
    while pending:
        try:
            results = future.result()
            break
        except ReplyUnreadable as e:
            raise ReplyUnreadable(f"{e} (images {[job.rows[i].key for i in pending]}); nothing was committed") from None
        except WorkerDied as died:
            real = None if died.culprit is None else pending[died.culprit]
            death = deaths.count(died, real)
            if death.kind == HELD:
                log(death.say("an encoder process died ({how}) between images; retrying its images"))
                if death.fails:
                    raise EncoderKilled(death.say(
                        "encoder processes died {count} times ({hows}) holding the images {keys}; nothing was "
                        "committed", keys=[job.rows[i].key for i in pending])) from None
            else:
                row = job.rows[real]
                where = f"{row.key} ({row.tar}@{row.offset})"
                death.follow(_NOTES, _FAILURES, log, where=where, key=row.key)
                if death.settles_crash:
                    _crash_control(pool, job, row, list(death.deaths), passed, log, priority)
                    decided[real] = ("excluded", death.say("encoder process died {count} times ({hows}) while encoding"))
                    pending.remove(real)
            if pending:
                future = pool.submit(dataclasses.replace(job, rows=[job.rows[i] for i in pending]), priority)
    else:
        results = []  # every row decided
    by_index = dict(zip(pending, results))
    for i, row in enumerate(job.rows):
        yield row, decided.get(i) or by_index[i]


# The log line of each kind of death while encoding an image (runtime/deaths.py), and what a run that
# fails of it raises, with what message.
_NOTES = {
    OUT_OF_MEMORY: "encoder ran out of memory on {key} ({count} of {limit}); retrying it",
    TIMED_OUT: "encoding {where} ran past IMNET_IMAGE_TIMEOUT ({seconds:g} s), its process was killed ({count} of "
               "{limit}); retrying it in a new process",
    CRASHED: "encoder process died ({how}) while encoding {where}; retrying its images in a new process",
    KILLED: "encoder process died ({how}) while encoding {where}: killed from outside ({count} of {limit}); "
            "retrying its images in a new process",
}
_FAILURES = {
    OUT_OF_MEMORY: (EncoderOutOfMemory, "out of memory encoding {where} {count} times in fresh worker processes; "
                    "nothing was committed. Size limits are decided at index time; give the run more memory or "
                    "lower IMNET_WORKERS"),
    TIMED_OUT: (EncoderKilled, "encoding {where} ran past IMNET_IMAGE_TIMEOUT ({seconds:g} s) {count} times, each "
                "in a fresh process, and was killed; nothing was committed. A hung encoder is not an exclusion: "
                "raise IMNET_IMAGE_TIMEOUT if the machine is just slow"),
    KILLED: (EncoderKilled, "the encoder process was killed from outside ({hows}) {count} times while encoding "
             "{where}; nothing was committed. A kill (the OOM killer, a cgroup memory limit, preemption) is not an "
             "exclusion: give the run more memory or lower IMNET_WORKERS, and build again"),
}


def _crash_control(pool: WorkerPool, job: EncodeJob, row: SliceRow, crashes: list[WorkerDied],
                   passed: set | None, log: Callable[[str], None], priority: int) -> None:
    """Returns when `row`'s crashes are its own (crash_control.settle_crash); raises MachineryFault
    (nothing committed, nothing excluded) when the control of its kind crashed or failed too."""
    seen = (f"the encoder's process died {len(crashes)} times ({', '.join(d.named for d in crashes)}) while "
            f"encoding {row.key} (raw tar {row.tar} at byte {row.offset}; {path_settings(job.settings)})")
    settle_crash(pool, functools.partial(_read_source, row, job.raw_root), job.settings, seen, crashes,
                 set() if passed is None else passed, encode=job.encode, crash_sha256=job.crash_sha256,
                 time_limit=job.time_limit, priority=priority, log=log)
