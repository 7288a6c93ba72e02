"""One shard: read its plan slice, range-read each source from its raw tar, encode in parallel,
write the WebDataset tar in plan order, and commit it and its manifest atomically.

The tar layout lives only here: each sample is `<key>.cls`, `<key>.json`, `<key>.webp`, in that
(sorted) order, with fixed member metadata so that the same input gives the same bytes.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from . import fs
from .encode import EncodeSettings, ImageRejected, encode_image
from .plan import SliceRow, read_slice
from .procpool import bounded_map, process_pool

# Bump when the bytes a shard holds for the same input would change (encoding rules, tar layout,
# JSON fields). Part of every shard's fingerprint, so a bump makes every shard stale.
ENCODER_VERSION = "2"  # 2: JPEG data that runs out before EOI is repaired or rejected; progressive memory cap
MANIFEST_DIR = "_manifests"
READ_THREADS = 8
ENCODE_WINDOW = 8  # tasks in flight per encode worker


def fingerprint(plan_digest: str, settings: EncodeSettings) -> str:
    """What a shard's bytes depend on: its plan slice, the encoder version and the settings."""
    text = json.dumps(
        {"plan": plan_digest, "encoder": ENCODER_VERSION, "settings": asdict(settings)}, sort_keys=True
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

    @property
    def images_per_second(self) -> float:
        return self.num_samples / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------- encoding


def _encode_one(data: bytes | None, settings: EncodeSettings):
    """Never raises: ("ok", Encoded) or ("excluded", reason). Runs in worker processes."""
    if data is None:
        return "excluded", "source unreadable"
    try:
        return "ok", encode_image(data, settings)
    except ImageRejected as e:
        return "excluded", e.reason
    except MemoryError:
        return "excluded", "out of memory while decoding"
    except Exception as e:  # noqa: BLE001 - one bad image never crashes the shard
        return "excluded", f"encoder error: {type(e).__name__}: {e}"


class SourceUnreadable(OSError):
    """A raw tar could not be read at all (gone, no permission, an I/O or network error that
    outlasted the retries). Not a property of the image: the shard run fails, naming the tar, and
    commits nothing, so that a rerun builds the shard whole once the storage answers again."""


READ_RETRY_SECONDS = (0.5, 2.0)  # waits before the second and third attempt of a failed read


def _read_source(row: SliceRow, raw_root: str, reader: fs.RangeReader) -> tuple[SliceRow, bytes | None, str]:
    """The row's source bytes, or None and why they are not the indexed ones (the tar is shorter
    than indexed, or its bytes changed there: recorded as an exclusion)."""
    url = fs.join(raw_root, row.tar)
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
        return row, None, f"raw tar {row.tar} is shorter than indexed: {len(data)} of {row.size} bytes at {row.offset}"
    if hashlib.sha256(data).hexdigest() != row.sha256:
        return row, None, f"source bytes changed since indexing ({row.tar}@{row.offset}: sha256 differs)"
    return row, data, ""


def encoded_stream(rows: list[SliceRow], raw_root: str, settings: EncodeSettings, workers: int) -> Iterator:
    """(row, "ok", Encoded) or (row, "excluded", reason) per row, in plan order.

    Reads run in threads ahead of the encoders; encoders run in `workers` processes (in this
    process when workers == 1). At most a few dozen sources are in memory at once.
    """
    with fs.RangeReader() as reader, ThreadPoolExecutor(READ_THREADS) as readers:
        try:
            yield from _encode_sources(rows, raw_root, settings, workers, reader, readers)
        except BaseException:  # a tar that cannot be read, or the consumer stopped: read no further
            readers.shutdown(wait=False, cancel_futures=True)
            raise


def _encode_sources(rows: list[SliceRow], raw_root: str, settings: EncodeSettings, workers: int,
                    reader: fs.RangeReader, readers: ThreadPoolExecutor) -> Iterator:
    sources = bounded_map(readers, _read_source, rows, READ_THREADS * 4, raw_root, reader)
    if workers <= 1:
        for row, data, problem in sources:
            if data is None:
                yield row, "excluded", problem
            else:
                yield (row, *_encode_one(data, settings))
        return
    # Workers exit with this process and start from a forkserver holding Dagster and Pillow.
    with process_pool(workers) as pool:
        # Results are taken in plan order: a deep window keeps every worker busy while the
        # oldest task is a large image (a 3000 px source costs ~10 ordinary ones).
        window: collections.deque = collections.deque()
        for row, data, problem in sources:
            window.append((row, problem, pool.submit(_encode_one, data, settings) if data is not None else None))
            if len(window) >= workers * ENCODE_WINDOW:
                yield _finish(*window.popleft())
        while window:
            yield _finish(*window.popleft())


def _finish(row: SliceRow, problem: str, future):
    if future is None:
        return row, "excluded", problem
    return (row, *future.result())


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


def sample_members(row: SliceRow, enc) -> list[tuple[str, bytes]]:
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
    }
    return [
        (f"{row.key}.cls", str(row.label).encode("ascii")),
        (f"{row.key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")),
        (f"{row.key}.webp", enc.webp),
    ]


class _HashingWriter(io.RawIOBase):
    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.count

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
) -> ShardResult:
    """Encode and commit one shard and its manifest. Bad images become recorded exclusions."""
    started = time.perf_counter()
    final = fs.join(out_root, shard_name)
    mf_url = manifest_url(out_root, shard_key)
    st_url = state_url(out_root, shard_key)
    for leftover in fs.remove_partials(final) + fs.remove_partials(mf_url) + fs.remove_partials(st_url):
        log(f"removed leftover of an interrupted run: {leftover}")
    rows, plan_digest = read_slice(out_root, shard_key)
    samples: list[dict] = []
    excluded: list[dict] = []
    with fs.atomic_open(final) as raw_out:
        out = _HashingWriter(raw_out)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for row, status, value in encoded_stream(rows, raw_root, settings, workers):
                if status != "ok":
                    excluded.append({"key": row.key, "position": row.position, "reason": value})
                    log(f"excluded {row.key} ({row.tar}@{row.offset}): {value}")
                    continue
                for name, payload in sample_members(row, value):
                    tar.addfile(_tarinfo(name, len(payload)), io.BytesIO(payload))
                samples.append(
                    {
                        "key": row.key, "position": row.position, "width": value.width,
                        "height": value.height, "orig_width": value.orig_width,
                        "orig_height": value.orig_height, "webp_bytes": len(value.webp),
                        "webp_sha256": hashlib.sha256(value.webp).hexdigest(), "repaired": value.repaired,
                    }
                )
    seconds = time.perf_counter() - started
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
        "seconds": round(seconds, 3),
        "samples": samples,
        "excluded": excluded,
    }
    fs.write_atomic(mf_url, json.dumps(manifest, separators=(",", ":")).encode())
    state = {k: manifest[k] for k in ("shard", "path", "fingerprint", "bytes", "sha256", "num_samples", "run_id")}
    state["stamp"] = fs.stat(final)[1]  # an edit in place on storage changes it (shard_state)
    fs.write_atomic(state_url(out_root, shard_key), json.dumps(state, sort_keys=True).encode())
    return ShardResult(
        shard_key, final, len(rows), len(samples), out.count, manifest["sha256"], seconds,
        sum(1 for s in samples if s["repaired"]), excluded,
    )


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
    """(key, {ext: bytes}) per sample of a shard: see `verify.iter_samples` (kept here for callers)."""
    from .verify import iter_samples as samples

    return samples(url, digest)


def verify_shard(out_root: str, shard_key: str, shard_name: str, decode_every: int = 1) -> list[str]:
    """The in-run blocking check of one committed shard: see `verify.check_committed_shard`."""
    from .verify import check_committed_shard

    return check_committed_shard(out_root, shard_key, shard_name, decode_every=decode_every)
