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
from dataclasses import dataclass

from . import fs

PLAN_VERSION = "1"
PLAN_DIR = "_plan"
PLAN_INDEX = "_index.json"
SLICE_COLUMNS = ["position", "key", "wnid", "label", "tar", "member", "offset", "size", "sha256",
                 "width", "height", "needs_repair"]


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


def split_shards(num_shards: int, holdout: tuple[tuple[str, int], ...]) -> dict[str, list[int]]:
    """Shard indices per split: holdout splits take the last shards, in the order given."""
    out: dict[str, list[int]] = {}
    end = num_shards
    for name, count in reversed(holdout):
        out[name] = list(range(end - count, end))
        end -= count
    return {"train": list(range(end)), **dict(reversed(list(out.items())))}


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
    data = render_slice(rows)
    url = slice_url(out_root, shard_key)
    digest = hashlib.sha256(data).hexdigest()
    try:
        if hashlib.sha256(fs.read_bytes(url)).hexdigest() == digest:
            return digest
    except (FileNotFoundError, OSError):
        pass
    fs.write_atomic(url, data)
    return digest


def read_slice(out_root: str, shard_key: str) -> tuple[list[SliceRow], str]:
    """A shard's slice rows in plan order, and the digest of the slice file."""
    data = fs.read_bytes(slice_url(out_root, shard_key))
    reader = csv.reader(io.StringIO(data.decode("utf-8")))
    header = next(reader)
    if header != SLICE_COLUMNS:
        raise ValueError(f"plan slice for shard {shard_key} has columns {header}, expected {SLICE_COLUMNS}")
    rows = [
        SliceRow(int(p), k, w, int(lb), t, m, int(o), int(sz), sh, int(wd), int(ht), nr == "True")
        for p, k, w, lb, t, m, o, sz, sh, wd, ht, nr in reader
    ]
    return rows, hashlib.sha256(data).hexdigest()


def write_index(out_root: str, index: dict) -> None:
    fs.write_atomic(index_url(out_root), json.dumps(index, indent=1, sort_keys=True).encode())


def read_index(out_root: str) -> dict | None:
    try:
        return json.loads(fs.read_bytes(index_url(out_root)))
    except (FileNotFoundError, OSError, ValueError):
        return None
