"""The eval set's hashing (IMNET_EVAL_EXCLUDE, stages/decontam.py) in worker processes, under the
index's failure rules (SPEC "Failure behaviour"; stages/scan_pool.py says them for the raw tars).

Every eval image is read and hashed (sha256, and the pHash of image/perceptual.py) in a worker of
this process's WorkerPool (runtime/workerpool.py), never in the stage's own process: a codec that
crashes on one eval image's bytes would otherwise end the filtered index's process at every rerun.

Jobs: EVAL_BATCH images each, an image being a byte range of an object: a plain file whole, or one
member of an eval tar. An eval tar (a file named as one: TAR_SUFFIXES) is first walked in a worker
(`TarMembersJob`: the raw tars' walk, storage/rawtar.py, its headers only, nothing decoded; a file
named as a tar that holds no readable member is recorded as damaged, below, never read whole as one
image: it may be a 6.4 GB tar whose first header is damaged) into its members' offsets and sizes, so the
50,000 images of one tar of the ImageNet validation set are hashed by all workers at once, in jobs
of EVAL_BATCH, and a death repeats one job, not the tar. What of a tar is no member (rawtar.Damage:
a damaged header, a cut tail) is logged and returned to the caller (`hash_eval`'s `damaged`: the
catalog's eval_damage, the dataset card): the eval images there are not hashed, so decontamination
covers less, and says so. A compressed tar (gzip, bzip2, xz: told by its first bytes, whatever its
name; `TarMembersJob` looks) cannot be range-read: this process reads it once, forward, decompressing
as it goes (storage/compressed_tar.py: decompression only, no image decoded here), and its members'
bytes travel in the jobs (the item's data), at most EVAL_BYTES_IN_FLIGHT of them at once. A job's reads start as it reaches its worker (`prefetch`: one exact
ranged read per image in the worker's reader threads, up to the pool's `depth` jobs ahead), so at
20 ms a request the reads keep ahead of the decoding. (A remote tar is so read twice, its walk with
ranged reads in flight, then its members; a local one's walk reads its headers from a memory map. The
set is hashed once per change of it.)

A worker marks each image twice in the pool's slot: `reading` (no time limit) and `decoding` (the
sha256 and the pHash; IMNET_IMAGE_TIMEOUT). A death says whose it is (`_hashed`), counted by
runtime/deaths.py as the scan counts it:

- decoding, a crash signal: the image's, once it happened DEATHS_TO_EXCLUDE times and the control
  image of its kind got its pHash in a worker (crash_control.settle_crash_of through eval_path_problem):
  the image keeps its sha256 (it still matches raw images byte for byte) and has no pHash, with the
  reason (`eval_images.no_phash`: "crashed the pHash's process 2 times (...)"); a control that
  crashes or fails too is a MachineryFault, nothing recorded;
- decoding, killed from outside, past the time limit, or out of memory (a MemoryError in the pHash
  exits the worker): retried in a fresh process, then the stage fails naming the file (ScanKilled,
  ScanOutOfMemory): never a missing pHash;
- reading: the storage's, retried in a fresh process, deaths.READ_DEATHS_TO_FAIL times; a read that fails
  (a cut or reset body, a 503: storage/s3read.py reads again, then StorageError) or returns another
  size than listed fails the stage naming the file: never a wrong sha256, never "no pHash";
- no image marked (the job was queued in the worker): retried (MAX_JOB_RETRIES).

Memory is bounded whatever the files' sizes: an eval file (or member) of more bytes than the largest
image the pHash decodes (perceptual.MAX_DECODED_BYTES: a 2 GB video or .zip left in the eval folder)
is never held whole: its sha256 is streamed (in the worker, read in pieces (storage/pieces.py), all of it
`reading`; a compressed tar's member, as the walk passes it: compressed_tar.Streamed), and it has
no pHash, with its reason (`eval_images.no_phash`: perceptual.too_many_bytes, "too large: ...").
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from imnet_assets.image.decode import MAX_SHORT
from imnet_assets.image.faults import arm
from imnet_assets.image.guard import ControlKind, MachineryFault
from imnet_assets.image.perceptual import MAX_DECODED_BYTES, hash_or_problem, too_many_bytes
from imnet_assets.runtime.deaths import CRASHED as CRASHED_KIND
from imnet_assets.runtime.deaths import KILLED, OUT_OF_MEMORY, TIMED_OUT, DeathCount
from imnet_assets.runtime.procpool import preload
from imnet_assets.runtime.workerpool import ReplyUnreadable, WorkerDied, WorkerPool, shared_pool
from imnet_assets.settings import image_timeout, test_index_fault
from imnet_assets.stages.crash_control import settle_crash_of
from imnet_assets.stages.scan_pool import (
    AFTER_DEATH,
    WINDOW,
    ScanKilled,
    ScanOutOfMemory,
    ScanReadDied,
)
from imnet_assets.storage import fs
from imnet_assets.storage.compressed_tar import HEAD, Streamed, compression, iter_compressed_tar
from imnet_assets.storage.pieces import sha256_in_pieces
from imnet_assets.storage.rawtar import Damage, iter_tar

preload(__name__)  # the forkserver imports this module once for all workers

EVAL_BATCH = 32  # eval images per job
# Names of files walked as tars (compressed or not, as their first bytes say; any other file is hashed whole)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
# Bytes of a compressed tar's members held in the jobs out at once (they travel in them): the window of
# WINDOW x workers jobs is cut short past this (64 workers: 256 jobs of 32 images, ~1 GB of ImageNet's).
EVAL_BYTES_IN_FLIGHT = 256 << 20
CRASHED = "crashed the pHash's process"  # the first words of a crash's eval_images.no_phash

Row = tuple[str, str, int | None, str | None]  # (file, sha256, phash, why no pHash)


class Item(NamedTuple):
    """One eval image to hash: a file, or a member of an eval tar."""

    name: str  # the eval file's name (a tar's member: "<tar>/<member>")
    url: str
    offset: int
    length: int
    whole: bool  # the object is exactly `length` long (a file, not a member)
    data: bytes | None = None  # its bytes, read already (a compressed tar's member), else None
    sha256: str | None = None  # that of a tar's member over MAX_DECODED_BYTES, taken as the walk read it (no data)


Damaged = tuple[str, int, int, str]  # (eval file, at byte, bytes, reason): a part of an eval tar not hashed


def _read(url: str, name: str, offset: int, length: int, whole: bool) -> bytes:
    """The image's bytes: exactly `length` from `offset` (fs.read_range reads a cut or reset body
    again); another size (a whole file asked for one byte more) is a StorageError naming it."""
    data = fs.read_range(url, offset, length + 1 if whole else length)
    if len(data) != length:
        raise fs.StorageError(f"eval file {name} ({fs.redact(url)}) gave {len(data)} bytes, not the {length} it was "
                              "listed with: it changed since it was listed; run the build again")
    return data


def _item_bytes(item: Item) -> bytes:
    return item.data if item.data is not None else _read(item.url, item.name, item.offset, item.length, item.whole)


def _too_large(item: Item) -> bool:
    """Whether the item is more bytes than an image the pHash decodes: never held whole (the module's docstring)."""
    return item.length > MAX_DECODED_BYTES


def _streamed_sha256(item: Item) -> str:
    """The sha256 of the item's bytes, read in pieces (storage/pieces.py; a piece short of what was
    listed, or a whole file longer than listed: a StorageError naming it, as `_read` says)."""
    if item.sha256 is not None:
        return item.sha256

    def read(at: int, want: int) -> bytes:
        return _read(item.url, item.name, item.offset + at, want, item.whole and at + want == item.length)

    return sha256_in_pieces(read, item.length, past_end=False)[1]


def _image_bytes(item: Item) -> tuple[bytes, str]:
    """crash_control.KindJob's read."""
    return _item_bytes(item), ""


@dataclass
class EvalJob:
    """Up to EVAL_BATCH eval images, read and hashed in a worker."""

    items: list[Item]
    time_limit: float | None  # seconds per image hashed (IMNET_IMAGE_TIMEOUT)
    fault: str | None = None  # the test hook (settings.test_index_fault)
    crashed: tuple[tuple[int, str], ...] = ()  # (item, reason): not given to the pHash again

    def prefetch(self, readers):
        return [None if _too_large(item) else readers.submit(_item_bytes, item) for item in self.items]

    def run(self, reads, mark) -> list[Row]:
        arm(self.fault)
        try:
            crashed = dict(self.crashed)
            rows = []
            for i, (item, read) in enumerate(zip(self.items, reads)):
                name = item.name
                mark(i << 1, timed=False)  # reading: the storage's time
                if read is None:  # too large to be an image: its sha256 streamed, nothing decoded
                    rows.append((name, _streamed_sha256(item), None, too_many_bytes(item.length)))
                    continue
                data = read.result()
                mark(i << 1 | 1)  # decoding
                sha256 = hashlib.sha256(data).hexdigest()
                if i in crashed:
                    rows.append((name, sha256, None, crashed[i]))
                    continue
                try:
                    phash, problem = hash_or_problem(data)
                except MachineryFault as e:  # a known-good image gets no pHash either: the stage fails
                    raise MachineryFault(f"{e} (met on eval file {name})") from e
                rows.append((name, sha256, phash, problem))
            mark(-1)
            return rows
        finally:
            arm(None)


@dataclass
class TarMembersJob:
    """An eval tar's regular members as items, and what of it is no member (rawtar.Damage: offset,
    size, reason), from one walk of its headers (storage/rawtar.py; nothing decoded); or, when its
    first bytes say it is compressed (compressed_tar.compression), only that, for this process to
    read it (no members, no damage: the walk is not made here). A member over MAX_DECODED_BYTES is
    not held by the walk (rawtar's `max_data`): hashed in pieces as the walk reads it (`hash_over`;
    tarfile's walk of a pax tar reads it anyway), its Item carrying that sha256, so it is read once. A local tar is memory-mapped unless
    `mapped` is off (after a death while walking it: a read error under a map is a SIGBUS)."""

    name: str
    url: str
    size: int
    mapped: bool = True

    def prefetch(self, readers):
        return None

    def run(self, _state, mark) -> tuple[list[Item], list[tuple[int, int, str]], str | None]:
        mark(0, timed=False)
        members: list[Item] = []
        damage: list[tuple[int, int, str]] = []
        packed = compression(fs.read_range(self.url, 0, min(HEAD, self.size))) if self.size else None
        if packed is not None:
            return members, damage, packed
        remote = fs.is_remote(self.url)
        for m in iter_tar(self.url, "eval tar", views=True, mapped=self.mapped and not remote, size=self.size,
                          depth=8 if remote else None, max_data=MAX_DECODED_BYTES, hash_over=True):
            if isinstance(m, Damage):
                damage.append((m.offset, m.size, m.reason))
            else:  # one over MAX_DECODED_BYTES with the sha256 the walk took as it read it: never read twice
                members.append(Item(f"{self.name}/{m.name}", self.url, m.offset, m.size, False, sha256=m.sha256))
        return members, damage, None


def eval_path_problem(control: bytes, kind: ControlKind) -> str | None:
    """None when a known-good control image gets its pHash as an eval image does, else why not
    (crash_control.ControlJob's). A control cut short (that of an image cut short) gets none by
    design (perceptual.py: the pHash repairs nothing), as scan_pool.index_path_problem says: it passes
    when its pHash ran without a crash."""
    phash, problem = hash_or_problem(control)
    return None if phash is not None or kind.cut else f"it got no pHash ({problem})"


def hash_eval(listing: list[dict], workers: int, log: Callable[[str], None] = lambda _m: None,
              time_limit: float | None = None, damaged: list[Damaged] | None = None) -> Iterator[Row]:
    """(file, sha256, phash, why no pHash) per eval image of `listing` (decontam.eval_listing), in
    its order, hashed in `workers` pool processes (see the module's docstring). `damaged` gets
    (eval tar, at byte, bytes, reason) per part of an eval tar that is no member (not hashed)."""
    damaged = [] if damaged is None else damaged
    pool = shared_pool(max(1, workers))
    limit = image_timeout() if time_limit is None else time_limit
    fault = test_index_fault()
    passed: set[ControlKind] = set()  # kinds whose control got its pHash in a worker
    tars = {e["url"]: pool.submit(TarMembersJob(e["name"], e["url"], e["size"])) for e in listing
            if e["name"].lower().endswith(TAR_SUFFIXES)}
    window: collections.deque = collections.deque()
    done = held = 0  # eval images hashed; bytes of read members held in the window's jobs

    def oldest() -> list[Row]:
        nonlocal done, held
        job, future = window.popleft()
        held -= _held(job)
        rows = _hashed(pool, job, future, passed, log)
        if (done + len(rows)) // 5000 > done // 5000:
            log(f"hashed {done + len(rows)} eval images")
        done += len(rows)
        return rows

    try:
        for items in _batches(_items(pool, listing, tars, log, damaged), EVAL_BATCH):
            job = EvalJob(items, limit, fault)
            window.append((job, pool.submit(job)))
            held += _held(job)
            while window and (len(window) >= WINDOW * pool.size or held > EVAL_BYTES_IN_FLIGHT):
                yield from oldest()
        while window:
            yield from oldest()
    finally:
        for fut in [f for _job, f in window] + list(tars.values()):  # the consumer stopped: drop the rest
            fut.cancel()


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _held(job: EvalJob) -> int:
    return sum(len(item.data) for item in job.items if item.data is not None)


def _items(pool: WorkerPool, listing: list[dict], tars: dict, log: Callable[[str], None],
           damaged: list[Damaged]) -> Iterator[Item]:
    for e in listing:
        if e["url"] in tars:
            yield from _members(pool, e, tars[e["url"]], log, damaged)
        else:
            yield _whole(e)


def _whole(entry: dict) -> Item:
    return Item(entry["name"], entry["url"], 0, entry["size"], True)


def _said(entry: dict, members: int, damage: list[tuple[int, int, str]], damaged: list[Damaged],
          log: Callable[[str], None]) -> None:
    """Logs and records (`damaged`) what of an eval tar is no member: the eval images there are not hashed."""
    for offset, size, reason in damage:
        log(f"eval tar {entry['name']}: {reason}; its {members} readable members are hashed, not this part")
        damaged.append((entry["name"], offset, size, reason))


def _members(pool: WorkerPool, entry: dict, future, log: Callable[[str], None],
             damaged: list[Damaged]) -> Iterable[Item]:
    """The tar's members (TarMembersJob), its walk run again (without a map) after a death of its
    worker; none when no member can be read (the damage recorded). A compressed tar's: read here,
    as they are hashed (`_unpacked`)."""
    deaths = DeathCount()
    while True:
        try:
            members, damage, packed = future.result()
            break
        except WorkerDied as died:
            death = deaths.count(died, entry["name"] if died.culprit is not None else None, reading=True)
            if death.fails:
                raise ScanReadDied(death.say("the process reading eval tar {tar} died {count} times ({nameds}); "
                                             "nothing was recorded. Check the storage, and build again",
                                             tar=entry["name"])) from None
            log(f"the process reading eval tar {entry['name']} died ({died.named}); reading it again without a "
                "memory map in a fresh process")
            job = TarMembersJob(entry["name"], entry["url"], entry["size"], False)
            future = pool.submit(job, AFTER_DEATH)
    if packed is not None:
        return _unpacked(entry, packed, log, damaged)
    if not members and damage:
        _nothing_readable(entry, damage, damaged, log)
        return []
    _said(entry, len(members), damage, damaged, log)
    return members


def _unpacked(entry: dict, packed: str, log: Callable[[str], None], damaged: list[Damaged]) -> Iterator[Item]:
    """A `packed`-compressed tar's members, read in one forward pass as they are hashed
    (compressed_tar.iter_compressed_tar), each item with its bytes; none when no member can be read
    (the damage recorded, as for a plain tar). A failed read of the storage raises naming it."""
    log(f"eval tar {entry['name']} is {packed}-compressed: reading it once, in order, its members hashed as they come")
    damage: list[tuple[int, int, str]] = []
    members = 0
    for m in iter_compressed_tar(entry["url"], packed, size=entry["size"], max_data=MAX_DECODED_BYTES):
        if isinstance(m, Damage):
            damage.append((m.offset, m.size, m.reason))
            continue
        members += 1
        if isinstance(m, Streamed):
            yield Item(f"{entry['name']}/{m.name}", entry["url"], m.offset, m.size, False, sha256=m.sha256)
        else:
            yield Item(f"{entry['name']}/{m.name}", entry["url"], m.offset, m.size, False, data=bytes(m.data))
    if not members and damage:
        _nothing_readable(entry, damage, damaged, log)
        return
    _said(entry, members, damage, damaged, log)


def _nothing_readable(entry: dict, damage: list[tuple[int, int, str]], damaged: list[Damaged],
                      log: Callable[[str], None]) -> None:
    """A file named as a tar of which no member can be read: its damage recorded, nothing of it
    hashed. Hashing it as one image instead would read it whole into one worker (an eval tar of
    6.4 GB whose first header is damaged), for a sha256 no raw image has and no pHash."""
    log(f"eval tar {entry['name']} holds no readable member ({damage[0][2]}): nothing of it is hashed")
    damaged.extend((entry["name"], offset, size, reason) for offset, size, reason in damage)


def _hashed(pool: WorkerPool, job: EvalJob, future, passed: set, log: Callable[[str], None]) -> list[Row]:
    """The job's rows, running it again after worker deaths as the module's docstring says."""
    deaths = DeathCount()
    while True:
        try:
            return future.result()
        except ReplyUnreadable as e:
            raise ReplyUnreadable(f"{e} (eval files {job.items[0][0]} ...); nothing was recorded") from None
        except WorkerDied as died:
            if died.culprit is None:
                death = deaths.count(died, None)
                first, last = job.items[0][0], job.items[-1][0]
                log(death.say("an eval hashing process died ({named}) holding eval files {first} to {last}; "
                              "hashing them again", first=first, last=last))
                if death.fails:
                    raise ScanKilled(death.say("the eval set's hashing processes died {count} times ({nameds}) "
                                               "holding eval files {first} to {last}; nothing was recorded. Build "
                                               "again", first=first, last=last)) from None
            elif not died.culprit & 1:
                i = died.culprit >> 1
                name = job.items[i].name
                death = deaths.count(died, i, reading=True)
                log(f"an eval hashing process died ({died.named}) reading eval file {name}: not the image's fault; "
                    "reading it again in a fresh process")
                if death.fails:
                    raise ScanReadDied(death.say("the eval set's hashing process died {count} times ({nameds}) "
                                                 "reading eval file {name}; nothing was recorded. Check the storage, "
                                                 "and build again", name=name)) from None
            else:
                i = died.culprit >> 1
                where = f"eval file {job.items[i].name}"
                death = deaths.count(died, i)
                death.follow(_NOTES, _FAILURES, log, where=where)
                if death.settles_crash:
                    seen = death.say("the eval set's hashing process died {count} times ({nameds}) hashing {where}",
                                     where=where)
                    settle_crash_of(pool, functools.partial(_image_bytes, job.items[i]), MAX_SHORT, seen,
                                    death.deaths, passed, eval_path_problem, "pHash", fault=job.fault,
                                    time_limit=job.time_limit, priority=AFTER_DEATH, log=log)
                    reason = death.say(CRASHED + " {count} times ({nameds})")
                    log(f"{where} has no pHash: it {reason} (it still matches raw images byte for byte)")
                    job = dataclasses.replace(job, crashed=(*job.crashed, (i, reason)))
            future = pool.submit(job, AFTER_DEATH)


# The log line of each kind of death while hashing an eval image (runtime/deaths.py), and what the
# stage raises when it fails of it, with what message.
_NOTES = {
    CRASHED_KIND: "the eval set's hashing process died ({named}) hashing {where}; retrying it in a fresh process",
    OUT_OF_MEMORY: "the eval set's hashing ran out of memory on {where} ({count} of {limit}); retrying it in a "
                   "fresh process",
    TIMED_OUT: "hashing {where} ran past IMNET_IMAGE_TIMEOUT ({seconds:g} s); its process was killed ({count} of "
               "{limit}); retrying it in a fresh process",
    KILLED: "the eval set's hashing process died ({named}) hashing {where} ({count} of {limit}); retrying it in a "
            "fresh process",
}
_FAILURES = {
    OUT_OF_MEMORY: (ScanOutOfMemory, "out of memory hashing {where} {count} times, each in a fresh process; nothing "
                    "was recorded for the eval set. Memory is no property of the image (never a missing pHash): "
                    "give the index more memory or lower IMNET_WORKERS"),
    TIMED_OUT: (ScanKilled, "hashing {where} ran past IMNET_IMAGE_TIMEOUT ({seconds:g} s) {count} times, each in a "
                "fresh process, and was killed; nothing was recorded for the eval set. A hung decoder is not a "
                "missing pHash: raise IMNET_IMAGE_TIMEOUT if the machine is just slow"),
    KILLED: (ScanKilled, "the eval set's hashing process was killed from outside ({nameds}) {count} times while "
             "hashing {where}; nothing was recorded for the eval set. A kill (the OOM killer, a cgroup memory "
             "limit, preemption) is not a missing pHash: give the index more memory or lower IMNET_WORKERS, and "
             "build again"),
}
