"""One shard: read its plan slice, range-read each source from its raw tar, encode in parallel,
write the WebDataset tar in plan order, and commit it and its manifest atomically.

The samples' tar layout lives here (where the out root keeps manifests and commit records, and
how a tar ends: outroot.py): each sample is `<key>.cls`, `<key>.json`, `<key>.webp` in that (sorted)
order (`<key>.jpg` last too, for a release with codec "jpeg"), with fixed member metadata so that the
same input gives the same bytes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from imnet_assets.image.decode import ImageRejected
from imnet_assets.image.encode import EncodeSettings, encode_image
from imnet_assets.release.altlabels import sample_fields
from imnet_assets.release.changed_sources import SourceChanged, mark
from imnet_assets.release.freshness import remember
from imnet_assets.release.outroot import manifest_url, sample_digest, state_url, tar_end
from imnet_assets.release.plan import SliceRow, read_slice
from imnet_assets.release.verify import check_committed, stored_image_problem
from imnet_assets.runtime.procpool import preload
from imnet_assets.runtime.workerpool import (
    ReplyUnreadable,
    WorkerDied,
    WorkerPool,
    next_priority,
    shared_pool,
)
from imnet_assets.storage import atomic, fs
from imnet_assets.storage.rawfolders import source_location

preload(__name__)  # the forkserver imports this module once for all workers

# Bump when the bytes a shard holds for the same input would change (encoding rules, tar layout,
# JSON fields). Part of every shard's fingerprint, so a bump makes every shard stale.
ENCODER_VERSION = "2"  # 2: JPEG data that runs out before EOI is repaired or rejected; progressive memory cap


def fingerprint(plan_digest: str, settings: EncodeSettings) -> str:
    """What a shard's bytes depend on: its plan slice, the encoder version and the settings."""
    text = json.dumps(
        # issue 17: alt_labels counts only when set, so shards built without it keep their fingerprint
        # issue 25: the codec's fields (EncodeSettings.image_fields): WebP's as before, so existing shards stay fresh
        {"plan": plan_digest, "encoder": ENCODER_VERSION,
         "settings": {**settings.image_fields(), **({"alt_labels": settings.alt_labels} if settings.alt_labels else {})}},
        sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def code_version(settings: EncodeSettings) -> str:
    if settings.codec != "webp":
        return f"enc{ENCODER_VERSION}-{settings.codec}-q{settings.quality}-s{settings.max_short}"
    return f"enc{ENCODER_VERSION}-q{settings.quality}-m{settings.method}-s{settings.max_short}"


@dataclass
class ShardResult:
    shard: str
    path: str
    planned: int
    num_samples: int
    bytes: int
    sha256: str
    seconds: float
    repaired: int
    excluded: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the shard check's; none: committed and fresh
    check_seconds: float = 0.0
    fingerprint: str = ""  # the manifest's (what makes the shard fresh under a plan and settings)

    @property
    def images_per_second(self) -> float:
        return self.num_samples / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------- the work of one image
#
# Everything per image runs in the encode workers (workerpool.WorkerPool): read the source by
# (tar, offset, size), check its sha256 against the plan, encode, hash the WebP, decode the sampled
# ones, and build the sample's three tar members (headers, payloads, padding) as one bytes object.
# The coordinating process only writes those bytes in plan order, hashing them as they pass, and
# records the manifest: about 1/200 of the encode CPU per image (bench/scaleup.py).


class SourceUnreadable(OSError):
    """A raw tar could not be read at all (gone, no permission, an I/O or network error that
    outlasted the retries). Not a property of the image: the shard run fails, naming the tar, and
    commits nothing, so that a rerun builds the shard whole once the storage answers again."""


class ShardChangedDuringCheck(RuntimeError):
    """The committed tar changed on storage (another size or stamp) between its commit and the end
    of its check: the check may not have read the bytes now there, so no commit record vouches
    for them, and the run fails naming the shard."""


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
DEATHS_TO_EXCLUDE = 2  # crashes (workerpool.CRASH_SIGNALS) one image causes before it is excluded, naming them
MEMORY_RETRIES = 3  # MemoryErrors of one image before the run fails (each time in a fresh worker)
KILLS_TO_FAIL = 4  # kills from outside (SIGKILL, SIGTERM) while encoding one image before the run fails
TIMEOUTS_TO_FAIL = 2  # times one image runs past IMNET_IMAGE_TIMEOUT (each in a fresh worker) before the run fails
MAX_JOB_RETRIES = 8  # deaths of a job's workers while it held no image (queued, between images) before the run fails
TAR_FORMAT = tarfile.PAX_FORMAT  # ustar headers for ordinary names; a pax record for long / non-ASCII keys
TAR_ENCODING = "utf-8"


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


def _crash_hook(sha256: str, crash_sha256: str | None) -> None:
    """Test hook (settings.test_crash_sha256, IMNET_TEST_CRASH_SHA256): the encode worker process
    segfaults (a real SIGSEGV, as a codec crash would) whenever it is about to encode the source of
    that sha256. Only ever in a pool worker, never in the coordinating process."""
    if crash_sha256 == sha256 and multiprocessing.parent_process() is not None:
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV


def _tar_member(name: str, payload: bytes) -> list[bytes]:
    header = _ustar_header(name, len(payload)) or _tarinfo(name, len(payload)).tobuf(
        TAR_FORMAT, TAR_ENCODING, "surrogateescape")
    pad = -len(payload) % tarfile.BLOCKSIZE
    return [header, payload, tarfile.NUL * pad] if pad else [header, payload]


def _ustar_header(name: str, size: int) -> bytes | None:
    """The header tarfile writes for a member `_tarinfo(name, size)` when it needs no pax record
    (an ASCII name of at most 100 characters, a size below 8 GiB), byte for byte, built from a
    template (tarfile's TarInfo.tobuf costs 60 us a member: 0.6% of the encode); None otherwise."""
    if len(name) > 100 or not name.isascii() or "\0" in name or size >= 8 ** 11:
        return None
    head = b"".join((name.encode("ascii").ljust(100, b"\0"), _USTAR_TEMPLATE[100:124], b"%011o\0" % size,
                     _USTAR_TEMPLATE[136:]))
    # tarfile's checksum: the sum of the header's bytes with the checksum field as 8 spaces (the
    # template's), written as 6 octal digits and a NUL, the field's last space kept
    return b"".join((head[:148], b"%06o\0" % sum(head), head[155:]))


def sample_bytes(row: SliceRow, enc, alt_labels: str = "", ext: str = "webp") -> bytes:
    """One sample's three tar members, headers and padding included: what tarfile writes for them."""
    return b"".join(part for name, payload in sample_members(row, enc, alt_labels, ext)
                    for part in _tar_member(name, payload))


def prepare_sample(row: SliceRow, data: bytes | None, problem: str, settings: EncodeSettings,
                   decode_every: int, encode: Callable | None = None, crash_sha256: str | None = None) -> tuple:
    """("ok", sample bytes, manifest record, check problem, outroot.sample_digest of the sample bytes) or
    ("excluded", reason) for one row.
    MemoryError propagates (the worker exits and the image is tried again in a fresh process)."""
    if data is None:
        return "excluded", problem
    _crash_hook(row.sha256, crash_sha256)
    try:
        enc = (encode or encode_image)(data, settings)
    except ImageRejected as e:
        return "excluded", e.reason
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - one bad image never crashes the shard
        return "excluded", f"encoder error: {type(e).__name__}: {e}"
    webp_sha256 = hashlib.sha256(enc.webp)
    record = {
        "key": row.key, "position": row.position, "width": enc.width, "height": enc.height,
        "orig_width": enc.orig_width, "orig_height": enc.orig_height, "webp_bytes": len(enc.webp),
        "webp_sha256": webp_sha256.hexdigest(), "repaired": enc.repaired,
    }
    decode = enc.repaired or (decode_every > 0 and row.position % decode_every == 0)
    blob = sample_bytes(row, enc, settings.alt_labels, settings.extension)
    problem = stored_image_problem(settings.extension, enc.webp, (enc.width, enc.height), decode)
    return "ok", blob, record, problem, sample_digest(blob, webp_sha256.digest(), len(enc.webp))


@dataclass
class EncodeJob:
    """A few consecutive rows of a plan slice, for one encode worker (workerpool.WorkerPool)."""

    raw_root: str
    rows: list[SliceRow]
    settings: EncodeSettings
    decode_every: int
    encode: Callable | None = None  # None: encode_image (bench/scaleup.py passes a null codec)
    crash_sha256: str | None = None  # test hook, see _crash_hook
    time_limit: float | None = None  # seconds per image (IMNET_IMAGE_TIMEOUT): the pool kills a worker past it

    def prefetch(self, readers):
        return [readers.submit(_read_source, row, self.raw_root) for row in self.rows]

    def run(self, reads, mark) -> list[tuple]:
        out = []
        for i, (row, read) in enumerate(zip(self.rows, reads)):
            data, problem = read.result()
            mark(i)
            out.append(prepare_sample(row, data, problem, self.settings, self.decode_every, self.encode,
                                      self.crash_sha256))
            mark(-1)  # waiting for the next read is not this image's time
        return out


def _batch_size(rows: int, workers: int) -> int:
    return max(1, min(BATCH, rows // (workers * 4)))


def encode_jobs(rows: list[SliceRow], raw_root: str, settings: EncodeSettings, workers: int, decode_every: int,
                encode: Callable | None = None) -> Iterator[EncodeJob]:
    """The jobs a shard run's rows go to the encoders in, in order (shard_ahead submits the first
    ones of a run before it starts: equal jobs, so the run takes their results over)."""
    from imnet_assets.settings import image_timeout, test_crash_sha256

    batch = _batch_size(len(rows), max(workers, 1))
    crash, limit = test_crash_sha256(), image_timeout()
    return (EncodeJob(raw_root, rows[i:i + batch], settings, decode_every, encode, crash, limit)
            for i in range(0, len(rows), batch))


def prepared_samples(rows: list[SliceRow], raw_root: str, settings: EncodeSettings, workers: int,
                     decode_every: int = 16, log: Callable[[str], None] = lambda _m: None,
                     encode: Callable | None = None, priority: int = 0,
                     ahead: list | None = None) -> Iterator[tuple[SliceRow, tuple]]:
    """(row, prepare_sample's result) per row, in plan order.

    workers > 1: jobs of a few rows go to this process's shared worker pool (workerpool.shared_pool),
    at most `workers * pool.depth` jobs ahead of the consumer, so memory stays bounded. A worker
    that dies costs a retry of its jobs (see `_settle` for which deaths exclude an image, which
    fail the run); an image that runs past IMNET_IMAGE_TIMEOUT gets its worker killed.
    workers == 1: in this process (reads a few jobs ahead in threads; no time limit).
    `ahead`: (job, future) pairs already submitted to the pool for these rows (shard_ahead): a
    job equal to the next one to submit is taken over; at the first that differs, the rest are
    cancelled.
    """
    from concurrent.futures import ThreadPoolExecutor

    jobs = encode_jobs(rows, raw_root, settings, workers, decode_every, encode)
    if workers <= 1:
        with ThreadPoolExecutor(16, thread_name_prefix="read") as readers:
            window: collections.deque = collections.deque()
            try:
                for job in jobs:
                    window.append((job, job.prefetch(readers)))
                    if len(window) >= 4:
                        job, reads = window.popleft()
                        yield from zip(job.rows, _run_here(job, reads))
                while window:
                    job, reads = window.popleft()
                    yield from zip(job.rows, _run_here(job, reads))
            finally:
                for _job, reads in window:
                    for r in reads:
                        r.cancel()
        return
    pool = shared_pool(workers)
    window = collections.deque()
    ahead = collections.deque(ahead or ())
    try:
        for job in jobs:
            if ahead and ahead[0][0] == job:
                window.append(ahead.popleft())
            else:
                while ahead:
                    ahead.popleft()[1].cancel()
                window.append((job, pool.submit(job, priority)))
            if len(window) >= workers * pool.depth:
                yield from _settle(pool, *window.popleft(), log, priority)
        while window:
            yield from _settle(pool, *window.popleft(), log, priority)
    finally:
        for _job, fut in [*window, *ahead]:  # the consumer stopped (an error): drop what is not started
            fut.cancel()


def _run_here(job: EncodeJob, reads) -> list[tuple]:
    try:
        return job.run(reads, lambda _i: None)
    except MemoryError:
        raise EncoderOutOfMemory("out of memory while encoding (IMNET_WORKERS=1: not retried); nothing "
                                 "was committed. Size limits are decided at index time; give the run more "
                                 "memory") from None


def _settle(pool: WorkerPool, job: EncodeJob, future, log: Callable[[str], None],
            priority: int = 0) -> Iterator[tuple]:
    """The results of one job, in row order, retrying it after worker deaths (SPEC "Failure
    behaviour"). Only a crash the image causes (workerpool.CRASH_SIGNALS), DEATHS_TO_EXCLUDE times,
    excludes it, naming the crashes. A kill from outside (SIGKILL: the OOM killer, a cgroup limit,
    preemption; SIGTERM), a run past the time limit and a MemoryError are retried in fresh
    processes a bounded number of times, then fail the run naming the image (EncoderKilled,
    EncoderOutOfMemory): never an exclusion, so shard contents never depend on memory pressure."""
    decided: dict[int, tuple] = {}  # row index -> ("excluded", reason) for rows that crashed twice
    pending = list(range(len(job.rows)))
    crashes: dict[int, list[str]] = collections.defaultdict(list)
    kills: dict[int, list[str]] = collections.defaultdict(list)
    timeouts: dict[int, int] = collections.defaultdict(int)
    oom: dict[int, int] = collections.defaultdict(int)
    held: list[str] = []  # deaths while the job held no image (queued in the worker, between images)
    while pending:
        try:
            results = future.result()
            break
        except ReplyUnreadable as e:
            raise ReplyUnreadable(f"{e} (images {[job.rows[i].key for i in pending]}); nothing was committed") from None
        except WorkerDied as died:
            if died.culprit is None:
                held.append(died.how)
                log(f"an encoder process died ({died.how}) between images; retrying its images")
                if len(held) > MAX_JOB_RETRIES:
                    raise EncoderKilled(
                        f"encoder processes died {len(held)} times ({', '.join(held)}) holding the images "
                        f"{[job.rows[i].key for i in pending]}; nothing was committed") from None
            else:
                real = pending[died.culprit]
                row = job.rows[real]
                where = f"{row.key} ({row.tar}@{row.offset})"
                if died.out_of_memory:
                    oom[real] += 1
                    log(f"encoder ran out of memory on {row.key} ({oom[real]} of {MEMORY_RETRIES}); retrying it")
                    if oom[real] >= MEMORY_RETRIES:
                        raise EncoderOutOfMemory(
                            f"out of memory encoding {where} {oom[real]} times in fresh "
                            "worker processes; nothing was committed. Size limits are decided at index time; give "
                            "the run more memory or lower IMNET_WORKERS") from None
                elif died.timed_out is not None:
                    timeouts[real] += 1
                    log(f"encoding {where} ran past IMNET_IMAGE_TIMEOUT ({died.timed_out:g} s), its process was "
                        f"killed ({timeouts[real]} of {TIMEOUTS_TO_FAIL}); retrying it in a new process")
                    if timeouts[real] >= TIMEOUTS_TO_FAIL:
                        raise EncoderKilled(
                            f"encoding {where} ran past IMNET_IMAGE_TIMEOUT ({died.timed_out:g} s) {timeouts[real]} "
                            "times, each in a fresh process, and was killed; nothing was committed. A hung encoder "
                            "is not an exclusion: raise IMNET_IMAGE_TIMEOUT if the machine is just slow") from None
                elif died.crashed:
                    crashes[real].append(died.how)
                    log(f"encoder process died ({died.how}) while encoding {where}; "
                        f"retrying its images in a new process")
                    if len(crashes[real]) >= DEATHS_TO_EXCLUDE:
                        decided[real] = ("excluded", f"encoder process died {len(crashes[real])} times "
                                                     f"({', '.join(crashes[real])}) while encoding")
                        pending.remove(real)
                else:
                    kills[real].append(died.how)
                    log(f"encoder process died ({died.how}) while encoding {where}: killed from outside "
                        f"({len(kills[real])} of {KILLS_TO_FAIL}); retrying its images in a new process")
                    if len(kills[real]) >= KILLS_TO_FAIL:
                        raise EncoderKilled(
                            f"the encoder process was killed from outside ({', '.join(kills[real])}) "
                            f"{len(kills[real])} times while encoding {where}; nothing was committed. A kill (the "
                            "OOM killer, a cgroup memory limit, preemption) is not an exclusion: give the run more "
                            "memory or lower IMNET_WORKERS, and build again") from None
            if pending:
                future = pool.submit(dataclasses.replace(job, rows=[job.rows[i] for i in pending]), priority)
    else:
        results = []  # every row decided
    by_index = dict(zip(pending, results))
    for i, row in enumerate(job.rows):
        yield row, decided.get(i) or by_index[i]


# ----------------------------------------------------------------------------- tar layout


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


_USTAR_TEMPLATE = b"".join((  # _tarinfo("", 0)'s header with its checksum field as 8 spaces
    _tarinfo("", 0).tobuf(TAR_FORMAT, TAR_ENCODING, "surrogateescape")[:148], b" " * 8,
    _tarinfo("", 0).tobuf(TAR_FORMAT, TAR_ENCODING, "surrogateescape")[156:]))


def sample_members(row: SliceRow, enc, alt_labels: str = "", ext: str = "webp") -> list[tuple[str, bytes]]:
    """The three members of one sample, in the order they are written (`ext`: the stored image's,
    EncodeSettings.extension)."""
    meta = {
        "filename": f"{row.wnid}/{row.key}.JPEG",
        "label": row.label,
        "class_name": row.wnid,
        "width": enc.width,
        "height": enc.height,
        "orig_width": enc.orig_width,
        "orig_height": enc.orig_height,
        "source_sha256": row.sha256,
        **sample_fields(row.wnid, alt_labels),  # issue 17: label_in1k under IMNET_ALT_LABELS=in1k
    }
    return [
        (f"{row.key}.cls", str(row.label).encode("ascii")),
        (f"{row.key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")),
        (f"{row.key}.{ext}", enc.webp),
    ]


class _HashingWriter:
    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, b) -> int:
        self._f.write(b)
        self.sha.update(b)
        self.count += len(b)
        return len(b)


def build_shard(
    *,
    out_root: str,
    raw_root: str,
    shard_key: str,
    shard_name: str,
    settings: EncodeSettings,
    workers: int,
    run_id: str,
    log: Callable[[str], None] = lambda _m: None,
    decode_every: int = 16,
    encode: Callable | None = None,
    after_commit: Callable[[str], None] | None = None,
    after_check: Callable[[str], None] | None = None,
    ahead=None,
) -> ShardResult:
    """Encode, commit and check one shard and its manifest. Bad images become recorded exclusions.

    The commit record (`state_url`, what freshness reads) is removed first and written last, only
    once the check of the committed tar passed: a shard whose check failed is never fresh, so the
    next build, schedule or sensor builds it again. `result.problems` holds the check's findings.

    Safe to call from several threads of one process at once (each for its own shard): they share
    the process's worker pool (`workerpool.shared_pool`). `decode_every`: IMNET_CHECK_DECODE_EVERY.
    `encode`: the codec (bench/scaleup.py's null codec); `after_commit(url)`: a test hook called
    between the commit and the check; `after_check(url)`: one called once the check passed, before
    the tar's stamp is looked at again (tests change the tar there). `ahead`: this shard's first
    jobs, submitted before the run started (shard_ahead.take), whose results the run takes over.

    The commit record's stamp (size and mtime / ETag) is the one read right after the commit,
    before the check; it is read again once the check passed, and if it changed the record is
    not written and ShardChangedDuringCheck names the shard.
    """
    started = time.perf_counter()
    final = fs.join(out_root, shard_name)
    mf_url = manifest_url(out_root, shard_key)
    st_url = state_url(out_root, shard_key)
    for leftover in atomic.remove_partials(final) + atomic.remove_partials(mf_url) + atomic.remove_partials(st_url):
        log(f"removed leftover of an interrupted run: {leftover}")
    rows, plan_digest = read_slice(out_root, shard_key)
    # runs sharing the worker pool are served oldest first; a run encoded ahead (shard_ahead.Ahead)
    # keeps the place its first jobs took
    priority = ahead.priority if ahead is not None else next_priority()
    fs.remove(st_url)  # from here until the check passed, this shard is not fresh
    samples: list[dict] = []
    spans: list[dict] = []  # where each sample's bytes went, and their sha256 (the read-back checks them)
    excluded: list[dict] = []
    problems: list[str] = []
    with _marking_changed_sources(out_root, shard_key, rows, run_id, log), atomic.atomic_open(final) as raw_out:
        out = _HashingWriter(raw_out)
        for row, prepared in prepared_samples(rows, raw_root, settings, workers, decode_every, log, encode, priority,
                                            ahead.jobs if ahead is not None else None):
            if prepared[0] != "ok":
                excluded.append({"key": row.key, "position": row.position, "reason": prepared[1]})
                log(f"excluded {row.key} ({row.tar}@{row.offset}): {prepared[1]}")
                continue
            _, blob, record, problem, blob_digest = prepared
            spans.append({"offset": out.count, "sample_size": len(blob), "sample_digest": blob_digest})
            out.write(blob)
            samples.append(record)
            if problem:
                problems.append(f"shard {shard_key} sample {row.key}: {problem}")
        out.write(tar_end(out.count))
    committed = fs.stat(final)  # (size, stamp) of the tar the check is about to read
    encoded = time.perf_counter() - started
    manifest = {
        "shard": shard_key,
        "path": shard_name,
        "fingerprint": fingerprint(plan_digest, settings),
        "plan_digest": plan_digest,
        "code_version": code_version(settings),
        "settings": asdict(settings),
        "planned": len(rows),
        "num_samples": len(samples),
        "bytes": out.count,
        "sha256": out.sha.hexdigest(),
        "run_id": run_id,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(encoded, 3),
        "samples": samples,
        "excluded": excluded,
    }
    atomic.write_atomic(mf_url, json.dumps(manifest, separators=(",", ":")).encode())
    if after_commit is not None:
        after_commit(final)
    planned = {r.key: r for r in rows}
    expected = [dict(s, **span, label=planned[s["key"]].label, wnid=planned[s["key"]].wnid,
                     source_sha256=planned[s["key"]].sha256) for s, span in zip(samples, spans)]
    problems += [f"shard {shard_key}: {p}" for p in
                 check_committed(final, expected, manifest["sha256"], True, decode_every=decode_every, workers=workers,
                                 priority=priority, ext=settings.extension)]
    if not problems:
        if after_check is not None:
            after_check(final)
        now = fs.stat(final)
        if now != committed:
            raise ShardChangedDuringCheck(
                f"shard {shard_key}: {final} changed on storage while it was being checked (size and stamp "
                f"{committed[0]} {committed[1]} at the commit, {now[0]} {now[1]} after the check): not recorded "
                "as committed; another writer? Build the shard again")
        state = {k: manifest[k] for k in ("shard", "path", "fingerprint", "bytes", "sha256", "num_samples", "run_id")}
        state["stamp"] = committed[1]  # the checked bytes' stamp: an edit in place changes it (freshness.verdict)
        atomic.write_atomic(st_url, json.dumps(state, sort_keys=True).encode())
        remember(out_root, shard_key, state)
    else:
        log(f"shard {shard_key}: the check failed, not recorded as committed: {'; '.join(problems[:5])}")
    return ShardResult(
        shard_key, final, len(rows), len(samples), out.count, manifest["sha256"], encoded,
        sum(1 for s in samples if s["repaired"]), excluded, problems, time.perf_counter() - started - encoded,
        manifest["fingerprint"],
    )


@contextlib.contextmanager
def _marking_changed_sources(out_root: str, shard_key: str, rows: list[SliceRow], run_id: str,
                             log: Callable[[str], None]) -> Iterator[None]:
    """A SourceChanged raised inside leaves its tar's marker under the out root (for the index's
    freshness and `imnet status`, core/changed_sources.py) on its way out: the run fails."""
    try:
        yield
    except SourceChanged as e:
        row = next((r for r in rows if r.tar == e.tar and r.member == e.member), None)
        url = mark(out_root, e, row.offset if row else -1, row.size if row else -1, row.sha256 if row else "",
                   shard_key, run_id)
        log(f"shard {shard_key}: {e}; marked in {url}")
        raise


# ----------------------------------------------------------------------------- freshness & checks


