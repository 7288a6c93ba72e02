"""The plan's files, the files the audit publishes and a changed-source marker acted on are read
with limits derived from the plan and the release (plan.index_limit, the index's slice_bytes or
slice_limit; published.py; changed_sources.clear): a file far larger than one can be takes its
damage path (an index or slice: the plan is made again; a published file: not fresh, or a problem
naming it; a marker: kept), read no further than the limit, never whole: counted in bytes read
locally (a sparse file), and in the Range header of each GET on S3."""

from __future__ import annotations

import json

import pytest

from imnet_assets.release import changed_sources, plan
from imnet_assets.stages import published
from imnet_assets.stages.audit import check_info
from imnet_assets.storage import fs
from imnet_assets.storage.catalog import Catalog
from tests.conftest import local_settings
from tests.core.test_record_limits import _put, _thread_rchar

SPARSE = 96 << 20  # a local file's size: sparse, so no disk; read whole, it shows in the bytes read



def _huge(client, bucket: str, url: str, remote_size: int, head: bytes = b"{") -> None:
    """A file at `url` far larger than the limit: sparse locally (SPARSE bytes), `remote_size` on S3."""
    if fs.is_remote(url):
        _put(client, bucket, url, head + b" " * remote_size)
    else:
        fs.makedirs(fs.dirname(url))
        with open(url, "wb") as f:
            f.write(head)
            f.truncate(SPARSE)


def _gets(server, mark: int, name: str) -> list:
    return [r for r in server.since(mark) if r.method == "GET" and r.key.endswith(name)]


def _index(out: str, rows: int) -> None:
    plan.write_index(out, {"fingerprint": "f", "seed": 1, "num_shards": 1, "num_samples": rows,
                           "shard_lengths": [rows], "digests": {"0000": "0" * 64}})


def test_a_huge_plan_index_is_damaged_read_no_further_local_and_s3(s3, tmp_path):
    server, client, bucket = s3
    limit = plan.index_limit()
    assert limit > 10_000 * 100 + 200_000  # a real index: ~100 bytes a shard and a head, at the most shards
    for out in (str(tmp_path / "out"), f"s3://{bucket}/idx"):
        _huge(client, bucket, plan.index_url(out), limit + 4096)
        mark, before = server.mark(), _thread_rchar()
        assert plan.read_index(out) is None  # damaged: the plan is stale, made again
        assert _thread_rchar() - before < 2 * limit
        assert all(r.range == f"bytes=0-{limit}" for r in _gets(server, mark, plan.PLAN_INDEX))


def test_a_huge_slice_is_damaged_removed_and_read_no_further_local_and_s3(s3, tmp_path):
    server, client, bucket = s3
    rows = 3
    limit = plan.slice_limit(rows)
    assert plan.slice_limit(12_844) > 12_844 * 400  # the real size: ~150 bytes a row
    for out in (str(tmp_path / "out"), f"s3://{bucket}/slices"):
        _index(out, rows)
        url = plan.slice_url(out, "0000")
        _huge(client, bucket, url, limit + 4096, head=b"position,key\n")
        assert plan.planned_rows(plan.read_index(out), "0000") == rows
        mark, before = server.mark(), _thread_rchar()
        with pytest.raises(plan.PlanSliceDamaged, match=f"more than {limit:,} bytes"):
            plan.read_slice(out, "0000", set_aside=False)  # a head start's look: left to the run
        assert fs.exists(url)
        with pytest.raises(plan.PlanSliceDamaged, match="removed; `imnet build` makes the plan again"):
            plan.read_slice(out, "0000")
        assert _thread_rchar() - before < 4 * limit
        assert not fs.exists(url) and not fs.exists(url + plan.DAMAGED_SUFFIX)  # never copied aside whole
        assert plan.slices_missing(out, plan.read_index(out)) == ["0000"]  # so the plan is made again
        gets = _gets(server, mark, "0000.csv")
        assert all(r.range == f"bytes=0-{limit}" for r in gets), gets
        # a plan made again commits the slice over a huge one, reading no more of it than the new one's bytes
        _huge(client, bucket, url, limit + 4096)
        body = plan.render_slice([(0, "k", "n01", 0, "t.tar", "m.JPEG", 0, 5, "0" * 64, 1, 1, False)])
        mark, before = server.mark(), _thread_rchar()
        plan.write_slice(out, "0000", [(0, "k", "n01", 0, "t.tar", "m.JPEG", 0, 5, "0" * 64, 1, 1, False)])
        assert _thread_rchar() - before < 4 * limit and fs.read_bytes(url) == body
        assert all(r.range == f"bytes=0-{len(body)}" for r in _gets(server, mark, "0000.csv")[:1])


def test_a_changed_source_marker_replaced_by_a_huge_one_is_kept_read_no_further(s3, tmp_path):
    server, client, bucket = s3
    for out in (str(tmp_path / "out"), f"s3://{bucket}/marks"):
        raw = json.dumps({"tar": "n01.tar", "found": "x"}).encode()
        url = changed_sources.marker_url(out, "n01.tar")
        _put(client, bucket, url, raw)
        acted = changed_sources.pending(out)
        _huge(client, bucket, url, 1 << 20)  # a shard run marked the tar again (here: a huge marker)
        mark, before = server.mark(), _thread_rchar()
        assert changed_sources.clear(out, acted) == [] and fs.exists(url)
        assert _thread_rchar() - before < 1 << 20
        assert all(r.range == f"bytes=0-{len(raw)}" for r in _gets(server, mark, "n01.tar.json"))


def test_huge_published_files_are_not_fresh_and_a_problem_read_no_further_local_and_s3(s3, tmp_path, monkeypatch):
    server, client, bucket = s3
    monkeypatch.setattr(published, "CLASSES_MAX_ROWS", 100)  # (the real bound, ~160 MiB, is slow to test past)
    for out in (str(tmp_path / "out"), f"s3://{bucket}/pub"):
        settings = local_settings(tmp_path / "raw", tmp_path, IMNET_OUT_ROOT=out, IMNET_NUM_SHARDS=2)
        limits = published.published_limits(settings)
        urls = published.published_urls(settings)
        assert limits[urls[0]] > 2 * 4 * 1024 and limits[urls[1]] > 100 * 1024
        for url in urls:
            _put(client, bucket, url, b"{}")
        small = published.sealed(settings, "inputs")
        for url in urls[1:]:  # classes.tsv and the card, each huge in turn
            remote = limits[url] + 4096
            _huge(client, bucket, url, remote)
            mark, before = server.mark(), _thread_rchar()
            seal = published.sealed(settings, "inputs")
            assert _thread_rchar() - before < 2 * limits[url] + (1 << 20)
            assert all(r.range == f"bytes=0-{limits[u]}" for u in urls for r in _gets(server, mark, fs.basename(u)))
            fs.remove(url)
            assert seal not in (small, published.sealed(settings, "inputs"))  # not fresh: audited again
            _put(client, bucket, url, b"{}")
        _huge(client, bucket, urls[0], limits[urls[0]] + 4096)
        before = _thread_rchar()
        problems = check_info(settings, {"0000": 1, "0001": 1})
        assert _thread_rchar() - before < 2 * limits[urls[0]]
        assert len(problems) == 1 and f"more than {limits[urls[0]]:,} bytes" in problems[0], problems


def _long_named_copy(raw, wnid: str) -> str:
    """Appends to `<wnid>.tar` a copy of its first image named by its key's start and 600,000 bytes
    that are not UTF-8 (a GNU long name: rawtar reads names up to MAX_HEADER_DATA; the key is
    sanitized, the image kept; the catalog's name escapes each byte, 2.4 MB); returns the key's start."""
    import io
    import tarfile

    path = raw / f"{wnid}.tar"
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read() if m.isfile() else None) for m in tf.getmembers()]
    first = next(data for m, data in members if data is not None)
    name = f"{wnid}_999" + "\udcff" * 600_000 + ".JPEG"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as out:
        for m, data in members:
            out.addfile(m, None if data is None else io.BytesIO(data))
        info = tarfile.TarInfo(name)
        info.size = len(first)
        out.addfile(info, io.BytesIO(first))
    return f"{wnid}_999_"


def test_a_kept_image_with_a_long_member_name_is_built_in_a_shard_of_few_samples(tmp_path):
    """A kept image whose member name is 600 KB of bytes that are not UTF-8 (SPEC: kept under a
    sanitized key, never a crash) in a shard of one or two planned samples. Its index row (a 5 MB
    CSV line) failed the index ("Maximum line size of 2000000 bytes exceeded"): no stage after it
    ran. Its slice is the plan's, whatever a row is taken to hold at most: read with a limit of
    8 KiB a planned row, it was "damaged", removed, the plan made again and the slice removed again
    at every build (the shard never built); and csv refused its 2.4 MB field ("field larger than
    field limit") at every run of the shard."""
    from imnet_assets.sample.sample_raw import write_sample_raw
    from tests.conftest import build_env, imnet

    raw = tmp_path / "raw"
    write_sample_raw(raw, synsets=2, images=6, seed=0)
    start = _long_named_copy(raw, sorted(p.stem for p in raw.glob("n*.tar"))[0])
    env = build_env(tmp_path, raw, IMNET_NUM_SHARDS="6")
    imnet(["build"], env, cwd=tmp_path)
    out_root = str(tmp_path / "out")
    index = plan.read_index(out_root)
    sizes = {k: fs.size(plan.slice_url(out_root, k)) for k in sorted(index["digests"])}
    assert index["slice_bytes"] == list(sizes.values()) and max(sizes.values()) > 2_400_000
    with Catalog(str(tmp_path / "catalog.duckdb"), read_only=True) as cat:
        (key, status), = cat.con.execute("SELECT key, status FROM images WHERE starts_with(key, ?)", [start]).fetchall()
    assert status == "kept"
    out = imnet(["lineage", key], env, cwd=tmp_path).stdout
    assert ".tar" in out.split("shard", 1)[-1], out
    again = imnet(["build"], env, cwd=tmp_path).stdout
    assert "6 of 6 selected shards fresh" in again and "shuffled_plan    materialized" not in again, again
    small = min(sizes, key=sizes.get)  # one byte more than the index says: not the plan's, read no further
    with open(plan.slice_url(out_root, small), "ab") as f:
        f.write(b"\n")
    with pytest.raises(plan.PlanSliceDamaged, match=f"more than {sizes[small]:,} bytes"):
        plan.read_slice(out_root, small)
    assert plan.slices_missing(out_root, index) == [small]
