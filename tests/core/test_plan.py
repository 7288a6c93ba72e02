"""The shuffled plan: balanced shard arithmetic, slice files, and the SQL plan on a generated release."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from collections import Counter

import duckdb
import pytest

from imnet_assets.release import plan
from imnet_assets.release.plan import (
    SLICE_COLUMNS,
    SliceRow,
    read_index,
    read_slice,
    render_slice,
    shard_of,
    shard_sizes,
    slice_url,
    split_shards,
    write_index,
    write_slice,
)
from imnet_assets.sample.sample_raw import write_sample_raw
from imnet_assets.settings import Settings
from imnet_assets.stages.fingerprints import expected_fingerprints
from imnet_assets.stages.shuffled_plan import build_shuffled_plan
from imnet_assets.storage.catalog import Catalog
from tests.conftest import build_catalog_stages, local_settings

NUM_SHARDS = 3

# ----------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize(("n", "s"), [(0, 1), (0, 4), (1, 1), (5, 1), (7, 3), (9, 3), (10, 4), (3, 8),
                                      (1023, 1024), (1025, 1024), (13_151_276, 1024)])
def test_shard_sizes_are_balanced(n, s):
    sizes = shard_sizes(n, s)
    assert len(sizes) == s
    assert sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1
    big = n % s
    # The first N mod S shards hold ceil(N/S), the rest floor(N/S).
    assert sizes[:big] == [-(-n // s)] * big
    assert sizes[big:] == [n // s] * (s - big)
    assert sizes == sorted(sizes, reverse=True)


def test_shard_sizes_with_fewer_images_than_shards():
    assert shard_sizes(3, 8) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert shard_sizes(0, 3) == [0, 0, 0]


def test_shard_sizes_of_the_real_release():
    sizes = shard_sizes(13_151_276, 1024)
    assert sizes[:44] == [12844] * 44 and sizes[44:] == [12843] * 980


@pytest.mark.parametrize("s", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 6, 7, 11, 20, 23])
def test_shard_of_agrees_with_shard_sizes(n, s):
    placed = [shard_of(g, n, s) for g in range(n)]
    # Every (shard, position) is used once, positions run 0..size-1 in each shard, in order of g.
    assert len(set(placed)) == n
    per_shard = Counter(sh for sh, _ in placed)
    assert [per_shard.get(i, 0) for i in range(s)] == shard_sizes(n, s)
    for i in range(s):
        assert [p for sh, p in placed if sh == i] == list(range(per_shard.get(i, 0)))
    # Contiguous runs: shard numbers never decrease along the shuffled order.
    assert [sh for sh, _ in placed] == sorted(sh for sh, _ in placed)


def test_split_shards_holdout_takes_the_last_shards_in_order():
    assert split_shards(5, ()) == {"train": [0, 1, 2, 3, 4]}
    got = split_shards(10, (("validation", 2), ("test", 3)))
    assert list(got) == ["train", "validation", "test"]
    assert got == {"train": [0, 1, 2, 3, 4], "validation": [5, 6], "test": [7, 8, 9]}
    got = split_shards(4, (("test", 1), ("validation", 1)))
    assert got == {"train": [0, 1], "test": [2], "validation": [3]}
    # Every shard belongs to exactly one split.
    for n, hold in ((7, (("a", 1),)), (9, (("a", 2), ("b", 2), ("c", 1)))):
        got = split_shards(n, hold)
        assert sorted(i for v in got.values() for i in v) == list(range(n))
        assert [len(got[name]) for name, _ in hold] == [c for _, c in hold]


# ----------------------------------------------------------------------------- slice files


def slice_rows(n: int, start: int = 0) -> list[tuple]:
    rows = []
    for i in range(start, start + n):
        wnid = f"n{1000 + i % 3:08d}"
        rows.append((i - start, f"{wnid}_{i}", wnid, i % 3, f"{wnid}.tar", f"{wnid}_{i}.JPEG", 512 * (i + 1),
                     1000 + i, hashlib.sha256(str(i).encode()).hexdigest(), 100 + i, 80 + i, i % 4 == 0))
    return rows


def test_slice_round_trip(tmp_path):
    out = str(tmp_path / "out")
    rows = slice_rows(7)
    # Awkward member names survive the CSV (commas, quotes, spaces).
    rows[2] = rows[2][:5] + ('odd, "name" here.JPEG',) + rows[2][6:]
    digest = write_slice(out, "0002", list(reversed(rows)))  # any order in, position order out
    got, got_digest = read_slice(out, "0002")
    assert got_digest == digest
    assert got == [SliceRow(*r) for r in rows]
    assert [r.position for r in got] == list(range(7))
    assert got[0].needs_repair is True and got[1].needs_repair is False
    assert isinstance(got[0].offset, int) and isinstance(got[0].label, int)
    data = (tmp_path / "out" / "_plan" / "0002.csv").read_bytes()
    assert data.split(b"\n")[0].decode() == ",".join(SLICE_COLUMNS)
    assert hashlib.sha256(data).hexdigest() == digest


def test_empty_slice_round_trip(tmp_path):
    out = str(tmp_path)
    digest = write_slice(out, "0000", [])
    assert read_slice(out, "0000") == ([], digest)
    assert digest == hashlib.sha256(render_slice([])).hexdigest()


def test_slice_digest_is_stable_and_content_sensitive():
    rows = slice_rows(5)
    assert render_slice(rows) == render_slice(list(reversed(rows)))
    assert hashlib.sha256(render_slice(rows)).hexdigest() == hashlib.sha256(render_slice(slice_rows(5))).hexdigest()
    changed = list(rows)
    changed[3] = changed[3][:8] + ("0" * 64,) + changed[3][9:]
    assert render_slice(changed) != render_slice(rows)
    assert render_slice(rows[:4]) != render_slice(rows)


def test_write_slice_is_idempotent(tmp_path):
    out = str(tmp_path)
    rows = slice_rows(4)
    d1 = write_slice(out, "0001", rows)
    path = slice_url(out, "0001")
    before = os.stat(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns - 10_000_000_000))
    stamped = os.stat(path).st_mtime_ns
    d2 = write_slice(out, "0001", rows)
    assert d1 == d2
    assert os.stat(path).st_mtime_ns == stamped  # same content: the file is not rewritten
    assert os.stat(path).st_ino == before.st_ino
    d3 = write_slice(out, "0001", slice_rows(4, start=1))
    assert d3 != d1
    assert read_slice(out, "0001")[1] == d3
    assert sorted(os.listdir(tmp_path / "_plan")) == ["0001.csv"]


def test_read_slice_rejects_other_columns(tmp_path):
    (tmp_path / "_plan").mkdir()
    (tmp_path / "_plan" / "0000.csv").write_text("position,key\n0,a\n")
    with pytest.raises(ValueError, match="columns"):
        read_slice(str(tmp_path), "0000")


def test_index_round_trip(tmp_path):
    assert read_index(str(tmp_path)) is None
    write_index(str(tmp_path), {"fingerprint": "abc", "digests": {"0000": "d"}})
    got = read_index(str(tmp_path))
    assert {k: v for k, v in got.items() if k != "seal"} == {"fingerprint": "abc", "digests": {"0000": "d"}}
    (tmp_path / "_plan" / "_index.json").write_text("{broken")
    assert read_index(str(tmp_path)) is None


def test_an_index_that_still_parses_but_lost_its_seal_is_not_read(tmp_path):
    """One changed byte that leaves the JSON valid (a digest's letter) is damage: no index, so the
    plan is stale and is made again, never a plan that names digests no slice has."""
    write_index(str(tmp_path), {"fingerprint": "abc", "digests": {"0000": "d0"}})
    path = tmp_path / "_plan" / "_index.json"
    path.write_text(path.read_text().replace('"d0"', '"d1"'))
    assert json.loads(path.read_text())["digests"] == {"0000": "d1"}
    assert read_index(str(tmp_path)) is None
    path.write_text(json.dumps({"fingerprint": "abc", "digests": {"0000": "d"}}))  # before seals: taken as is
    assert read_index(str(tmp_path)) == {"fingerprint": "abc", "digests": {"0000": "d"}}


def test_a_damaged_slice_is_set_aside_naming_it_and_the_plan_is_then_stale(tmp_path):
    out = str(tmp_path)
    digest = write_slice(out, "0000", [(0, "n1_1", "n1", 0, "n1.tar", "n1_1.JPEG", 512, 10, "ab", 40, 40, False)])
    write_index(out, {"fingerprint": "abc", "digests": {"0000": digest}})
    assert plan.slices_missing(out, read_index(out)) == []
    path = tmp_path / "_plan" / "0000.csv"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one letter of the last field
    path.write_bytes(bytes(data))
    with pytest.raises(plan.PlanSliceDamaged, match="0000.csv is damaged"):
        read_slice(out, "0000", set_aside=False)  # a head start only looks
    assert path.exists()
    with pytest.raises(plan.PlanSliceDamaged, match="0000.csv is damaged"):
        read_slice(out, "0000")
    assert not path.exists() and (tmp_path / "_plan" / "0000.csv.damaged").read_bytes() == bytes(data)
    assert plan.slices_missing(out, read_index(out)) == ["0000"]


def test_a_slice_is_checked_against_the_index_its_run_hands_over_not_read_again(tmp_path):
    """A shard run has read the plan's index already (require_current_plan): read_slice takes it
    (one GET fewer per shard run on S3) and checks the slice against that index, stored one or none."""
    out = str(tmp_path)
    digest = write_slice(out, "0000", [(0, "n1_1", "n1", 0, "n1.tar", "n1_1.JPEG", 512, 10, "ab", 40, 40, False)])
    write_index(out, {"fingerprint": "abc", "digests": {"0000": digest}})
    index = read_index(out)
    (tmp_path / "_plan" / "_index.json").unlink()  # not read: the one handed over is used
    assert read_slice(out, "0000", index=index)[1] == digest
    with pytest.raises(plan.PlanSliceDamaged, match="0000.csv is damaged"):
        read_slice(out, "0000", set_aside=False, index={"digests": {"0000": "0" * 64}})


# ----------------------------------------------------------------------------- the SQL plan


settings_for = functools.partial(local_settings, IMNET_NUM_SHARDS=NUM_SHARDS)
build_stages = build_catalog_stages


PLAN_COLUMNS = ", ".join(f'"{c}"' for c in plan.SLICE_COLUMNS)


def plan_table(settings: Settings) -> list[tuple]:
    with duckdb.connect(settings.catalog, read_only=True) as con:
        return con.execute(f"SELECT shard, {PLAN_COLUMNS} FROM plan ORDER BY shard, position").fetchall()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    base = tmp_path_factory.mktemp("plan")
    write_sample_raw(base / "raw", synsets=2, images=20, seed=0)
    settings = settings_for(base / "raw", base)
    facts = build_stages(settings)
    return base, settings, facts


def test_every_kept_image_is_planned_exactly_once(release):
    _, settings, facts = release
    with duckdb.connect(settings.catalog, read_only=True) as con:
        kept = sorted(r[0] for r in con.execute("SELECT key FROM images WHERE status = 'kept'").fetchall())
        excluded = con.execute("SELECT count(*) FROM images WHERE status = 'excluded'").fetchone()[0]
        planned = [r[0] for r in con.execute("SELECT key FROM plan").fetchall()]
        labels = dict(con.execute("SELECT wnid, label FROM synsets").fetchall())
        mismatched = con.execute(
            "SELECT count(*) FROM plan p JOIN images i USING (key) "
            "WHERE i.status = 'kept' AND (p.tar <> i.tar OR p.\"offset\" <> i.\"offset\" OR p.sha256 <> i.sha256 OR p.size <> i.size)"
        ).fetchone()[0]
        plan_labels = con.execute("SELECT DISTINCT wnid, label FROM plan").fetchall()
    assert excluded > 0  # the sample's quirks (empty, tiny, not an image) are filtered out
    assert len(kept) > 20
    assert sorted(planned) == kept
    assert len(planned) == len(set(planned))
    assert mismatched == 0
    assert all(labels[w] == lb for w, lb in plan_labels)
    assert facts["samples"] == len(kept)


def test_positions_and_sizes_per_shard(release):
    _, settings, facts = release
    rows = plan_table(settings)
    n = len(rows)
    by_shard: dict[str, list[int]] = {}
    for shard, pos, *_ in rows:
        by_shard.setdefault(shard, []).append(pos)
    assert sorted(by_shard) == settings.partition_keys
    for positions in by_shard.values():
        assert positions == list(range(len(positions)))
    assert [len(by_shard[k]) for k in settings.partition_keys] == shard_sizes(n, NUM_SHARDS)
    assert (facts["smallest_shard"], facts["largest_shard"]) == (min(shard_sizes(n, 3)), max(shard_sizes(n, 3)))


def test_slice_files_equal_the_plan_table(release):
    _, settings, _ = release
    rows = plan_table(settings)
    index = read_index(settings.out_root)
    assert index is not None
    assert index["num_shards"] == NUM_SHARDS and index["seed"] == 0
    assert index["num_samples"] == len(rows)
    assert index["shard_lengths"] == shard_sizes(len(rows), NUM_SHARDS)
    assert index["fingerprint"] == expected_fingerprints(settings, log=lambda _m: None)["shuffled_plan"]
    for key in settings.partition_keys:
        got, digest = read_slice(settings.out_root, key)
        want = [SliceRow(*r[1:]) for r in rows if r[0] == key]
        assert got == want
        assert index["digests"][key] == digest
        assert len(got) == index["shard_lengths"][int(key)]


def test_same_seed_gives_the_same_plan_in_a_fresh_catalog_elsewhere(release, tmp_path):
    base, settings, _ = release
    shutil.copytree(base / "raw", tmp_path / "raw-copy")  # another folder, new mtimes
    other = settings_for(tmp_path / "raw-copy", tmp_path)
    build_stages(other)
    assert plan_table(other) == plan_table(settings)
    for key in settings.partition_keys:
        assert read_slice(other.out_root, key) == read_slice(settings.out_root, key)


def test_another_seed_gives_another_order(release, tmp_path):
    base, settings, _ = release
    shutil.copy(settings.catalog, tmp_path / "catalog.duckdb")
    other = settings_for(base / "raw", tmp_path, IMNET_SEED=1)
    build_shuffled_plan(other, "run-plan-2", log=lambda _m: None)
    a, b = plan_table(settings), plan_table(other)
    assert sorted(r[2] for r in a) == sorted(r[2] for r in b)  # the same images
    assert [r[2] for r in a] != [r[2] for r in b]  # in another order
    assert [sum(1 for r in b if r[0] == k) for k in other.partition_keys] == shard_sizes(len(b), NUM_SHARDS)
    old, new = read_index(settings.out_root), read_index(other.out_root)
    assert old["fingerprint"] != new["fingerprint"]
    assert old["digests"] != new["digests"]


def test_more_shards_than_images_leaves_empty_slices(release, tmp_path):
    base, settings, facts = release
    shutil.copy(settings.catalog, tmp_path / "catalog.duckdb")
    n = facts["samples"]
    other = settings_for(base / "raw", tmp_path, IMNET_NUM_SHARDS=n + 5)
    build_shuffled_plan(other, "run-plan-3", log=lambda _m: None)
    index = read_index(other.out_root)
    assert index["shard_lengths"] == shard_sizes(n, n + 5) == [1] * n + [0] * 5
    assert read_slice(other.out_root, f"{n + 4:04d}")[0] == []
    assert index["digests"][f"{n + 4:04d}"] == index["empty_slice_digest"]
    assert sorted(r[2] for r in plan_table(other)) == sorted(r[2] for r in plan_table(settings))


def test_fewer_shards_remove_the_slices_of_shards_gone(release, tmp_path):
    base, settings, facts = release
    shutil.copy(settings.catalog, tmp_path / "catalog.duckdb")
    more = settings_for(base / "raw", tmp_path, IMNET_NUM_SHARDS=NUM_SHARDS + 3)
    build_shuffled_plan(more, "run-plan-more", log=lambda _m: None)
    assert os.path.exists(slice_url(more.out_root, f"{NUM_SHARDS + 2:04d}"))
    fewer = settings_for(base / "raw", tmp_path, IMNET_NUM_SHARDS=NUM_SHARDS)
    said = []
    build_shuffled_plan(fewer, "run-plan-fewer", log=said.append)
    slices = sorted(p.name for p in (tmp_path / "out" / "_plan").glob("*.csv"))
    assert slices == [f"{k}.csv" for k in fewer.partition_keys]
    assert sum("does not have" in m for m in said) == 3, said


def test_rebuilding_the_plan_rewrites_nothing(release):
    _, settings, _ = release
    before = {k: os.stat(slice_url(settings.out_root, k)).st_ino for k in settings.partition_keys}
    index_before = json.loads(open(plan.index_url(settings.out_root)).read())
    build_shuffled_plan(settings, "run-plan-again", log=lambda _m: None)
    after = {k: os.stat(slice_url(settings.out_root, k)).st_ino for k in settings.partition_keys}
    assert before == after
    assert read_index(settings.out_root) == index_before


def test_published_slices_are_byte_for_byte_what_render_slice_writes(release, tmp_path):
    """DuckDB renders the slice text (publish_slices) for speed; the bytes, and so every digest and
    shard fingerprint, must be those of render_slice, also for text that needs CSV quoting (rendered
    in Python), a repaired source, and batches that cut the shard list anywhere."""
    _, settings, _ = release
    shutil.copy(settings.catalog, tmp_path / "catalog.duckdb")
    other = settings_for(settings.raw_root, tmp_path)
    with duckdb.connect(other.catalog) as con:
        first = con.execute("SELECT key FROM plan WHERE shard = '0001' ORDER BY position LIMIT 2").fetchall()
        con.execute("UPDATE plan SET key = 'odd,\"key\"', member = 'a\nb' WHERE key = ?", [first[0][0]])
        con.execute("UPDATE plan SET needs_repair = true WHERE key = ?", [first[1][0]])
        last = con.execute("SELECT key FROM plan WHERE shard = '0002' ORDER BY position LIMIT 1").fetchone()[0]
        con.execute("UPDATE plan SET needs_repair = true WHERE key = ?", [last])
    rows = plan_table(other)
    for batch in (1, 2, 64):
        out = tmp_path / f"out-{batch}"
        with Catalog(other.catalog) as cat:
            digests = plan.publish_slices(cat, str(out), other.partition_keys, batch=batch)
        assert list(digests) == other.partition_keys
        for key in other.partition_keys:
            want = plan.render_slice([r[1:] for r in rows if r[0] == key])
            data = (out / "_plan" / f"{key}.csv").read_bytes()
            assert data == want, key
            assert digests[key] == hashlib.sha256(want).hexdigest()
        got, _ = read_slice(str(out), "0001")
        assert got[0].key == 'odd,"key"' and got[0].member == "a\nb" and got[1].needs_repair is True


def test_plan_rows_outside_the_partition_keys_are_an_error(release, tmp_path):
    _, settings, _ = release
    with Catalog(settings.catalog) as cat, pytest.raises(ValueError, match="outside the partition keys"):
        plan.publish_slices(cat, str(tmp_path / "out"), settings.partition_keys[:1] + ["9999"], batch=8)


def test_split_shards_puts_a_releases_validation_after_the_holdout():
    got = split_shards(6, (("test", 1),), validation_shards=2)
    assert got == {"train": [0, 1, 2, 3, 4], "test": [5], "validation": [6, 7]}
    with pytest.raises(ValueError, match="named 'validation'"):
        split_shards(6, (("validation", 1),), validation_shards=1)
    with pytest.raises(ValueError, match="at most 10,000"):
        split_shards(9999, (), validation_shards=1250)


def test_each_split_is_the_seeded_shuffle_of_its_images_cut_in_order(release, tmp_path):
    """A release with validation: train and validation shards, read in key and position order, hold
    their split's images in the order of md5('<seed>:<key>') (ties by key), each cut by shard_sizes.
    plan_build.sql sorts both splits at once (train first) and numbers validation after train."""
    base, settings, _ = release
    shutil.copy(settings.catalog, tmp_path / "catalog.duckdb")
    other = dataclasses.replace(settings_for(base / "raw", tmp_path, IMNET_SEED=7), release="val", val_per_class=3)
    facts = build_shuffled_plan(other, "run-plan-val", log=lambda _m: None)
    with duckdb.connect(other.catalog, read_only=True) as con:
        rows = con.execute("SELECT shard, key FROM plan WHERE release = 'val' ORDER BY shard, position").fetchall()
    keys = other.partition_keys
    train_keys, validation_keys = keys[:other.num_shards], keys[other.num_shards:]
    train = [k for s, k in rows if s in train_keys]
    validation = [k for s, k in rows if s in validation_keys]
    assert len(train) + len(validation) == len(rows) and facts["validation_samples"] == len(validation) > 0
    for split, shard_keys in ((train, train_keys), (validation, validation_keys)):
        assert split == sorted(split, key=lambda k: (hashlib.md5(f"7:{k}".encode()).hexdigest(), k))
        assert [sum(1 for s, _ in rows if s == k) for k in shard_keys] == shard_sizes(len(split), len(shard_keys))
    assert Counter(k.split("_")[0] for k in validation) == {w: 3 for w in {k.split("_")[0] for k in train}}
