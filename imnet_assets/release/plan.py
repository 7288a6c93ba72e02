"""The shuffled plan: which kept image goes to which shard, at which position.

The shuffle itself is SQL (`sql/plan_build.sql`: order by md5 of seed and key, a keyed hash that
gives the same permutation on every machine and DuckDB version). This module holds the
arithmetic of balanced shards and the per-shard slice files that shard runs read, so that a
shard run never opens the catalog.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from imnet_assets.storage import atomic, fs

PLAN_VERSION = "1"
PLAN_DIR = "_plan"
PLAN_INDEX = "_index.json"
SLICE_BATCH = 128  # shards rendered per query by publish_slices (~2.3 MB of text each at full size)
SLICE_WRITERS = 32  # slice files committed at once by publish_slices (each is a few requests on S3)
SLICE_COLUMNS = ["position", "key", "wnid", "label", "tar", "member", "offset", "size", "sha256",
                 "width", "height", "needs_repair"]
# A slice row is its position, key, wnid, label, source tar, member, offset, size, sha256, width,
# height and needs_repair: ~150 bytes at the real size (13k rows, ~2 MB a slice). The index says each
# slice's bytes (`slice_bytes`): a slice of another length is not the plan's, and is read no further.
# An index written before it said them: SLICE_ROW_MAX_BYTES a planned row (its shard_lengths),
# SLICE_BASE_BYTES for the header (a member's name may be longer: a pax or GNU long name holds up to
# rawtar.MAX_HEADER_DATA, so a slice of a few rows over this is made again, then read by its bytes);
# SLICE_MAX_BYTES where the index says neither.
SLICE_ROW_MAX_BYTES = 8192
SLICE_BASE_BYTES = 64 << 10
SLICE_MAX_BYTES = 1 << 28
# The index holds per shard its slice's digest (~80 bytes as written), its length and its key in its
# split (~20 bytes), besides a head of a few hundred bytes: INDEX_SHARD_MAX_BYTES a shard, for the
# most shards keys of four digits allow (split_shards), and INDEX_BASE_BYTES: ~11 MiB. A larger
# index is damaged (made again), never read whole.
INDEX_SHARD_MAX_BYTES = 1024
INDEX_BASE_BYTES = 1 << 20
MAX_SHARDS = 10_000


def shard_sizes(n: int, s: int) -> list[int]:
    """The first n mod s shards hold ceil(n/s) samples, the rest floor(n/s)."""
    q, r = divmod(n, s)
    return [q + 1 if i < r else q for i in range(s)]


def shard_of(g: int, n: int, s: int) -> tuple[int, int]:
    """(shard, position) of the g-th image in shuffled order (same arithmetic as plan_build.sql)."""
    q, r = divmod(n, s)
    big = r * (q + 1)
    if g < big:
        return divmod(g, q + 1)
    shard, pos = divmod(g - big, q)
    return r + shard, pos


VALIDATION = "validation"  # the split of a release's val_per_class images (issue 25)


def split_shards(num_shards: int, holdout: tuple[tuple[str, int], ...],
                 validation_shards: int = 0) -> dict[str, list[int]]:
    """Shard indices per split: holdout splits take the last of the num_shards shards, in the order
    given; a release's validation split (val_per_class) the `validation_shards` after them."""
    out: dict[str, list[int]] = {}
    end = num_shards
    for name, count in reversed(holdout):
        out[name] = list(range(end - count, end))
        end -= count
    splits = {"train": list(range(end)), **dict(reversed(list(out.items())))}
    if validation_shards:
        if num_shards + validation_shards > 10_000:  # keys are 4 digits: SQL compares them as text
            raise ValueError(f"{num_shards} train and {validation_shards} validation shards: at most 10,000 in all")
        if VALIDATION in splits:
            raise ValueError(f"a holdout split is named {VALIDATION!r}, the split of val_per_class: rename it")
        splits[VALIDATION] = list(range(num_shards, num_shards + validation_shards))
    return splits


def release_splits(settings) -> dict[str, list[str]]:
    """Partition keys per split of a release's settings (train, holdout splits, validation)."""
    keys = settings.partition_keys
    return {name: [keys[i] for i in indices]
            for name, indices in split_shards(settings.num_shards, settings.holdout, settings.validation_shards).items()}


@dataclass(frozen=True)
class SliceRow:
    position: int
    key: str
    wnid: str
    label: int
    tar: str
    member: str
    offset: int
    size: int
    sha256: str
    width: int
    height: int
    needs_repair: bool


def slice_url(out_root: str, shard_key: str) -> str:
    return fs.join(out_root, PLAN_DIR, f"{shard_key}.csv")


def index_url(out_root: str) -> str:
    return fs.join(out_root, PLAN_DIR, PLAN_INDEX)


def render_slice(rows: list[tuple]) -> bytes:
    """Canonical CSV text of a shard's slice (rows in SLICE_COLUMNS order, sorted by position)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SLICE_COLUMNS)
    for row in sorted(rows, key=lambda r: r[0]):
        w.writerow(row)
    return buf.getvalue().encode("utf-8")


def write_slice(out_root: str, shard_key: str, rows: list[tuple]) -> str:
    """Commit one shard's slice file; returns its sha256 (the shard's plan digest)."""
    return _commit_slice(out_root, shard_key, render_slice(rows))


def _commit_slice(out_root: str, shard_key: str, data: bytes, sizes: dict[str, int] | None = None) -> str:
    if sizes is not None:
        sizes[shard_key] = len(data)
    url = slice_url(out_root, shard_key)
    digest = hashlib.sha256(data).hexdigest()
    try:  # one larger than the new slice is not it: read no further
        if hashlib.sha256(fs.read_bytes(url, limit=len(data), kind="this slice")).hexdigest() == digest:
            return digest
    except (FileNotFoundError, OSError, fs.TooLarge):
        pass
    atomic.write_atomic(url, data)
    return digest


def publish_slices(cat, out_root: str, shard_keys: list[str], batch: int = SLICE_BATCH,
                   release: str = "", sizes: dict[str, int] | None = None) -> dict[str, str]:
    """Commit the slice file of every shard in `shard_keys` from the catalog's plan table; returns
    shard key -> digest. `release`: whose plan rows (the catalog holds every release's). `sizes`:
    filled with shard key -> the slice's bytes (the index's `slice_bytes`).

    The CSV text is rendered by DuckDB (`sql/plan_slices_text.sql`), `batch` shards per query, and
    is byte for byte what `write_slice` writes for the same rows, so digests (and with them every
    shard's fingerprint) do not depend on the path taken; a shard with a text field that needs CSV
    quoting is rendered by `render_slice` from its rows instead. A batch's files are committed
    concurrently (SLICE_WRITERS at once: on S3 each commit is a read of the old slice and an
    upload, ~3 round trips) while the next batch is rendered; at most two batches are held at once.
    """
    header = render_slice([])
    digests: dict[str, str] = {}

    def commit(files: list[tuple[str, bytes]]) -> None:
        for key, digest in zip([k for k, _ in files], writers.map(lambda f: _commit_slice(out_root, *f, sizes), files)):
            digests[key] = digest

    with ThreadPoolExecutor(SLICE_WRITERS) as writers, ThreadPoolExecutor(1) as writer:
        pending = None
        for i in range(0, len(shard_keys), batch):
            keys = shard_keys[i:i + batch]
            bodies = {shard: (exotic, body) for shard, exotic, body
                      in cat.rows("plan_slices_text", {"first": keys[0], "last": keys[-1], "release": release})}
            files = []
            for key in keys:
                exotic, body = bodies.pop(key, (False, ""))
                if exotic:
                    rows = cat.rows("plan_slices", {"first": key, "last": key, "release": release})
                    files.append((key, render_slice([row[1:] for row in rows])))
                else:
                    files.append((key, header + body.encode("utf-8")))
            if bodies:
                raise ValueError(f"plan rows for shards outside the partition keys: {sorted(bodies)[:5]}")
            del bodies
            if pending is not None:
                pending.result()
            pending = writer.submit(commit, files)
        if pending is not None:
            pending.result()
    return {key: digests[key] for key in shard_keys}


class PlanSliceDamaged(ValueError):
    """A shard's plan slice is not the one the plan's index names (its bytes changed on storage)."""


DAMAGED_SUFFIX = ".damaged"  # a slice found damaged is kept aside under this name until the plan is made again


def read_slice(out_root: str, shard_key: str, set_aside: bool = True,
               index: dict | None = None) -> tuple[list[SliceRow], str]:
    """A shard's slice rows in plan order, and the digest of the slice file.

    The digest must be the one the plan's index names for the shard (when there is an index): a
    slice changed, cut or emptied on storage is moved aside (`<key>.csv.damaged`) and raises
    PlanSliceDamaged naming it, never read as the plan; with the slice gone from its place the plan
    is stale (`slices_missing`), and the next build makes it again, rewriting that slice alone.
    `set_aside=False` (a head start's look, shard_ahead): raise, leaving the slice to the run.
    `index`: the plan's index as the caller read it (a shard run's `require_current_plan`), not read
    again (at 1,024 shards on S3, one GET fewer per run of a file that grows with the shards).
    A slice larger than the index says it is (`slice_bytes`; an older index: than one of the shard's
    planned rows can be, slice_limit) is damaged likewise, read no further: removed (it is not kept
    aside: that would copy it whole)."""
    url = slice_url(out_root, shard_key)
    index = read_index(out_root) if index is None else index
    limit = per_shard(index, "slice_bytes").get(shard_key)
    limit = slice_limit(planned_rows(index, shard_key)) if limit is None else limit
    try:
        data = fs.read_bytes(url, limit=limit, kind="a plan slice of the shard's planned samples")
    except fs.TooLarge as e:
        if set_aside:
            fs.remove(url)
        raise PlanSliceDamaged(f"plan slice {fs.redact(url)} is damaged: it holds more than {limit:,} bytes, more "
                               "than the plan's slice of the shard does"
                               + (" (removed; `imnet build` makes the plan again, then this shard)" if set_aside
                                  else "")) from e
    digest = hashlib.sha256(data).hexdigest()
    want = index.get("digests", {}).get(shard_key) if index else None
    if want is not None and digest != want:
        if not set_aside:
            raise PlanSliceDamaged(f"plan slice {fs.redact(url)} is damaged")
        atomic.write_atomic(url + DAMAGED_SUFFIX, data)
        fs.remove(url)
        raise PlanSliceDamaged(f"plan slice {fs.redact(url)} is damaged: sha256 {digest}, the plan's index says "
                               f"{want} (moved aside to {fs.basename(url)}{DAMAGED_SUFFIX}; `imnet build` makes "
                               "the plan again, then this shard)")
    # a field as long as the slice: a member's name may be (a pax name of up to rawtar.MAX_HEADER_DATA bytes,
    # each byte that is not UTF-8 four in the slice); csv's own limit (128 KiB) failed every run of the shard
    csv.field_size_limit(max(csv.field_size_limit(), len(data)))
    reader = csv.reader(io.StringIO(data.decode("utf-8")))
    header = next(reader)
    if header != SLICE_COLUMNS:
        raise ValueError(f"plan slice for shard {shard_key} has columns {header}, expected {SLICE_COLUMNS}")
    rows = [
        SliceRow(int(p), k, w, int(lb), t, m, int(o), int(sz), sh, int(wd), int(ht), nr == "True")
        for p, k, w, lb, t, m, o, sz, sh, wd, ht, nr in reader
    ]
    return rows, digest


def planned_rows(index: dict | None, shard_key: str) -> int | None:
    """The rows the plan's index says a shard's slice holds (its `shard_lengths`, in key order);
    None where the index does not say."""
    return per_shard(index, "shard_lengths").get(shard_key)


def per_shard(index: dict | None, field: str) -> dict[str, int]:
    """Shard key -> its number in an index list of one per shard in key order (shard_lengths,
    slice_bytes); a key without one (not a number, or a list of another length: none) is left out."""
    values = index.get(field) if isinstance(index, dict) else None
    keys = sorted(index.get("digests") or {}) if isinstance(index, dict) else []
    if not isinstance(values, list) or len(values) != len(keys):
        return {}
    return {k: n for k, n in zip(keys, values) if isinstance(n, int) and not isinstance(n, bool)}


def slice_limit(rows: int | None) -> int:
    """The most bytes a slice of `rows` planned rows can hold (None: not known)."""
    return SLICE_MAX_BYTES if rows is None else SLICE_BASE_BYTES + SLICE_ROW_MAX_BYTES * rows


def index_limit(shards: int = MAX_SHARDS) -> int:
    """The most bytes the plan's index can hold for `shards` shards."""
    return INDEX_BASE_BYTES + INDEX_SHARD_MAX_BYTES * shards


def slices_missing(out_root: str, index: dict) -> list[str]:
    """Shard keys whose slice the index names but `_plan/` does not hold (one listing)."""
    have = {e["name"] for e in fs.listdir(fs.join(out_root, PLAN_DIR))}
    return [k for k in sorted(index.get("digests", {})) if f"{k}.csv" not in have]


INDEX_SEAL = "seal"  # the sha256 of the rest of the index, written with it


def _seal(index: dict) -> str:
    body = {k: v for k, v in index.items() if k != INDEX_SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_index(out_root: str, index: dict) -> None:
    doc = {**index, INDEX_SEAL: _seal(index)}
    atomic.write_atomic(index_url(out_root), json.dumps(doc, indent=1, sort_keys=True).encode())


def read_index(out_root: str) -> dict | None:
    """The plan's index, or None when there is none or it is damaged (does not parse, or does not
    match its seal: a changed byte, or holds more bytes than any index can: index_limit, read no
    further): either way the plan is stale and is made again. An index written before seals were
    (no seal) is taken as it is."""
    try:
        doc = fs.read_json(index_url(out_root), limit=index_limit(), kind="the plan's index")
    except fs.TooLarge:
        return None
    if not isinstance(doc, dict) or (INDEX_SEAL in doc and doc[INDEX_SEAL] != _seal(doc)):
        return None
    return doc
