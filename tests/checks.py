"""Checks of a finished build, shared by the local and the S3 integration tests.

They read the output the way users do: `_info.json` as timm reads it, the shards with webdataset,
the catalog with DuckDB (read-only). `out` is a local folder holding the out root's files (for an
S3 build, a download of the out bucket's prefix).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import duckdb
import webdataset as wds

from imnet_assets.image.decode import target_size
from imnet_assets.release.plan import shard_sizes
from imnet_assets.settings import DEFAULT_SHARD_PATTERN


def shard_names(num_shards: int, pattern: str = DEFAULT_SHARD_PATTERN) -> list[str]:
    return [pattern.format(shard=f"{i:04d}") for i in range(num_shards)]


def catalog(path: Path | str):
    return duckdb.connect(str(path), read_only=True)


def check_info_json(out: Path, catalog_path: Path | str, num_shards: int) -> dict:
    """`_info.json` lists every shard in order, with balanced lengths that sum to the plan."""
    info = json.loads((Path(out) / "_info.json").read_text())
    train = info["splits"]["train"]
    assert train["name"] == "train", train["name"]
    assert train["filenames"] == shard_names(num_shards), train["filenames"]
    assert sum(train["shard_lengths"]) == train["num_samples"], train
    with catalog(catalog_path) as con:
        planned = con.execute("SELECT count(*) FROM plan").fetchone()[0]
    # Nothing in the sample release is excluded at encode time, so the shards hold the plan.
    assert train["shard_lengths"] == shard_sizes(planned, num_shards), (train["shard_lengths"], planned)
    assert max(train["shard_lengths"]) - min(train["shard_lengths"]) <= 1, train["shard_lengths"]
    return info


def check_samples(out: Path, catalog_path: Path | str, wnids: list[str], num_shards: int) -> list[dict]:
    """webdataset reads every kept image exactly once, with its label, names and sizes."""
    urls = [str(Path(out) / name) for name in shard_names(num_shards)]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)), "a sample appears twice across the shards"
    with catalog(catalog_path) as con:
        kept = {k for (k,) in con.execute("SELECT key FROM images WHERE status = 'kept'").fetchall()}
        labels = dict(con.execute("SELECT wnid, label FROM synsets").fetchall())
        sizes = {k: (w, h) for k, w, h in con.execute("SELECT key, width, height FROM images WHERE status = 'kept'").fetchall()}
    assert set(keys) == kept, (
        f"shards and kept images differ: missing {sorted(kept - set(keys))[:5]}, extra {sorted(set(keys) - kept)[:5]}"
    )
    wnids = sorted(wnids)
    for s in samples:
        key, meta = s["__key__"], s["json"]
        wnid = key.split("_")[0]
        assert meta["class_name"] == wnid, (key, meta)
        assert meta["filename"] == f"{wnid}/{key}.JPEG", (key, meta)
        assert s["cls"] == labels[wnid] == wnids.index(wnid) == meta["label"], (key, s["cls"], meta)
        img = s["webp"]
        assert img.mode == "RGB", (key, img.mode)
        assert img.size == (meta["width"], meta["height"]), (key, img.size, meta)
        assert (meta["orig_width"], meta["orig_height"]) == sizes[key], (key, meta, sizes[key])
        assert img.size == target_size(meta["orig_width"], meta["orig_height"]), (key, img.size, meta)
        assert min(img.size) <= 768, (key, img.size)
    return samples


def check_member_layout(shard: Path) -> None:
    """Each sample is .cls, .json, .webp in that order, with fixed member metadata and lossy WebP."""
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
        assert [m.name.rsplit(".", 1)[1] for m in members[:3]] == ["cls", "json", "webp"], members[:3]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
        webp = tf.extractfile(members[2]).read()
    assert webp[:4] == b"RIFF" and webp[8:16] == b"WEBPVP8 ", webp[:16]


def check_catalog_shards(out: Path, catalog_path: Path | str, num_shards: int) -> list[tuple]:
    """The catalog's shard tables (loaded by the audit from the manifests) match the shard bytes."""
    with catalog(catalog_path) as con:
        shards = con.execute(
            "SELECT shard, path, num_samples, bytes, sha256, run_id, code_version FROM shards ORDER BY shard"
        ).fetchall()
        per_shard = dict(con.execute("SELECT shard, count(*) FROM shard_samples GROUP BY shard").fetchall())
        in_place = con.execute(
            "SELECT count(*) FROM plan p JOIN shard_samples s USING (key) "
            "WHERE p.shard = s.shard AND p.position = s.position"
        ).fetchone()[0]
        planned = con.execute("SELECT count(*) FROM plan").fetchone()[0]
    assert [s[0] for s in shards] == [f"{i:04d}" for i in range(num_shards)], shards
    assert in_place == planned, (in_place, planned)
    for shard, path, n, size, sha, run_id, code_version in shards:
        data = (Path(out) / path).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha, f"shard {shard} differs from the catalog"
        assert per_shard[shard] == n, (shard, per_shard.get(shard), n)
        assert run_id and code_version, (shard, run_id, code_version)
    return shards


def check_release(out: Path, catalog_path: Path | str, wnids: list[str], num_shards: int) -> list[dict]:
    """Every check above; returns the samples webdataset read."""
    check_info_json(out, catalog_path, num_shards)
    samples = check_samples(out, catalog_path, wnids, num_shards)
    check_member_layout(Path(out) / shard_names(num_shards)[0])
    check_catalog_shards(out, catalog_path, num_shards)
    return samples
