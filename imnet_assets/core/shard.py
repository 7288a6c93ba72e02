"""One shard: read its plan slice, range-read each source from its raw tar, encode in parallel,
write the WebDataset tar in plan order, and commit it and its manifest atomically.

The tar layout lives only here: each sample is `<key>.cls`, `<key>.json`, `<key>.webp`, in that
(sorted) order, with fixed member metadata so that the same input gives the same bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from PIL import Image

from . import fs
from .altlabels import sample_fields
from .encode import EncodeSettings, ImageRejected, encode_image
from .plan import SliceRow, read_slice
from .procpool import WorkerDied, WorkerPool, shared_pool

# Bump when the bytes a shard holds for the same input would change (encoding rules, tar layout,
# JSON fields). Part of every shard's fingerprint, so a bump makes every shard stale.
ENCODER_VERSION = "2"  # 2: JPEG data that runs out before EOI is repaired or rejected; progressive memory cap
MANIFEST_DIR = "_manifests"


def fingerprint(plan_digest: str, settings: EncodeSettings) -> str:
    """What a shard's bytes depend on: its plan slice, the encoder version and the settings."""
    text = json.dumps(
        # issue 17: alt_labels counts only when set, so shards built without it keep their fingerprint
        {"plan": plan_digest, "encoder": ENCODER_VERSION,
         "settings": {k: v for k, v in asdict(settings).items() if k != "alt_labels" or v}}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def code_version(settings: EncodeSettings) -> str:
    return f"enc{ENCODER_VERSION}-q{settings.quality}-m{settings.method}-s{settings.max_short}"


def manifest_url(out_root: str, shard_key: str) -> str:
    return fs.join(out_root, MANIFEST_DIR, f"{shard_key}.json")


def state_url(out_root: str, shard_key: str) -> str:
    return fs.join(out_root, MANIFEST_DIR, f"{shard_key}.state.json")


def read_state(out_root: str, shard_key: str) -> dict | None:
    """The small commit record written last: fingerprint, bytes, sha256, num_samples."""
    return fs.read_json(state_url(out_root, shard_key))


def committed_as(state: dict) -> str:
    """What a commit record says was committed: the tar's sha256 and the run that wrote it (a
    rebuild of the same bytes is another commit: the catalog's lineage names its run)."""
    return f"{state['sha256']}:{state.get('run_id', '')}"


def read_manifest(out_root: str, shard_key: str) -> dict | None:
    return fs.read_json(manifest_url(out_root, shard_key))


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

    @property
    def images_per_second(self) -> float:
        return self.num_samples / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------- the work of one image
#
# Everything per image runs in the encode workers (procpool.WorkerPool): read the source by
# (tar, offset, size), check its sha256 against the plan, encode, hash the WebP, decode the sampled
# ones, and build the sample's three tar members (headers, payloads, padding) as one bytes object.
# The coordinating process only writes those bytes in plan order, hashing them as they pass, and
# records the manifest: about 1/200 of the encode CPU per image (bench/scaleup.py).


class SourceUnreadable(OSError):
    """A raw tar could not be read at all (gone, no permission, an I/O or network error that
    outlasted the retries). Not a property of the image: the shard run fails, naming the tar, and
    commits nothing, so that a rerun builds the shard whole once the storage answers again."""


class EncoderOutOfMemory(MemoryError):
    """An image ran its encoder out of memory again and again. Memory is no property of the image
    (size limits are settled at index time, the same everywhere), so it is not excluded: the shard
    run fails, naming it, and commits nothing."""


READ_RETRY_SECONDS = (0.5, 2.0)  # waits before the second and third attempt of a failed read
BATCH = 8  # images per job sent to a worker (fewer for small shards, so every worker gets some)
DEATHS_TO_EXCLUDE = 2  # an image that kills its encoder this often is excluded, naming the crash
MEMORY_RETRIES = 3  # MemoryErrors of one image before the run fails (each time in a fresh worker)
MAX_JOB_RETRIES = 8  # deaths of one job's workers, however caused, before the run fails
TAR_FORMAT = tarfile.PAX_FORMAT  # ustar headers for ordinary names; a pax record for long / non-ASCII keys
TAR_ENCODING = "utf-8"


_reader: tuple[int, fs.RangeReader] | None = None


def _range_reader() -> fs.RangeReader:
    """This process's reader of raw tars (its open files are per thread)."""
    global _reader
    if _reader is None or _reader[0] != os.getpid():
        _reader = (os.getpid(), fs.RangeReader())
    return _reader[1]


def _read_source(row: SliceRow, raw_root: str) -> tuple[bytes | None, str]:
    """The row's source bytes, or None and why they are not the indexed ones (the tar is shorter
    than indexed, or its bytes changed there: recorded as an exclusion). A tar that cannot be read
    at all raises SourceUnreadable once the retries are spent."""
    url = fs.join(raw_root, row.tar)
    reader = _range_reader()
    for wait in (*READ_RETRY_SECONDS, None):
        try:
            data = reader.read(url, row.offset, row.size)
            break
        except Exception as e:  # noqa: BLE001 - retried, then raised as what it is
            if wait is None:
                raise SourceUnreadable(fs.redact(
                    f"cannot read raw tar {url} at byte {row.offset} (for {row.key}): {type(e).__name__}: {e}; "
                    "if it moved or changed since indexing, `imnet build` indexes it again")) from None
            time.sleep(wait)
    if len(data) != row.size:
        return None, f"raw tar {row.tar} is shorter than indexed: {len(data)} of {row.size} bytes at {row.offset}"
    if hashlib.sha256(data).hexdigest() != row.sha256:
        return None, f"source bytes changed since indexing ({row.tar}@{row.offset}: sha256 differs)"
    return data, ""


def _crash_hook(sha256: str, crash_sha256: str | None) -> None:
    """Test hook (settings.test_crash_sha256, IMNET_TEST_CRASH_SHA256): the encode worker process
    segfaults (a real SIGSEGV, as a codec crash would) whenever it is about to encode the source of
    that sha256. Only ever in a pool worker, never in the coordinating process."""
    if crash_sha256 == sha256 and multiprocessing.parent_process() is not None:
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV


def _tar_member(name: str, payload: bytes) -> list[bytes]:
    header = _tarinfo(name, len(payload)).tobuf(TAR_FORMAT, TAR_ENCODING, "surrogateescape")
    pad = -len(payload) % tarfile.BLOCKSIZE
    return [header, payload, tarfile.NUL * pad] if pad else [header, payload]


def sample_bytes(row: SliceRow, enc, alt_labels: str = "") -> bytes:
    """One sample's three tar members, headers and padding included: what tarfile writes for them."""
    return b"".join(part for name, payload in sample_members(row, enc, alt_labels)
                    for part in _tar_member(name, payload))


def tar_end(offset: int) -> bytes:
    """What closes a tar of `offset` bytes: two zero blocks, then zeros to a whole record (tarfile's)."""
    offset += 2 * tarfile.BLOCKSIZE
    return tarfile.NUL * (2 * tarfile.BLOCKSIZE + -offset % tarfile.RECORDSIZE)


def _webp_problem(webp: bytes, size: tuple[int, int], decode: bool) -> str:
    """Why the encoder's WebP is not what the check wants ("" when it is): WEBP of the recorded
    size, and, when `decode`, its pixels decode in full."""
    try:
        with Image.open(io.BytesIO(webp)) as im:
            if im.format != "WEBP" or im.size != size:
                return f"webp is {im.format} {im.size}"
            if decode:
                im.load()
    except Exception as e:  # noqa: BLE001
        return f"webp does not decode: {e}"
    return ""


def prepare_sample(row: SliceRow, data: bytes | None, problem: str, settings: EncodeSettings,
                   decode_every: int, encode: Callable | None = None, crash_sha256: str | None = None) -> tuple:
    """("ok", sample bytes, manifest record, check problem, sha256 of the sample bytes) or
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
    record = {
        "key": row.key, "position": row.position, "width": enc.width, "height": enc.height,
        "orig_width": enc.orig_width, "orig_height": enc.orig_height, "webp_bytes": len(enc.webp),
        "webp_sha256": hashlib.sha256(enc.webp).hexdigest(), "repaired": enc.repaired,
    }
    decode = enc.repaired or (decode_every > 0 and row.position % decode_every == 0)
    blob = sample_bytes(row, enc, settings.alt_labels)
    problem = _webp_problem(enc.webp, (enc.width, enc.height), decode)
    return "ok", blob, record, problem, hashlib.sha256(blob).hexdigest()


@dataclass
class EncodeJob:
    """A few consecutive rows of a plan slice, for one encode worker (procpool.WorkerPool)."""

    raw_root: str
    rows: list[SliceRow]
    settings: EncodeSettings
    decode_every: int
    encode: Callable | None = None  # None: encode_image (bench/scaleup.py passes a null codec)
    crash_sha256: str | None = None  # test hook, see _crash_hook

    def prefetch(self, readers):
        return [readers.submit(_read_source, row, self.raw_root) for row in self.rows]

    def run(self, reads, mark) -> list[tuple]:
        out = []
        for i, (row, read) in enumerate(zip(self.rows, reads)):
            data, problem = read.result()
            mark(i)
            out.append(prepare_sample(row, data, problem, self.settings, self.decode_every, self.encode,
                                      self.crash_sha256))
        return out


def _batch_size(rows: int, workers: int) -> int:
    return max(1, min(BATCH, rows // (workers * 4)))


def prepared_samples(rows: list[SliceRow], raw_root: str, settings: EncodeSettings, workers: int,
                     decode_every: int = 16, log: Callable[[str], None] = lambda _m: None,
                     encode: Callable | None = None) -> Iterator[tuple[SliceRow, tuple]]:
    """(row, prepare_sample's result) per row, in plan order.

    workers > 1: jobs of a few rows go to this process's shared worker pool (procpool.shared_pool),
    at most `workers * pool.depth` jobs ahead of the consumer, so memory stays bounded. A worker
    that dies costs a retry of its jobs; an image it died on twice is excluded naming the crash.
    workers == 1: in this process (reads a few jobs ahead in threads).
    """
    from concurrent.futures import ThreadPoolExecutor

    from ..settings import test_crash_sha256

    batch = _batch_size(len(rows), max(workers, 1))
    crash = test_crash_sha256()
    jobs = (EncodeJob(raw_root, rows[i:i + batch], settings, decode_every, encode, crash)
            for i in range(0, len(rows), batch))
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
    try:
        for job in jobs:
            window.append((job, pool.submit(job)))
            if len(window) >= workers * pool.depth:
                yield from _settle(pool, *window.popleft(), log)
        while window:
            yield from _settle(pool, *window.popleft(), log)
    finally:
        for _job, fut in window:  # the consumer stopped (an error): drop what is not started
            fut.cancel()


def _run_here(job: EncodeJob, reads) -> list[tuple]:
    try:
        return job.run(reads, lambda _i: None)
    except MemoryError:
        raise EncoderOutOfMemory("out of memory while encoding (IMNET_WORKERS=1: not retried); nothing "
                                 "was committed. Size limits are decided at index time; give the run more "
                                 "memory") from None


def _settle(pool: WorkerPool, job: EncodeJob, future, log: Callable[[str], None]) -> Iterator[tuple]:
    """The results of one job, in row order, retrying it after worker deaths."""
    decided: dict[int, tuple] = {}  # row index -> ("excluded", reason) for rows that killed twice
    pending = list(range(len(job.rows)))
    deaths: dict[int, list[str]] = collections.defaultdict(list)
    oom: dict[int, int] = collections.defaultdict(int)
    for _attempt in range(MAX_JOB_RETRIES + 1):
        try:
            results = future.result()
            break
        except WorkerDied as died:
            if died.culprit is not None:
                real = pending[died.culprit]
                row = job.rows[real]
                if died.out_of_memory:
                    oom[real] += 1
                    log(f"encoder ran out of memory on {row.key} ({oom[real]} of {MEMORY_RETRIES}); retrying it")
                    if oom[real] >= MEMORY_RETRIES:
                        raise EncoderOutOfMemory(
                            f"out of memory encoding {row.key} ({row.tar}@{row.offset}) {oom[real]} times in fresh "
                            "worker processes; nothing was committed. Size limits are decided at index time; give "
                            "the run more memory or lower IMNET_WORKERS") from None
                else:
                    deaths[real].append(died.how)
                    log(f"encoder process died ({died.how}) while encoding {row.key} ({row.tar}@{row.offset}); "
                        f"retrying its images in a new process")
                    if len(deaths[real]) >= DEATHS_TO_EXCLUDE:
                        decided[real] = ("excluded", f"encoder process died {len(deaths[real])} times "
                                                     f"({', '.join(deaths[real])}) while encoding")
                        pending.remove(real)
            else:
                log(f"an encoder process died ({died.how}) between images; retrying its images")
            future = pool.submit(dataclasses.replace(job, rows=[job.rows[i] for i in pending]))
    else:
        raise RuntimeError(f"encoder processes died {MAX_JOB_RETRIES} times on the images "
                           f"{[r.key for r in job.rows]}; nothing was committed")
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


def sample_members(row: SliceRow, enc, alt_labels: str = "") -> list[tuple[str, bytes]]:
    """The three members of one sample, in the order they are written."""
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
        (f"{row.key}.webp", enc.webp),
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
) -> ShardResult:
    """Encode, commit and check one shard and its manifest. Bad images become recorded exclusions.

    The commit record (`state_url`, what freshness reads) is removed first and written last, only
    once the check of the committed tar passed: a shard whose check failed is never fresh, so the
    next build, schedule or sensor builds it again. `result.problems` holds the check's findings.

    Safe to call from several threads of one process at once (each for its own shard): they share
    the process's worker pool (`procpool.shared_pool`). `decode_every`: IMNET_CHECK_DECODE_EVERY.
    `encode`: the codec (bench/scaleup.py's null codec); `after_commit(url)`: a test hook called
    between the commit and the check.
    """
    started = time.perf_counter()
    final = fs.join(out_root, shard_name)
    mf_url = manifest_url(out_root, shard_key)
    st_url = state_url(out_root, shard_key)
    for leftover in fs.remove_partials(final) + fs.remove_partials(mf_url) + fs.remove_partials(st_url):
        log(f"removed leftover of an interrupted run: {leftover}")
    rows, plan_digest = read_slice(out_root, shard_key)
    fs.remove(st_url)  # from here until the check passed, this shard is not fresh
    samples: list[dict] = []
    spans: list[dict] = []  # where each sample's bytes went, and their sha256 (the read-back checks them)
    excluded: list[dict] = []
    problems: list[str] = []
    with fs.atomic_open(final) as raw_out:
        out = _HashingWriter(raw_out)
        for row, prepared in prepared_samples(rows, raw_root, settings, workers, decode_every, log, encode):
            if prepared[0] != "ok":
                excluded.append({"key": row.key, "position": row.position, "reason": prepared[1]})
                log(f"excluded {row.key} ({row.tar}@{row.offset}): {prepared[1]}")
                continue
            _, blob, record, problem, blob_sha256 = prepared
            spans.append({"offset": out.count, "sample_size": len(blob), "sample_sha256": blob_sha256})
            out.write(blob)
            samples.append(record)
            if problem:
                problems.append(f"shard {shard_key} sample {row.key}: {problem}")
        out.write(tar_end(out.count))
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
    fs.write_atomic(mf_url, json.dumps(manifest, separators=(",", ":")).encode())
    if after_commit is not None:
        after_commit(final)
    expected = [dict(s, **span) for s, span in zip(samples, spans)]
    problems += [f"shard {shard_key}: {p}" for p in
                 check_committed(final, expected, manifest["sha256"], True, decode_every=decode_every, workers=workers)]
    if not problems:
        state = {k: manifest[k] for k in ("shard", "path", "fingerprint", "bytes", "sha256", "num_samples", "run_id")}
        state["stamp"] = fs.stat(final)[1]  # an edit in place on storage changes it (shard_state)
        fs.write_atomic(st_url, json.dumps(state, sort_keys=True).encode())
    else:
        log(f"shard {shard_key}: the check failed, not recorded as committed: {'; '.join(problems[:5])}")
    return ShardResult(
        shard_key, final, len(rows), len(samples), out.count, manifest["sha256"], encoded,
        sum(1 for s in samples if s["repaired"]), excluded, problems, time.perf_counter() - started - encoded,
    )


# ----------------------------------------------------------------------------- the shard check's read-back
# NOTE for the lead: `check_committed` is the read-back of a committed shard; it is meant to move
# into core/verify.py (the single verification module) with its helpers below.

CHECK_CHUNK_BYTES = 16 << 20  # the read-back is split at sample boundaries into chunks about this size


@dataclass
class CheckChunkJob:
    """Bytes [start, end) of a committed shard, which begin at a sample, checked against the
    manifest records of the samples there (runs in the worker pool, or in this process)."""

    url: str
    start: int
    end: int | None  # None: to the end of the file (the last chunk, which holds the tar's end)
    expected: list[dict]
    decode: list[bool]

    def prefetch(self, readers):
        return None

    def run(self, _state=None, _mark=None) -> tuple[list[str], list[str], bool]:
        # A fresh open, never the raw tars' reader: it keeps files open, and a rebuilt shard is
        # another file under the same name.
        with fs.open_read(self.url) as f:
            f.seek(self.start)
            data = f.read() if self.end is None else f.read(self.end - self.start)
        return _check_bytes(data, self.start, self.end is None, self.expected, self.decode)


def _spans_intact(data: bytes, start: int, last: bool, expected: list[dict]) -> bool:
    """Whether every sample's bytes, re-read, hash to what was written at its offset, and (for the
    last chunk) the tar's end follows them exactly: then the file is byte for byte what was written."""
    for rec in expected:
        a = rec["offset"] - start
        if hashlib.sha256(data[a:a + rec["sample_size"]]).digest().hex() != rec["sample_sha256"]:
            return False
    if last:
        end = (expected[-1]["offset"] + expected[-1]["sample_size"]) if expected else start
        return data[end - start:] == tar_end(end)
    return True


def _check_bytes(data: bytes, start: int, last: bool, expected: list[dict],
                 decode: list[bool]) -> tuple[list[str], list[str], bool | None]:
    """(keys of the samples found in order, problems, whether the written bytes are intact (None:
    not known, no spans recorded)) for tar bytes starting at a sample, at byte `start` of the file."""
    keys: list[str] = []
    problems: list[str] = []
    intact = None
    if all("sample_sha256" in r for r in expected) and (expected or last):
        intact = _spans_intact(data, start, last, expected)
    groups: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                stem, _, ext = info.name.partition(".")
                payload = tar.extractfile(info).read() if info.isreg() else b""
                if not groups or groups[-1][0] != stem:
                    groups.append((stem, {}))
                groups[-1][1][ext] = payload
    except (tarfile.TarError, EOFError) as e:
        problems.append(f"tar unreadable after {len(groups)} samples of this part: {e}")
    for i, (key, parts) in enumerate(groups):
        keys.append(key)
        rec = expected[i] if i < len(expected) else None
        if rec is None or rec["key"] != key:
            continue  # the key sequence is compared as a whole by the caller
        problems += [f"sample {key}: {p}" for p in _sample_problems(parts, rec, decode[i])]
    return keys, problems, intact


def _sample_problems(parts: dict[str, bytes], rec: dict, decode: bool) -> list[str]:
    if sorted(parts) != ["cls", "json", "webp"]:
        return [f"members {sorted(parts)}"]
    problems = []
    if hashlib.sha256(parts["webp"]).hexdigest() != rec["webp_sha256"]:
        problems.append("webp bytes differ from the manifest")
    try:
        meta = json.loads(parts["json"])
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    except ValueError as e:  # includes UnicodeDecodeError
        problems.append(f".json does not parse ({e})")
        meta = {}
    if (meta.get("width"), meta.get("height")) != (rec["width"], rec["height"]):
        problems.append("json size differs from the manifest")
    if parts["cls"].decode("ascii", "replace") != str(meta.get("label")):
        problems.append(".cls and .json labels differ")
    if decode:
        problem = _webp_problem(parts["webp"], (rec["width"], rec["height"]), True)
        if problem:
            problems.append(problem)
    return problems


def check_committed(url: str, expected_samples: list[dict], tar_sha256: str, decoded_in_workers: bool,
                    decode_every: int = 16, workers: int = 1) -> list[str]:
    """Problems with the committed shard at `url`, re-read from storage: its bytes hash to
    `tar_sha256` (what was written), and it holds exactly `expected_samples` (manifest records, in
    order), each as .cls/.json/.webp with the recorded WebP sha256 and size and a .json/.cls that
    agree. Sampled WebPs (every `decode_every`-th position and every repaired one) are decoded here
    unless `decoded_in_workers` (the encode workers decoded the encoder's output, whose bytes the
    hashes tie to the file's).

    The read-back is split at sample starts (records' `offset`, when given) into chunks checked in
    the worker pool (workers > 1). When the records also give each sample's bytes (`sample_size`,
    `sample_sha256`: build_shard's), each chunk proves its samples' bytes are those written, so
    the file's sha256 is `tar_sha256` without this process hashing it again; otherwise this
    thread hashes the whole file while the chunks are checked.
    """
    from concurrent.futures import ThreadPoolExecutor

    def decode(rec: dict, i: int) -> bool:
        if decoded_in_workers:
            return False
        return bool(rec.get("repaired")) or (decode_every > 0 and rec.get("position", i) % decode_every == 0)

    flags = [decode(r, i) for i, r in enumerate(expected_samples)]
    cuts = [0]
    if expected_samples and all("offset" in r for r in expected_samples):
        # at least one chunk per worker, at most CHECK_CHUNK_BYTES each
        chunk = min(CHECK_CHUNK_BYTES, expected_samples[-1]["offset"] // max(workers, 1) + 1)
        at = 0
        for i, r in enumerate(expected_samples):
            if r["offset"] - at >= chunk:
                cuts.append(i)
                at = r["offset"]
    jobs = []
    for a, b in zip(cuts, [*cuts[1:], None]):
        start = expected_samples[a]["offset"] if a else 0
        end = expected_samples[b]["offset"] if b is not None else None
        jobs.append(CheckChunkJob(url, start, end, expected_samples[a:b], flags[a:b]))
    problems: list[str] = []
    spans = all("sample_sha256" in r and "offset" in r for r in expected_samples)
    try:
        with ThreadPoolExecutor(1) as hasher:
            digest_future = None if spans else hasher.submit(_file_sha256, url)
            if workers > 1:
                pool = shared_pool(workers)
                results = [f.result() for f in [pool.submit(j) for j in jobs]]
            else:
                results = [j.run() for j in jobs]
            intact = all(r[2] for r in results) if spans else digest_future.result() == tar_sha256
    except (OSError, WorkerDied) as e:
        return [f"cannot read back {fs.basename(url)}: {type(e).__name__}: {e}"]
    keys = [k for ks, _, _ in results for k in ks]
    for _, ps, _ in results:
        problems += ps
    if not intact:
        problems.append("tar sha256 differs from its manifest")
    want = [r["key"] for r in expected_samples]
    if keys != want:
        missing = sorted(set(want) - set(keys))[:5]
        extra = sorted(set(keys) - set(want))[:5]
        dups = len(keys) - len(set(keys))
        problems.append(
            f"holds {len(keys)} samples, plan wants {len(want)} "
            f"(missing {missing}, unplanned {extra}, duplicated {dups}, order {'ok' if not (missing or extra or dups) else '?'})"
        )
    return problems


def _file_sha256(url: str) -> str:
    sha = hashlib.sha256()
    with fs.open_read(url) as f:
        while block := f.read(8 << 20):
            sha.update(block)
    return sha.hexdigest()


# ----------------------------------------------------------------------------- freshness & checks


def shard_state(out_root: str, shard_key: str, shard_name: str, expected_fingerprint: str | None) -> str:
    """"fresh", "missing" or "stale" for one shard, from what sits in the out root."""
    state = read_state(out_root, shard_key)
    if state is None or not fs.exists(fs.join(out_root, shard_name)):
        return "missing"
    if expected_fingerprint is None or state.get("fingerprint") != expected_fingerprint:
        return "stale"
    try:
        return "fresh" if unchanged_on_storage(fs.join(out_root, shard_name), state) else "stale"
    except FileNotFoundError:  # gone since the look above
        return "missing"


def unchanged_on_storage(url: str, state: dict, size_stamp: tuple[int, str] | None = None) -> bool:
    """Whether the shard file at `url` is still the one its commit record describes: the same size
    and stamp (mtime, or ETag on S3) as when it was committed. An edit in place changes the stamp;
    so does a copy that does not keep times (`cp` without -p): such a shard is built again rather
    than hashed on every look (1024 x 140 MB). `size_stamp`: from a listing."""
    size, stamp = size_stamp or fs.stat(url)
    return size == state.get("bytes") and state.get("stamp", stamp) == stamp  # no stamp: older records


def iter_samples(url: str, digest: list[str] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a shard, grouped the way webdataset groups them.
    `digest`: a list to which the whole file's sha256 is appended once every sample was read."""
    with fs.open_read(url) as raw:
        f = fs.HashingReader(raw) if digest is not None else raw
        with tarfile.open(fileobj=f, mode="r|") as tar:
            key, parts = None, {}
            for info in tar:
                stem, _, ext = info.name.partition(".")
                data = tar.extractfile(info).read() if info.isreg() else b""
                if stem != key and key is not None:
                    yield key, parts
                    parts = {}
                key = stem
                parts[ext] = data
            if key is not None:
                yield key, parts
        if digest is not None:
            digest.append(f.hexdigest())


def verify_shard(out_root: str, shard_key: str, shard_name: str, decode_every: int = 1) -> list[str]:
    """Problems with a committed shard, checked against its plan slice and its manifest.

    Every planned key is either in the tar (in plan order) or recorded as excluded; nothing else
    is in the tar; every sample's three members are consistent; every WebP holds the bytes the
    encoder produced (its sha256 in the manifest) and its header and frame give the recorded size.
    Pixels are decoded in full for every `decode_every`-th sample (1: all of them, 0: none) and for
    every repaired one: a full WebP decode costs about a fifth of the encode, so decoding all of
    them would add that to every shard run, while the hashes already tie each sample's bytes to
    the encoder's output.
    """
    problems: list[str] = []
    manifest = read_manifest(out_root, shard_key)
    if manifest is None:
        return [f"shard {shard_key}: no manifest"]
    rows, digest = read_slice(out_root, shard_key)
    if manifest.get("plan_digest") != digest:
        problems.append(f"shard {shard_key}: written from another plan ({manifest.get('plan_digest')[:12]})")
    excluded = {e["key"] for e in manifest["excluded"]}
    expected = [r for r in rows if r.key not in excluded]
    by_key = {s["key"]: s for s in manifest["samples"]}
    url = fs.join(out_root, shard_name)
    seen = []
    tar_digest: list[str] = []
    try:
        for i, (key, parts) in enumerate(iter_samples(url, tar_digest)):
            seen.append(key)
            if sorted(parts) != ["cls", "json", "webp"]:
                problems.append(f"shard {shard_key} sample {key}: members {sorted(parts)}")
                continue
            rec = by_key.get(key)
            if rec is None:
                problems.append(f"shard {shard_key} sample {key}: not in the manifest")
                continue
            if hashlib.sha256(parts["webp"]).hexdigest() != rec["webp_sha256"]:
                problems.append(f"shard {shard_key} sample {key}: webp bytes differ from the manifest")
            try:
                meta = json.loads(parts["json"])
                if not isinstance(meta, dict):
                    raise ValueError(f"a JSON {type(meta).__name__}, not an object")
            except ValueError as e:  # includes UnicodeDecodeError
                problems.append(f"shard {shard_key} sample {key}: .json does not parse ({e})")
                meta = {}
            if (meta.get("width"), meta.get("height")) != (rec["width"], rec["height"]):
                problems.append(f"shard {shard_key} sample {key}: json size differs from the manifest")
            if parts["cls"].decode("ascii", "replace") != str(meta.get("label")):
                problems.append(f"shard {shard_key} sample {key}: .cls and .json labels differ")
            try:
                with Image.open(io.BytesIO(parts["webp"])) as im:
                    if im.format != "WEBP" or im.size != (rec["width"], rec["height"]):
                        problems.append(f"shard {shard_key} sample {key}: webp is {im.format} {im.size}")
                    if rec.get("repaired") or (decode_every > 0 and i % decode_every == 0):
                        im.load()
            except Exception as e:  # noqa: BLE001
                problems.append(f"shard {shard_key} sample {key}: webp does not decode: {e}")
    except (tarfile.TarError, EOFError) as e:
        problems.append(f"shard {shard_key}: tar unreadable after {len(seen)} samples: {e}")
    if tar_digest != [manifest["sha256"]]:
        problems.append(f"shard {shard_key}: tar sha256 differs from its manifest")
    if seen != [r.key for r in expected]:
        missing = sorted(set(r.key for r in expected) - set(seen))[:5]
        extra = sorted(set(seen) - set(r.key for r in expected))[:5]
        dups = len(seen) - len(set(seen))
        problems.append(
            f"shard {shard_key}: holds {len(seen)} samples, plan wants {len(expected)} "
            f"(missing {missing}, unplanned {extra}, duplicated {dups}, order {'ok' if not (missing or extra or dups) else '?'})"
        )
    return problems
