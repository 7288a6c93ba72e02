"""Verification of shard files: the one place that says what a correct shard is.

Two callers feed it the samples a shard must hold, in order:
- the in-run blocking check of `wds_shards`, run by `shard.build_shard` (`check_committed`: the
  committed file read back in chunks in the worker pool) against the samples it just wrote with
  their plan rows;
- `imnet verify` (`verify_catalog_shard`): the catalog's `shard_samples` rows of that shard,
  streamed shard by shard (`sql/verify_samples.sql`) and checked in worker processes.

Both go through the same two layers:
- `check_sample`: the per-sample rules (members `cls`, `json`, `webp` in that order, `jpg` instead of
  `webp` in a JPEG release; the image's size and sha256 are the recorded ones (the catalog's
  `webp_bytes` / `webp_sha256` hold the stored image's, whatever the codec); its header says
  WebP (JPEG) of the recorded width and height;
  `.cls` is the label; the `.json` fields are the expected ones; a full pixel decode for the
  samples chosen to be decoded);
- `read_back`: one sequential read of the tar file (its sha256 and size taken from the same read,
  tar damage recorded and read past, never raised), grouping members into samples the way
  webdataset does, applying `check_sample` to each, and comparing the sequence of keys with the
  expected one (linear time: sets and a counter, never a scan per key).

Which samples are decoded: every repaired one, every `decode_every`-th (by its index in the tar),
or all of them (`decode_every=1`), except those whose image was already decoded where it was
encoded (`decoded`: the keys a shard run's workers decoded; their bytes are tied to the decoded
ones by the sha256 checked here).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from imnet_assets.image.jpeg_output import jpeg_problem
from imnet_assets.image.webp_output import webp_problem
from imnet_assets.release.outroot import sample_digest, tar_end
from imnet_assets.runtime.workerpool import WorkerDied, shared_pool
from imnet_assets.storage import fs, prefetch
from imnet_assets.storage.rawtar import Damage, iter_tar, plain_member_spans

READ_AHEAD = 8  # ranged requests of 4 MB kept in flight ahead of a remote shard's read-back
MEMBERS = ["cls", "json", "webp"]  # a sample's members, in the order sample_tar.sample_members writes them
# (the last is the stored image's extension: "jpg" in a JPEG release, encode.CODEC_EXTENSIONS)
SHOWN = 5  # keys named per kind of order mismatch


@dataclass(frozen=True)
class ExpectedSample:
    """What one sample of a shard must be. A field that is None was not recorded (a planned key
    that the manifest lacks): the sample is reported, not compared against None."""

    key: str
    label: int | None
    wnid: str | None
    webp_sha256: str | None
    webp_bytes: int | None
    width: int | None
    height: int | None
    orig_width: int | None = None
    orig_height: int | None = None
    source_sha256: str | None = None
    repaired: bool = False
    ext: str = "webp"  # the stored image's member extension (encode.CODEC_EXTENSIONS)

    def json_fields(self) -> dict:
        """The `.json` fields this sample must carry (`source_sha256` only where the file has it:
        shards written before it existed are still correct)."""
        return {
            "filename": f"{self.wnid}/{self.key}.JPEG", "label": self.label, "class_name": self.wnid,
            "width": self.width, "height": self.height,
            "orig_width": self.orig_width, "orig_height": self.orig_height,
        }


# The columns of `sql/verify_samples.sql`, in order: a catalog row is an ExpectedSample.
CATALOG_COLUMNS = ("key", "label", "wnid", "webp_sha256", "webp_bytes", "width", "height",
                   "orig_width", "orig_height", "source_sha256", "repaired")


def expected_from_catalog(rows: Iterable[tuple], ext: str = "webp") -> list[ExpectedSample]:
    """`sql/verify_samples.sql` rows (CATALOG_COLUMNS order) -> the samples a shard must hold."""
    return [ExpectedSample(*row[:-1], repaired=bool(row[-1]), ext=ext) for row in rows]


# ----------------------------------------------------------------------------- per sample


def stored_image_problem(ext: str, data: bytes, size: tuple[int, int], decode: bool) -> str:
    """`webp_problem` or `jpeg_problem`, by the sample's image extension."""
    if ext == "jpg":
        return jpeg_problem(data, size, decode)
    return webp_problem(data, size, decode)


def check_sample(key: str, parts: list[tuple[str, bytes]], exp: ExpectedSample, *, decode: bool,
                 record: str, hashed: bool = False) -> list[str]:
    """Problems of one sample (its members as read, in order) against what it must be.
    `record`: where the expected values were recorded ("manifest", "catalog"), for the messages.
    `hashed`: the image's sha256 is known to be the recorded one (the in-run check's digest took
    it, of these very bytes): not hashed again."""

    if exp.webp_sha256 is None:
        return [f"sample {key}: not in the {record}"]
    problems: list[str] = []
    exts = [e for e, _ in parts]
    members = [*MEMBERS[:-1], exp.ext]
    if exts != members:
        problems.append(f"sample {key}: members {exts}, expected {members}")
    payload = dict(parts)
    image = payload.get(exp.ext)
    if image is not None:
        if len(image) != exp.webp_bytes or (
                not hashed and hashlib.sha256(image).hexdigest() != exp.webp_sha256):
            problems.append(f"sample {key}: {exp.ext} payload ({len(image)} bytes) sha256 differs from the {record}")
        problem = stored_image_problem(exp.ext, image, (exp.width, exp.height), decode)
        if problem:
            problems.append(f"sample {key}: {problem} (the {record} says {exp.width}x{exp.height})")
    if "cls" in payload and payload["cls"] != str(exp.label).encode("ascii"):
        problems.append(f"sample {key}: .cls {payload['cls'][:20]!r} != label {exp.label}")
    if "json" in payload:
        try:
            meta = json.loads(payload["json"])
            if not isinstance(meta, dict):
                raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        except ValueError as e:  # includes UnicodeDecodeError
            problems.append(f"sample {key}: .json does not parse ({e})")
        else:
            fields = exp.json_fields()
            if "source_sha256" in meta:
                fields["source_sha256"] = exp.source_sha256
            wrong = sorted(k for k, v in fields.items() if meta.get(k) != v)
            if wrong:
                problems.append(f"sample {key}: .json fields {wrong} differ from the {record}")
    return problems


# ----------------------------------------------------------------------------- one tar


def iter_samples(url: str, digest: list[str] | None = None,
                 damage: list[Damage] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a shard, grouped the way webdataset groups them (key =
    the member name up to its first dot; consecutive members with one key form a sample).
    `digest`: a list to which the whole file's sha256 is appended once every sample was read.
    `damage`: a list collecting tar damage (else the first damage raises ValueError)."""
    for key, parts, bad in _grouped(url, digest):
        if bad is not None:
            if damage is None:
                raise ValueError(f"{url}: tar damaged at byte {bad.offset}: {bad.reason}")
            damage.append(bad)
            continue
        yield key, dict(parts)


def _grouped(url: str, digest: list[str] | None):
    """(key, [(ext, bytes), ...], None) per sample, or (None, None, Damage) where the tar is
    damaged (the walk goes on after it when a later header is readable)."""
    key, parts = None, []
    # A remote shard is read READ_AHEAD requests ahead (one stream at a time would wait 20-50 ms
    # per 8 MB block: ~100 MB/s, a quarter of what one core hashes and parses).
    for item in iter_tar(url, what="shard", digest=digest, depth=READ_AHEAD):
        if isinstance(item, Damage):
            if key is not None:
                yield key, parts, None
                key, parts = None, []
            yield None, None, item
            continue
        stem, _, ext = item.name.partition(".")
        if stem != key and key is not None:
            yield key, parts, None
            parts = []
        key = stem
        parts.append((ext, bytes(item.data)))
    if key is not None:
        yield key, parts, None


def read_back(url: str, expected: list[ExpectedSample], *, record: str, source: str,
              tar_sha256: str | None = None, tar_bytes: int | None = None, decode_every: int = 0,
              decoded: Iterable[str] = ()) -> list[str]:
    """Problems of the shard file at `url` against the samples it must hold, in order (empty when
    it holds exactly them). One sequential read: the tar's sha256 and size come from it too.

    `record`: where the per-sample values were recorded ("manifest", "catalog"); `source`: where
    the list of samples came from ("plan", "catalog"); both only word the messages.
    `tar_sha256`, `tar_bytes`: the whole file's expected digest and size, when known.
    `decode_every`: decode the pixels of every n-th sample (by index in the tar; 1: all, 0: none);
    repaired samples are always decoded; `decoded`: keys already decoded elsewhere (skipped)."""
    by_key = {e.key: e for e in expected}
    already = set(decoded)
    got: list[str] = []
    problems: list[str] = []
    damage: list[tuple[Damage, int]] = []  # with the number of samples read before it
    digest: list[str] = []
    for key, parts, bad in _grouped(url, digest):
        if bad is not None:
            damage.append((bad, len(got)))
            continue
        index = len(got)
        got.append(key)
        exp = by_key.get(key)
        if exp is None:
            problems.append(f"sample {key}: in the tar but not in the {source} for this shard")
            continue
        decode = key not in already and (exp.repaired or (decode_every > 0 and index % decode_every == 0))
        problems += check_sample(key, parts, exp, decode=decode, record=record)

    head: list[str] = []
    size = fs.size(url)
    sha_differs = tar_sha256 is not None and digest != [tar_sha256]
    if tar_bytes is not None and size != tar_bytes:
        head.append(f"{size} bytes, the {record} says {tar_bytes}")
    if sha_differs:
        got_sha = digest[0][:16] if digest else "(not read)"
        head.append(f"tar sha256 differs from the {record}: tar sha256 {got_sha} != {record} {tar_sha256[:16]}")
    for bad, before in damage:
        where = f"after sample {got[before - 1]}" if before else "before the first sample"
        text = f"tar structure damaged at byte {bad.offset} ({where}): {bad.reason}"
        if before == len(got):  # nothing readable after it
            text = f"tar unreadable after {before} samples: {text}"
        head.append(text)
    order = order_problem(got, [e.key for e in expected], source)
    if order:
        problems.append(order)
    if sha_differs and not damage and not problems:
        problems.append("every sample's payload matches: the difference is in tar headers or padding")
    return head + problems


def order_problem(got: list[str], expected: list[str], source: str) -> str | None:
    """What is wrong with the sequence of keys read, against the expected one (None when equal).
    Linear in the number of samples."""
    if got == expected:
        return None
    got_set, want_set = set(got), set(expected)
    missing = [k for k in expected if k not in got_set]
    extra = [k for k in got if k not in want_set]
    dups = sorted(k for k, n in Counter(got).items() if n > 1)
    detail = f"holds {len(got)} samples, {source} wants {len(expected)}"
    if missing:
        detail += f"; missing {missing[:SHOWN]}" + (f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else "")
    if extra:
        detail += f"; not planned {extra[:SHOWN]}" + (" ..." if len(extra) > SHOWN else "")
    if dups:
        detail += f"; duplicated {dups[:SHOWN]}" + (" ..." if len(dups) > SHOWN else "")
    if not (missing or extra or dups):
        detail += "; the same samples in another order"
    return detail


# ----------------------------------------------------------------------------- the in-run check


# ----------------------------------------------------------------------------- the in-run read-back
# What build_shard runs once the shard is committed: the same per-sample rules (`check_sample`),
# over chunks of the file read back in the worker pool, each proving its samples' bytes are the
# bytes the workers built (their sha256), so the coordinator never hashes the file again.

CHECK_CHUNK_BYTES = 16 << 20  # the read-back is split at sample boundaries into chunks about this size
CHECK_RETRIES = 3  # deaths of the worker checking one chunk (a kill, a time-out) before the check fails


@dataclass
class CheckChunkJob:
    """Bytes [start, end) of a committed shard, which begin at a sample, checked against the
    manifest records of the samples there (runs in the worker pool, or in this process)."""

    url: str
    start: int
    end: int | None  # None: to the end of the file (the last chunk, which holds the tar's end)
    expected: list[dict]
    decode: list[bool]
    time_limit: float | None = None  # seconds (IMNET_IMAGE_TIMEOUT): the pool kills a worker past it
    ext: str = "webp"  # the stored image's member extension

    def prefetch(self, readers):
        return None

    def run(self, _state=None, mark=None) -> tuple[list[str], list[str], bool]:
        if mark is not None:
            mark(0)  # the whole chunk is one item for the pool's time limit
        # A fresh open, never the raw tars' reader: it keeps files open, and a rebuilt shard is
        # another file under the same name.
        with prefetch.open_read(self.url) as f:
            f.seek(self.start)
            data = f.read() if self.end is None else f.read(self.end - self.start)
        return _check_bytes(data, self.start, self.end is None, self.expected, self.decode, self.ext)


def _intact_images(data: bytes, start: int, last: bool, expected: list[dict]) -> list[int] | None:
    """When every sample's bytes, re-read, have the digest written for them at its offset
    (`sample_digest`), and (for the last chunk) the tar's end follows them exactly, so that the file
    is byte for byte what was written: where each sample's stored image lies in `data` (its sha256,
    taken here, is in the digest: the manifest's). None otherwise."""
    view = memoryview(data)
    images = []
    for rec in expected:
        a = rec["offset"] - start
        span, n = view[a:a + rec["sample_size"]], rec["webp_bytes"]
        at = len(span) - n - (-n % tarfile.BLOCKSIZE)
        if at < 0 or sample_digest(span, hashlib.sha256(span[at:at + n]).digest(), n) != rec["sample_digest"]:
            return None
        images.append(a + at)
    if last:
        end = (expected[-1]["offset"] + expected[-1]["sample_size"]) if expected else start
        if data[end - start:] != tar_end(end):
            return None
    return images


def _check_bytes(data: bytes, start: int, last: bool, expected: list[dict],
                 decode: list[bool], ext: str = "webp") -> tuple[list[str], list[str], bool | None]:
    """(keys of the samples found in order, problems, whether the written bytes are intact (None:
    not known, no spans recorded)) for tar bytes starting at a sample, at byte `start` of the file."""
    keys: list[str] = []
    problems: list[str] = []
    intact, images = None, None
    if all("sample_digest" in r for r in expected) and (expected or last):
        images = _intact_images(data, start, last, expected)
        intact = images is not None
    # per sample: its key and its members (extension, payload, where the payload lies in `data`)
    groups: list[tuple[str, list[tuple[str, bytes, int | None]]]] = []

    def add(name: str, payload, at: int | None) -> None:
        stem, _, ext = name.partition(".")
        if not groups or groups[-1][0] != stem:
            groups.append((stem, []))
        groups[-1][1].append((ext, payload, at))

    view = memoryview(data)
    plain = plain_member_spans(view)  # plain headers only (what build_shard writes), read as tarfile reads them
    if plain is not None:
        for name, at, size in plain:
            add(name, view[at:at + size], at)
    else:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for info in tar:
                    add(info.name, tar.extractfile(info).read() if info.isreg() else b"", None)
        except (tarfile.TarError, EOFError) as e:
            problems.append(f"tar unreadable after {len(groups)} samples of this part: {e}")
    for i, (key, members) in enumerate(groups):
        keys.append(key)
        rec = expected[i] if i < len(expected) else None
        if rec is None or rec["key"] != key:
            continue  # the key sequence is compared as a whole by the caller
        # The image whose bytes the digest hashed (same place in the same bytes) is not hashed again
        # and, a WebP, is read where it lies; everything else as bytes.
        hashed = images is not None and any(e == ext and at == images[i] for e, _, at in members)
        parts = [(e, payload if (hashed and e == ext == "webp") else bytes(payload)) for e, payload, _ in members]
        problems += check_sample(key, parts, _expected(rec, ext), decode=decode[i], record="manifest", hashed=hashed)
    return keys, problems, intact


def _expected(rec: dict, ext: str = "webp") -> ExpectedSample:
    """A build_shard record (manifest sample + plan row fields) as the sample it must be."""
    return ExpectedSample(
        key=rec["key"], label=rec.get("label"), wnid=rec.get("wnid"), webp_sha256=rec.get("webp_sha256"),
        webp_bytes=rec.get("webp_bytes"), width=rec.get("width"), height=rec.get("height"),
        orig_width=rec.get("orig_width"), orig_height=rec.get("orig_height"),
        source_sha256=rec.get("source_sha256"), repaired=bool(rec.get("repaired")), ext=ext)


class ReadBackFailed(RuntimeError):
    """The committed shard could not be read back to check it (a local read error, the file gone, the
    checking workers killed past CHECK_RETRIES): a fault of the machinery, never a failed check
    against the shard (SPEC "Failure behaviour"). The run fails naming it; nothing is committed."""


def check_committed(url: str, expected_samples: list[dict], tar_sha256: str, decoded_in_workers: bool,
                    decode_every: int = 16, workers: int = 1, priority: int = 0, ext: str = "webp") -> list[str]:
    """Problems with the committed shard at `url`, re-read from storage: its bytes hash to
    `tar_sha256` (what was written), and it holds exactly `expected_samples` (manifest records, in
    order), each as .cls/.json/.webp (.jpg: `ext`) with the recorded image sha256 and size and a
    .json/.cls that agree. Sampled images (every `decode_every`-th position and every repaired one) are decoded here
    unless `decoded_in_workers` (the encode workers decoded the encoder's output, whose bytes the
    hashes tie to the file's).

    The read-back is split at sample starts (records' `offset`, when given) into chunks checked in
    the worker pool (workers > 1). When the records also give each sample's bytes (`sample_size`,
    `sample_digest`: build_shard's), each chunk proves its samples' bytes are those written, so
    the file's sha256 is `tar_sha256` without this process hashing it again; otherwise this
    thread hashes the whole file while the chunks are checked.

    A read the storage does not give back exact within its retries (a fault of the machinery, not
    of the shard) is raised (StorageError naming the file), never returned as a problem: the run
    fails, with no failed check recorded against a shard that may well be whole. So is a local read
    error, the file gone, or the checking workers killed past CHECK_RETRIES (ReadBackFailed).
    """
    from concurrent.futures import ThreadPoolExecutor

    from imnet_assets.settings import image_timeout

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
    limit = image_timeout()
    for a, b in zip(cuts, [*cuts[1:], None]):
        start = expected_samples[a]["offset"] if a else 0
        end = expected_samples[b]["offset"] if b is not None else None
        jobs.append(CheckChunkJob(url, start, end, expected_samples[a:b], flags[a:b], limit, ext))
    problems: list[str] = []
    spans = all("sample_digest" in r and "offset" in r for r in expected_samples)
    try:
        with ThreadPoolExecutor(1) as hasher:
            digest_future = None if spans else hasher.submit(_file_sha256, url)
            if workers > 1:
                results = _run_in_pool(shared_pool(workers), jobs, priority)
            else:
                results = [j.run() for j in jobs]
            intact = all(r[2] for r in results) if spans else digest_future.result() == tar_sha256
    except fs.StorageError as e:  # the storage did not give the bytes back: a fault, never a verdict on the shard
        raise fs.StorageError(fs.redact(f"cannot read back {url} to check it: {e}; the shard is not recorded as "
                                        "committed: `imnet build` builds it again")) from None  # e said in full
    except (OSError, WorkerDied) as e:  # a read error, checkers killed again and again: no verdict either
        raise ReadBackFailed(f"cannot read back {fs.redact(url)} to check it: {type(e).__name__}: {e}; the shard is "
                             "not recorded as committed: `imnet build` builds it again") from None
    keys = [k for ks, _, _ in results for k in ks]
    for _, ps, _ in results:
        problems += ps
    if not intact:
        problems.append("tar sha256 differs from its manifest")
    order = order_problem(keys, [r["key"] for r in expected_samples], "plan")
    if order:
        problems.append(order)
    return problems


def _run_in_pool(pool, jobs: list[CheckChunkJob], priority: int) -> list:
    """The jobs' results, in order; a job whose worker died (killed from outside, past its time
    limit) is run again in a fresh one, up to CHECK_RETRIES times, then WorkerDied is raised."""
    futures = [pool.submit(j, priority) for j in jobs]
    results = []
    for job, future in zip(jobs, futures):
        for tries in range(CHECK_RETRIES + 1):
            try:
                results.append(future.result())
                break
            except WorkerDied:
                if tries == CHECK_RETRIES:
                    raise
                future = pool.submit(job, priority)
    return results


def _file_sha256(url: str) -> str:
    sha = hashlib.sha256()
    with prefetch.open_read(url) as f:
        while block := f.read(8 << 20):
            sha.update(block)
    return sha.hexdigest()


# ----------------------------------------------------------------------------- imnet verify


def verify_catalog_shard(url: str, shard: dict, rows: list[tuple], decode: bool, ext: str = "webp") -> list[str]:
    """`imnet verify` of one shard (runs in a worker process): the file at `url` against its
    catalog record `shard` (bytes, sha256) and its `shard_samples` rows (CATALOG_COLUMNS order),
    each sample's image a `.<ext>` member. A missing file, or bytes that do not parse, is a problem.
    Storage that does not give its bytes within the retries raises StorageError, and a local read
    error (EIO, EACCES, the file gone while read) ReadBackFailed: no verdict on the shard either way
    (verify_runs reports it not checked and keeps its commit record; SPEC "Failure behaviour")."""
    try:
        if not fs.exists(url):
            return ["missing from the out root"]
        return read_back(url, expected_from_catalog(rows, ext), record="catalog", source="catalog",
                         tar_sha256=shard["sha256"], tar_bytes=shard["bytes"], decode_every=1 if decode else 0)
    except fs.StorageError:
        raise
    except (IsADirectoryError, NotADirectoryError) as e:  # the out root holds no file there: what it holds is wrong
        return [f"not a file: {type(e).__name__}: {fs.redact(str(e))}"]
    except OSError as e:  # the machinery's read, not the bytes (decoders' errors are problems in check_sample)
        raise ReadBackFailed(f"cannot read {fs.redact(url)}: {type(e).__name__}: {fs.redact(str(e))}") from None
    except Exception as e:  # noqa: BLE001 - an unreadable shard is a failure, not a crash
        return [f"unreadable: {type(e).__name__}: {fs.redact(str(e))}"]
