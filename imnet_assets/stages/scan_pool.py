"""The index's scan in worker processes, and what a worker's death means (SPEC "Failure behaviour").

Every tar is scanned in a worker of this process's WorkerPool (runtime/workerpool.py, the pool the
shard runs share), with IMNET_WORKERS=1 too (one worker), and never in the stage's own process: the
index decodes every kept image (its probe, the trial decode of a cut one, its pHash thumbnail, and
with IMNET_STAGE_ENCODES its staged encodes), and a codec that crashes on one image's bytes would
otherwise end the stage's process (the Dagster run, or `imnet build` itself) at every rerun.

A worker marks where its walk is (index.Watch; `MemberWatch` packs tar, member number and phase into
the pool's slot): `reading` member n (its bytes come from a memory map, the network or a disk; no
time limit) or `decoding` it (the codecs, on a private copy of its bytes; IMNET_IMAGE_TIMEOUT per
image). So a death says whose it is (`_scanned`):

- decoding, a crash signal (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT): the image's, once it happened
  DEATHS_TO_EXCLUDE times and the known-good control image of its kind passed the same path in a
  worker (crash_control.settle_crash_of through `index_path_problem`): the job runs again with the member
  excluded, naming the signals; a control that crashes or fails too is a MachineryFault (a codec
  broken for every input), nothing recorded;
- decoding, killed from outside (SIGKILL: the OOM killer, a cgroup limit, preemption; SIGTERM), past
  the time limit, or out of memory (a MemoryError in the probe or the pHash exits the worker:
  image/probe.py, image/perceptual.py): retried in a fresh process, then the stage fails naming the
  image (ScanKilled, ScanOutOfMemory): never an exclusion, never a missing pHash;
- reading: the storage's, not the image's (a read error under the memory map is a SIGBUS; a tar cut
  short in place while mapped too): the tar is scanned again without a map in a fresh process, where a
  failing read raises naming the tar; deaths.READ_DEATHS_TO_FAIL such deaths fail the stage (ScanReadDied);
- no member marked (the job was queued in the worker, or between members): retried.

The throughput of the old ProcessPoolExecutor scan is kept: a job is one tar (a local one memory-mapped,
a large remote one read with `depth` ranged requests in flight) or up to `depth` small remote tars
fetched whole together, so all workers keep prefetch.INDEX_REQUESTS_IN_FLIGHT requests going. A job
goes to a worker only when it is idle (`ScanJob.hold`): the others wait in the pool's queue for
whichever worker is free first. At most WINDOW x workers jobs are out at once and their results are
taken in input order: a tar several times the mean size (synsets differ widely in size) holds the
results after it till it is done, and with 2 x workers the other workers then run dry (simulated
with plausible size distributions at 64 workers by bench/scan_window.py: 1.17-1.37 x the ideal time;
4 x: 1.03-1.05 x). Memory: about four tars' rows per worker in the coordinator (~0.4 MB a 686-row
tar: ~100 MB at 64 workers, about one IMNET_INDEX_BATCH_ROWS batch).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

from imnet_assets.image.controls import ControlKind
from imnet_assets.image.decode import MAX_SHORT
from imnet_assets.image.encode import encode_or_refusal
from imnet_assets.image.faults import arm
from imnet_assets.image.perceptual import MAX_DECODED_BYTES
from imnet_assets.runtime.deaths import CRASHED, KILLED, OUT_OF_MEMORY, TIMED_OUT, DeathCount
from imnet_assets.runtime.procpool import preload
from imnet_assets.runtime.workerpool import ReplyUnreadable, WorkerDied, WorkerPool, shared_pool
from imnet_assets.settings import image_timeout, test_index_fault
from imnet_assets.stages.crash_control import settle_crash_of
from imnet_assets.stages.index import ScannedTar, Watch, probe_and_hash, read_listed, scan_tar
from imnet_assets.stages.staged_encodes import StagedCodec
from imnet_assets.storage import atomic, fs
from imnet_assets.storage.member_names import printable_name
from imnet_assets.storage.prefetch import CHUNK, depth_for
from imnet_assets.storage.rawfolders import is_folder_source, list_files, read_files
from imnet_assets.storage.rawtar import iter_tar

preload(__name__)  # the forkserver imports this module once for all workers

SMALL_TAR = CHUNK  # remote tars up to one prefetch chunk are fetched whole, many at once
WINDOW = 4  # jobs out at once per worker, their results taken in input order (see the module's docstring)
# The pool priority of the jobs the scan waits on after a death (the job again, the member's name, the
# crash controls): ahead of the scan jobs queued in the pool (priority 0), which wait for idle workers.
AFTER_DEATH = -1

# A marked item: (tar of the job << _ORDINAL_BITS | member number) << 1 | decoding, in the pool's 32 bits
# of item index. A job holds at most 32 tars (prefetch.depth_for's cap); a member numbered past
# _UNKNOWN (a 34 GB tar of empty files) is marked as _UNKNOWN, and a death there is blamed on none.
_TAR_BITS = 5
_ORDINAL_BITS = 32 - 1 - _TAR_BITS
_UNKNOWN = (1 << _ORDINAL_BITS) - 1


class ScanOutOfMemory(MemoryError):
    """An image ran the index's decoding out of memory in fresh processes again and again. Memory is
    no property of the image: not excluded, never left without its pHash; the stage fails naming it."""


class ScanKilled(RuntimeError):
    """The scan's process was killed from outside (the OOM killer, a cgroup limit, preemption) or
    past IMNET_IMAGE_TIMEOUT again and again on one image, or died again and again holding a tar:
    never an exclusion; the stage fails naming it, nothing recorded for its tar."""


class ScanReadDied(OSError):
    """The scan's process died again and again while reading one raw tar (a read error under its
    memory map is a SIGBUS, even without a map each time): the storage's fault, not the image's."""


def _item(tar: int, number: int, decoding: bool) -> int:
    return (tar << _ORDINAL_BITS | min(number, _UNKNOWN)) << 1 | decoding


def _culprit(index: int | None) -> tuple[int, int, bool] | None:
    """(tar of the job, member number, decoding) of a death's marked item, or None."""
    if index is None or (index >> 1) & _UNKNOWN == _UNKNOWN:
        return None
    return index >> 1 >> _ORDINAL_BITS, (index >> 1) & _UNKNOWN, bool(index & 1)


class MemberWatch(Watch):
    """index.Watch for a pool worker: marks the member and phase in the pool's slot."""

    def __init__(self, mark: Callable, tar: int, crashed: dict[int, str]):
        self._mark, self._tar, self._crashed = mark, tar, crashed

    def reading(self, n: int) -> None:
        self._mark(_item(self._tar, n, False), timed=False)

    def decoding(self, n: int) -> None:
        self._mark(_item(self._tar, n, True))

    def idle(self) -> None:
        self._mark(-1)

    def crashed(self, n: int) -> str | None:
        return self._crashed.get(n)


@dataclass
class ScanJob:
    """One unit of the scan for a pool worker: one tar, or `small` remote tars fetched whole together."""

    tars: list[tuple[str, int | None]]  # (url, listed size)
    small: bool
    depth: int  # ranged requests in flight for a large remote tar
    mapped: bool  # memory-map local tars (False after a death while reading)
    codecs: tuple[StagedCodec, ...]
    time_limit: float | None  # seconds per image decoded (IMNET_IMAGE_TIMEOUT)
    fault: str | None = None  # the test hook (settings.test_index_fault)
    crashed: tuple[tuple[int, int, str], ...] = ()  # (tar, member number, exclusion reason): not decoded again
    # Sent to an idle worker only (WorkerPool `hold`), as the old ProcessPoolExecutor's shared queue
    # did: a job queued in a busy worker (it reads nothing ahead) would wait behind a long tar while
    # other workers idle, and die with its worker.
    hold: ClassVar[int] = 1

    def prefetch(self, readers):
        return None  # fetched in `run`: one job's tars in memory per worker, not its whole queue's

    def run(self, _state, mark) -> list[ScannedTar]:
        arm(self.fault)
        try:
            data: list = [None] * len(self.tars)
            if self.small:
                mark(_item(0, 0, False), timed=False)
                with ThreadPoolExecutor(len(self.tars), thread_name_prefix="small-tars") as fetch:
                    data = list(fetch.map(lambda t: read_listed(*t), self.tars))
            out = []
            for i, (url, size) in enumerate(self.tars):
                crashed = {n: reason for t, n, reason in self.crashed if t == i}
                out.append(scan_tar(url, mapped=self.mapped, depth=None if self.small else self.depth, size=size,
                                    data=data[i], codecs=self.codecs, watch=MemberWatch(mark, i, crashed)))
                data[i] = None
            return out
        finally:
            arm(None)


def _member(url: str, size: int | None, n: int) -> tuple[str, int, bytes]:
    """(printable name, offset, bytes) of the n-th member of a tar (or file of a folder), read
    without a memory map; one over MAX_DECODED_BYTES is not held (the scan never decodes it)."""
    if is_folder_source(url):
        files = read_files(url, list_files(url), None, max_bytes=MAX_DECODED_BYTES)
        items = ((e.path, i, d) for i, (e, d) in enumerate(files))
    else:
        items = ((m.name, m.offset, m.data) for m in iter_tar(url, size=size, depth=4 if fs.is_remote(url) else None,
                                                              max_data=MAX_DECODED_BYTES))
    for number, (name, offset, data) in enumerate(items):
        if number == n:
            return printable_name(name), offset, bytes(data) if isinstance(data, (bytes, memoryview)) else b""
    raise LookupError(f"raw tar {url} has no member #{n + 1} now: it changed while the index read it")


def _member_bytes(url: str, size: int | None, n: int) -> tuple[bytes, str]:
    """crash_control.KindJob's read."""
    return _member(url, size, n)[2], ""


@dataclass
class MemberJob:
    """Names the n-th member of a tar, for a message (read in a worker, without a map)."""

    url: str
    size: int | None
    n: int

    def prefetch(self, readers):
        return None

    def run(self, _state, mark) -> tuple[str, int]:
        return _member(self.url, self.size, self.n)[:2]


def index_path_problem(control: bytes, kind: ControlKind, codecs: tuple[StagedCodec, ...]) -> str | None:
    """None when a known-good control image passes what a scan worker's `decoding` phase runs on an
    image (the probe, the pHash, the staged encodes), else why not (crash_control.ControlJob's)."""
    _p, status, reason, phash = probe_and_hash(control)
    if status != "kept":
        return f"the probe excluded it: {reason}"
    if phash is None and not kind.cut:  # a cut image gets no pHash by design (perceptual.py)
        return "it got no pHash"
    for codec in codecs:
        got = encode_or_refusal(control, codec.settings)
        if isinstance(got, str):
            return f"its staged encode for {codec.identity} refused it: {got}"
    return None


def _jobs(urls: list[str], sizes: dict[str, int], depth: int, codecs, limit, fault) -> list[ScanJob]:
    """The scan's jobs, in input order: up to `depth` consecutive small remote tars together, or one tar."""
    jobs: list[ScanJob] = []
    for url in urls:
        size = sizes.get(url)
        small = size is not None and size <= SMALL_TAR and fs.is_remote(url) and not is_folder_source(url)
        if small and jobs and jobs[-1].small and len(jobs[-1].tars) < depth:
            jobs[-1].tars.append((url, size))
        else:
            jobs.append(ScanJob([(url, size)], small, depth, True, codecs, limit, fault))
    return jobs


def scan_tars(urls: Iterable[str], workers: int, log: Callable[[str], None] = lambda _m: None,
              sizes: dict[str, int] | None = None, codecs: tuple[StagedCodec, ...] = (),
              time_limit: float | None = None) -> Iterator[tuple[str, ScannedTar]]:
    """Scan tars in `workers` pool processes; yields (url, records) per tar, in input order.

    Remote tars are read so that all workers together keep prefetch.INDEX_REQUESTS_IN_FLIGHT
    requests going: a large one with ranged requests in flight ahead of its walk, small ones
    (`sizes`, from the listing: at most SMALL_TAR) fetched whole, up to that many together. A
    listed size also spares the request that would ask for it. `codecs`: each kept image is encoded
    for these as it is read (stages/staged_encodes.py). `time_limit`: seconds one image may take
    its decoding (default IMNET_IMAGE_TIMEOUT). Worker deaths: see the module's docstring.
    """
    urls = list(urls)
    if not urls:
        return
    sizes = sizes or {}
    depth = depth_for(min(workers, len(urls)))
    limit = image_timeout() if time_limit is None else time_limit
    jobs = _jobs(urls, sizes, depth, codecs, limit, test_index_fault())
    pool = shared_pool(max(1, workers))  # IMNET_WORKERS processes, as the shard runs (the pool lives on)
    passed: set[ControlKind] = set()  # kinds whose control passed the index's decoding in this scan
    window: collections.deque = collections.deque()
    try:
        for job in jobs:
            window.append((job, pool.submit(job)))
            if len(window) >= WINDOW * pool.size:
                yield from _yielded(pool, *window.popleft(), passed, log)
        while window:
            yield from _yielded(pool, *window.popleft(), passed, log)
    finally:
        for _job, fut in window:  # the consumer stopped (an error): drop what is not started
            fut.cancel()


def _yielded(pool, job: ScanJob, future, passed, log) -> Iterator[tuple[str, ScannedTar]]:
    for (url, _size), records in zip(job.tars, _scanned(pool, job, future, passed, log)):
        yield url, records


def _tar_name(job: ScanJob, tar: int) -> str:
    url = job.tars[tar][0]
    return fs.basename(url.rstrip("/")) + ("/" if is_folder_source(url) else "")


def _where(pool: WorkerPool, job: ScanJob, tar: int, n: int) -> str:
    """The member, named for a message: read in a worker (this process decodes nothing)."""
    url, size = job.tars[tar]
    try:
        name, offset = pool.submit(MemberJob(url, size, n), AFTER_DEATH).result()
    except Exception:  # noqa: BLE001 - only the message's detail
        return f"member #{n + 1} of raw tar {_tar_name(job, tar)}"
    return f"{name} (raw tar {_tar_name(job, tar)}, member #{n + 1}, at byte {offset})"


def _scanned(pool: WorkerPool, job: ScanJob, future, passed: set, log: Callable[[str], None]) -> list[ScannedTar]:
    """The job's ScannedTars, running it again after worker deaths as the module's docstring says."""
    deaths = DeathCount()
    tars = ", ".join(_tar_name(job, i) for i in range(len(job.tars)))
    while True:
        try:
            return future.result()
        except ReplyUnreadable as e:
            raise ReplyUnreadable(f"{e} (raw tars {tars}); nothing was recorded for them") from None
        except WorkerDied as died:
            at = _culprit(died.culprit)
            if at is None:
                death = deaths.count(died, None)
                log(death.say("a scan process died ({named}) holding raw tars {tars}; scanning them again", tars=tars))
                if death.fails:
                    raise ScanKilled(death.say("the index's processes died {count} times ({nameds}) holding raw "
                                               "tars {tars}; nothing was recorded for them. Build again",
                                               tars=tars)) from None
            elif not at[2]:
                tar, n, _ = at
                death = deaths.count(died, tar, reading=True)
                log(f"the scan's process died ({died.named}) reading raw tar {_tar_name(job, tar)} (member #{n + 1}):"
                    " not the image's fault (a read error under its memory map, the tar cut short while read, or a"
                    " kill); scanning it again without a memory map in a fresh process")
                if death.fails:
                    raise ScanReadDied(death.say("the index's process died {count} times ({nameds}) reading raw tar "
                                                 "{tar}, the last times without a memory map; nothing was recorded for "
                                                 "it. Check the storage, and build again", tar=_tar_name(job, tar))
                                       ) from None
                job = dataclasses.replace(job, mapped=False)
            else:
                image = at[:2]
                where = _where(pool, job, *image)
                death = deaths.count(died, image)
                death.follow(_NOTES, _FAILURES, log, where=where)
                if death.settles_crash:
                    _crash_control(pool, job, image, list(death.deaths), where, passed, log)
                    reason = death.say("index process died {count} times ({nameds}) while decoding")
                    job = dataclasses.replace(job, crashed=(*job.crashed, (*image, reason)))
            for codec in job.codecs:  # the dead worker's staged file, never committed (atomic_open)
                atomic.sweep_partials(codec.root)
            future = pool.submit(job, AFTER_DEATH)


# The log line of each kind of death while decoding an image (runtime/deaths.py), and what a scan that
# fails of it raises, with what message.
_NOTES = {
    OUT_OF_MEMORY: "the index ran out of memory decoding {where} ({count} of {limit}); retrying it in a fresh process",
    TIMED_OUT: "decoding {where} ran past IMNET_IMAGE_TIMEOUT ({seconds:g} s); its process was killed ({count} of "
               "{limit}); retrying it in a fresh process",
    CRASHED: "the index's process died ({named}) decoding {where}; retrying it in a fresh process",
    KILLED: "the index's process died ({named}) decoding {where}: killed from outside ({count} of {limit}); "
            "retrying it in a fresh process",
}
_FAILURES = {
    OUT_OF_MEMORY: (ScanOutOfMemory, "out of memory decoding {where} {count} times, each in a fresh process; "
                    "nothing was recorded for its tar. Memory is no property of the image (never an exclusion, "
                    "never a missing pHash): give the index more memory or lower IMNET_WORKERS"),
    TIMED_OUT: (ScanKilled, "decoding {where} ran past IMNET_IMAGE_TIMEOUT ({seconds:g} s) {count} times, each in "
                "a fresh process, and was killed; nothing was recorded for its tar. A hung decoder is not an "
                "exclusion: raise IMNET_IMAGE_TIMEOUT if the machine is just slow"),
    KILLED: (ScanKilled, "the index's process was killed from outside ({nameds}) {count} times while decoding "
             "{where}; nothing was recorded for its tar. A kill (the OOM killer, a cgroup memory limit, "
             "preemption) is not an exclusion: give the index more memory or lower IMNET_WORKERS, and build again"),
}


def _crash_control(pool: WorkerPool, job: ScanJob, image: tuple[int, int], crashes: list[WorkerDied], where: str,
                   passed: set, log: Callable[[str], None]) -> None:
    """Returns when the image's crashes are its own (crash_control.settle_crash_of, through the
    index's decoding); raises MachineryFault (nothing recorded) when the control crashed or failed too."""
    url, size = job.tars[image[0]]
    seen = f"the index's process died {len(crashes)} times ({', '.join(d.named for d in crashes)}) decoding {where}"
    settle_crash_of(pool, functools.partial(_member_bytes, url, size, image[1]), MAX_SHORT, seen, crashes, passed,
                    functools.partial(index_path_problem, codecs=job.codecs), "index", fault=job.fault,
                    time_limit=job.time_limit, priority=AFTER_DEATH, log=log)
