"""Several releases from one catalog (issue 25, SPEC: Releases): a class subset with labels in its
own order, a per-class validation split of its own shards, releases that do not see each other's
plan and shard rows, a default release whose outputs do not change beside another release, lineage
across releases, and the fingerprints that keep the shared index apart from a release's settings."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import duckdb
import pytest
import webdataset as wds

from imnet_assets.read import dataset
from imnet_assets.release import changed_sources
from imnet_assets.release.info import info_url
from imnet_assets.release.lineage import lineage_rows, releases_holding
from imnet_assets.release.plan import read_index, read_slice, shard_sizes
from imnet_assets.release.selection import SelectionError, select
from imnet_assets.sample.sample_raw import write_sample_raw
from imnet_assets.stages.audit import (
    encode_settings,
    expected_shard_fingerprints,
    plan_mismatch,
    run_audit,
)
from imnet_assets.stages.audit_due import shards_as_they_are
from imnet_assets.stages.filtered_index import build_filtered_index
from imnet_assets.stages.fingerprints import listing_fingerprints, stale_stages
from imnet_assets.stages.shard import build_shard
from imnet_assets.stages.shuffled_plan import build_shuffled_plan
from imnet_assets.storage.catalog import Catalog
from imnet_assets.storage.inventory import list_raw
from tests.conftest import build_catalog_stages, local_settings

QUIET = lambda _m: None  # noqa: E731
ABSENT = "n00000001"  # listed by the subset, held by no raw tar: sorts first, so it takes label 0


def query(settings, text: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(settings.catalog, read_only=True) as con:
        return con.execute(text, params or []).fetchall()


def build_release(settings) -> None:
    """A release's plan, every shard and its audit (the shared stages already built)."""
    build_shuffled_plan(settings, f"plan-{settings.release}", log=QUIET)
    for key in settings.partition_keys:
        build_shard(out_root=settings.out_root, raw_root=settings.raw_root, shard_key=key,
                    shard_name=settings.shard_name(key), settings=encode_settings(settings), workers=1,
                    run_id=f"shard-{settings.release}-{key}")
    report = run_audit(settings, f"audit-{settings.release}", log=QUIET)
    assert report.problems == []


def outputs(settings) -> dict[str, str]:
    """sha256 of every file a release publishes (shards, _info.json, card, classes.tsv)."""
    root = Path(settings.out_root)
    names = [settings.shard_name(k) for k in settings.partition_keys] + ["_info.json", "README.md", "classes.tsv"]
    return {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in names}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """One raw release, one catalog: the default release, a subset release (3 of the raw synsets
    and one absent synset, 2 validation images a class) and the default release built alone in a
    catalog of its own, to compare with."""
    base = tmp_path_factory.mktemp("releases")
    write_sample_raw(base / "raw", synsets=5, images=14, seed=2, hostile_names=False)
    default = local_settings(base / "raw", base, IMNET_NUM_SHARDS=3, IMNET_HOLDOUT="test:1")
    build_catalog_stages(default)
    wnids = [w for (w,) in query(default, "SELECT wnid FROM synsets ORDER BY wnid")]
    listed = [wnids[3], wnids[0], wnids[4], ABSENT]  # any order: labels follow the sorted list
    (base / "subset.txt").write_text("# a subset\n" + "\n".join(listed) + "\n")
    subset = dataclasses.replace(default, release="sub", out_root=str(base / "sub"), synsets=str(base / "subset.txt"),
                                 num_shards=2, holdout=(), val_per_class=2, seed=7)
    build_release(subset)
    for key in default.partition_keys:  # the default release, after the subset's audit
        build_shard(out_root=default.out_root, raw_root=default.raw_root, shard_key=key,
                    shard_name=default.shard_name(key), settings=encode_settings(default), workers=1,
                    run_id=f"shard--{key}")
    assert run_audit(default, "audit-default", log=QUIET).problems == []
    assert run_audit(subset, "audit-sub-again", log=QUIET).problems == []  # after the default's
    jpeg = dataclasses.replace(default, release="jpeg", out_root=str(base / "jpeg"), codec="jpeg")
    build_release(jpeg)  # the default release's selection and shard layout, as JPEG
    alone = local_settings(base / "raw", base / "alone", IMNET_NUM_SHARDS=3, IMNET_HOLDOUT="test:1")
    build_catalog_stages(alone)
    for key in alone.partition_keys:
        build_shard(out_root=alone.out_root, raw_root=alone.raw_root, shard_key=key, shard_name=alone.shard_name(key),
                    settings=encode_settings(alone), workers=1, run_id=f"shard--{key}")
    assert run_audit(alone, "audit-alone", log=QUIET).problems == []
    return dataclasses.make_dataclass("Family", ["default", "subset", "jpeg", "alone", "wnids", "listed"])(
        default, subset, jpeg, alone, wnids, listed)


def test_a_subset_release_holds_exactly_its_classes_kept_images_with_labels_in_subset_order(family):
    s = family.subset
    listed = sorted(family.listed)
    assert listed[0] == ABSENT
    labels = {w: i for i, w in enumerate(listed)}  # the list as given, sorted: the absent synset keeps label 0
    kept = query(s, "SELECT key, wnid FROM images WHERE status = 'kept' AND list_contains(?, wnid)", [listed])
    planned = query(s, "SELECT key, wnid, label FROM plan WHERE release = 'sub'")
    assert sorted((k, w) for k, w, _ in planned) == sorted(kept) and kept
    assert all(label == labels[w] for _, w, label in planned)
    # Every shard's samples carry those labels (.cls and .json), train and validation alike.
    seen = Counter()
    for name in [s.shard_name(k) for k in s.partition_keys]:
        for sample in wds.WebDataset([os.path.join(s.out_root, name)], shardshuffle=False):
            meta = json.loads(sample["json"])
            assert int(sample["cls"]) == meta["label"] == labels[meta["class_name"]]
            seen[meta["class_name"]] += 1
    assert seen == Counter(w for _, w in kept)
    # classes.tsv: one row per label, the absent synset with a count of 0.
    rows = [line.split("\t") for line in (Path(s.out_root) / "classes.tsv").read_text().splitlines()[1:]]
    assert [(int(r[0]), r[1], int(r[4])) for r in rows] == [(labels[w], w, seen.get(w, 0)) for w in listed]
    card = (Path(s.out_root) / "README.md").read_text()
    assert "1 of them are not in the raw release" in card and "## Release" in card
    assert "gives all but one of them (none here)." in card


def test_each_class_has_exactly_n_validation_images_disjoint_from_train_and_seeded(family, tmp_path):
    s = family.subset
    info = json.loads(Path(info_url(s)).read_text())
    assert sorted(info["splits"]) == ["train", "validation"] and info["name"] == "sub"
    assert info["splits"]["validation"]["filenames"] == ["imagenet12k-validation-0000.tar"]
    assert info["splits"]["train"]["filenames"] == ["imagenet12k-train-0000.tar", "imagenet12k-train-0001.tar"]
    split_of = {}
    for name, split in info["splits"].items():
        for fname, n in zip(split["filenames"], split["shard_lengths"]):
            got = [json.loads(x["json"])["class_name"] + "/" + x["__key__"]
                   for x in wds.WebDataset([os.path.join(s.out_root, fname)], shardshuffle=False)]
            assert len(got) == n
            for item in got:
                assert item not in split_of, f"{item} in {split_of.get(item)} and {name}"  # disjoint
                split_of[item] = name
    per_class = Counter(item.split("/")[0] for item, name in split_of.items() if name == "validation")
    present = [w for w in family.listed if w != ABSENT]
    assert per_class == Counter({w: 2 for w in present})
    # Each split reads as users read it (its shards from _info.json), labels in 0 .. classes-1.
    for name, split in info["splits"].items():
        labels = [label for _, label in dataset(s.out_root, split=name)]
        assert len(labels) == split["num_samples"] > 0 and set(labels) <= set(range(len(family.listed)))
    # Seeded: the same settings in another catalog choose the same images; another seed others.
    chosen = sorted(k for (k,) in query(s, "SELECT key FROM plan WHERE release = 'sub' AND shard >= '0002'"))
    again = dataclasses.replace(s, catalog=str(tmp_path / "c.duckdb"), out_root=str(tmp_path / "out"))
    shutil.copy(s.catalog, again.catalog)
    build_shuffled_plan(again, "plan-again", log=QUIET)
    assert sorted(k for (k,) in query(again, "SELECT key FROM plan WHERE release = 'sub' AND shard >= '0002'")) == chosen
    other = dataclasses.replace(again, seed=8)
    build_shuffled_plan(other, "plan-other", log=QUIET)
    assert sorted(k for (k,) in query(other, "SELECT key FROM plan WHERE release = 'sub' AND shard >= '0002'")) != chosen


def test_a_class_with_too_few_images_keeps_one_for_train(family, tmp_path):
    s = dataclasses.replace(family.subset, catalog=str(tmp_path / "c.duckdb"), out_root=str(tmp_path / "out"),
                            val_per_class=1000)
    shutil.copy(family.subset.catalog, s.catalog)
    facts = build_shuffled_plan(s, "plan-many", log=QUIET)
    per_class = query(s, "SELECT wnid, count(*), count(*) FILTER (WHERE shard >= '0002') FROM plan "
                         "WHERE release = 'sub' GROUP BY wnid ORDER BY wnid")
    assert per_class and all(val == n - 1 for _, n, val in per_class)
    assert facts["validation_short_classes"] == len(per_class)
    index = read_index(s.out_root)
    assert index["shard_lengths"][2:] == shard_sizes(sum(v for *_, v in per_class), 1)
    rows, _ = read_slice(s.out_root, "0002")
    assert len(rows) == sum(v for *_, v in per_class)


def test_two_releases_in_one_catalog_keep_their_own_plan_and_shard_rows(family):
    d, s = family.default, family.subset
    for table in ("plan", "shard_samples", "shards"):
        per = dict(query(d, f"SELECT release, count(*) FROM {table} GROUP BY release"))
        assert set(per) == {"", "sub", "jpeg"}
    kept = query(d, "SELECT count(*) FROM images WHERE status = 'kept'")[0][0]
    assert query(d, "SELECT count(*) FROM plan WHERE release = ''")[0][0] == kept
    assert sorted(r for (r,) in query(d, "SELECT release FROM stages WHERE stage = 'shard_audit'")) == ["", "jpeg", "sub"]
    # The default release's audit, run after the subset's, left the subset's rows; and again.
    before = query(d, "SELECT shard, sha256 FROM shards WHERE release = 'sub' ORDER BY shard")
    build_shuffled_plan(d, "plan-default-again", log=QUIET)
    assert query(d, "SELECT shard, sha256 FROM shards WHERE release = 'sub' ORDER BY shard") == before
    assert query(d, "SELECT count(*) FROM plan WHERE release = 'sub'")[0][0] == sum(read_index(s.out_root)["shard_lengths"])
    # Making one release's plan again leaves the other's shards fresh (its plan, slices and shards untouched).
    assert shards_as_they_are(s)[0] is not None
    assert shards_as_they_are(d)[0] is not None  # same inputs: the same slices, so its own shards too
    # Each release's slices are published under its own out root, with its own labels.
    sub_slice, _ = read_slice(s.out_root, "0000")
    labels = {w: i for i, w in enumerate(sorted(family.listed))}
    assert all(r.label == labels[r.wnid] for r in sub_slice)


def test_the_default_release_is_unchanged_beside_another_release(family):
    assert outputs(family.default) == outputs(family.alone)


def test_lineage_names_every_release_and_shard_holding_the_image(family):
    d = family.default
    key, = query(d, "SELECT key FROM plan WHERE release = 'sub' ORDER BY key LIMIT 1")[0]
    with Catalog(d.catalog, read_only=True) as cat:
        rows = lineage_rows(cat, key)
    held = releases_holding(rows)
    assert sorted(held) == ["", "jpeg", "sub"]
    for row in rows:
        assert row["path"] and row["webp_sha256"] and row["position"] is not None
    want = dict(query(d, "SELECT release, shard FROM plan WHERE key = ?", [key]))
    assert {r: shards[0] for r, shards in held.items()} == want


def test_one_releases_settings_make_only_its_own_plan_stale(family):
    d, s = family.default, family.subset
    listing = list_raw(d.raw_root)
    fp = lambda settings: listing_fingerprints(listing, settings)  # noqa: E731
    base, sub = fp(d), fp(s)
    assert base["filtered_index"] == sub["filtered_index"]  # the index is shared
    assert base["shuffled_plan"] != sub["shuffled_plan"]
    # Codec and quality make only shards stale: the plan's fingerprint stays.
    assert fp(dataclasses.replace(s, codec="jpeg", jpeg_quality=80, max_short_edge=512)) == sub
    assert fp(dataclasses.replace(s, num_shards=4))["shuffled_plan"] != sub["shuffled_plan"]
    assert fp(dataclasses.replace(s, val_per_class=3))["shuffled_plan"] != sub["shuffled_plan"]
    with Catalog(d.catalog, read_only=True) as cat:
        assert cat.stage_fingerprint("shuffled_plan", "") == base["shuffled_plan"]
        assert cat.stage_fingerprint("shuffled_plan", "sub") == sub["shuffled_plan"]
    # An edited list makes the subset's plan stale.
    path = Path(s.synsets)
    text = path.read_text()
    try:
        path.write_text(text + family.wnids[1] + "\n")
        assert fp(s)["shuffled_plan"] != sub["shuffled_plan"]
    finally:
        path.write_text(text)


def test_a_list_the_raw_release_holds_none_of_is_an_error(family, tmp_path):
    (tmp_path / "none.txt").write_text("n99999999\n")
    s = dataclasses.replace(family.subset, synsets=str(tmp_path / "none.txt"), out_root=str(tmp_path / "out"))
    with pytest.raises(SelectionError, match="none of its 1 synsets"):
        build_shuffled_plan(s, "plan-none", log=QUIET)
    (tmp_path / "twice.txt").write_text(f"{family.wnids[0]}\n{family.wnids[0]}\n")
    with pytest.raises(SelectionError, match="listed twice"):
        build_shuffled_plan(dataclasses.replace(s, synsets=str(tmp_path / "twice.txt")), "p", log=QUIET)


def test_a_catalog_made_before_releases_is_migrated_keeping_its_records(tmp_path):
    path = str(tmp_path / "old.duckdb")
    with duckdb.connect(path) as con:  # the two tables whose primary keys gain the release, as they were
        con.execute("CREATE TABLE stages (stage VARCHAR PRIMARY KEY, input_fingerprint VARCHAR, run_id VARCHAR, "
                    "updated_at TIMESTAMP)")
        con.execute("INSERT INTO stages VALUES ('shuffled_plan', 'fp-plan', 'r1', now()::TIMESTAMP)")
        con.execute("CREATE TABLE shards (shard VARCHAR PRIMARY KEY, path VARCHAR, num_samples INTEGER, "
                    "planned INTEGER, bytes BIGINT, sha256 VARCHAR, fingerprint VARCHAR, plan_digest VARCHAR, "
                    "run_id VARCHAR, code_version VARCHAR, written_at VARCHAR, seconds DOUBLE)")
        con.execute("INSERT INTO shards (shard, path, num_samples) VALUES ('0000', 'a.tar', 5)")
    with Catalog(path, read_only=True) as cat:  # a reader: migrated first, by a short writer
        assert not cat.made_before_releases()
        assert cat.stage_fingerprint("shuffled_plan") == "fp-plan"
        assert cat.stage_fingerprint("shuffled_plan", "sub") is None
    with Catalog(path) as cat:
        cat.con.execute("INSERT INTO shards (shard, path, num_samples, release) VALUES ('0000', 'b.tar', 3, 'sub')")
        assert sorted(cat.con.execute("SELECT release, shard, path FROM shards").fetchall()) == [
            ("", "0000", "a.tar"), ("sub", "0000", "b.tar")]


def test_a_changed_source_marked_under_one_release_makes_the_shared_index_stale(family, tmp_path):
    """A shard run of any release marks a changed source under its own out root; the shared index
    answers for every release's markers and clears each where it was left."""
    d = dataclasses.replace(family.default, catalog=str(tmp_path / "c.duckdb"))
    shutil.copy(family.default.catalog, d.catalog)
    roots = [d.out_root, family.subset.out_root]
    tar = f"{family.listed[0]}.tar"
    assert stale_stages(d, log=QUIET, marker_roots=roots) == []
    err = changed_sources.SourceChanged("changed", tar, "m.JPEG", "1" * 64)
    url = changed_sources.mark(family.subset.out_root, err, 512, 100, "0" * 64, "0000", "shard-sub")
    try:
        assert stale_stages(d, log=QUIET) == []  # the default release's root alone: no marker
        assert stale_stages(d, log=QUIET, marker_roots=roots) == ["filtered_index", "shuffled_plan"]
        build_filtered_index(d, "index-again", log=QUIET, marker_roots=roots)
        assert changed_sources.pending(family.subset.out_root) == {}
        with Catalog(d.catalog, read_only=True) as cat:  # every release's plan is made again
            assert cat.stage_fingerprint("shuffled_plan", "") is None
            assert cat.stage_fingerprint("shuffled_plan", "sub") is None
    finally:
        if os.path.exists(url):
            os.remove(url)


def test_shards_of_a_plan_made_for_another_selection_are_not_fresh(family):
    s = family.subset
    assert plan_mismatch(s, read_index(s.out_root)) is None
    assert set(expected_shard_fingerprints(s)) == set(s.partition_keys) == {"0000", "0001", "0002"}
    for other in (dataclasses.replace(s, val_per_class=3), dataclasses.replace(s, synsets="all")):
        assert "materialize shuffled_plan" in plan_mismatch(other, read_index(s.out_root))
        assert expected_shard_fingerprints(other) == {}
    # the default release's published plan names no selection: it is the default one
    d = family.default
    assert "synsets" not in read_index(d.out_root) and plan_mismatch(d, read_index(d.out_root)) is None


def test_shipped_lists_give_their_own_labels_whatever_the_raw_release_holds():
    from imnet_assets.release.altlabels import in1k_labels

    in1k = sorted(in1k_labels())
    chosen = select("in1k", [in1k[5], in1k[700], "n99999999"])
    assert chosen.wnids == tuple(in1k) and len(chosen.absent) == 998
    labels = dict(chosen.rows)
    assert (labels[in1k[5]], labels[in1k[700]]) == (5, 700)  # ImageNet-1k's own labels
    assert "998 of the 1000 synsets of 'in1k' are not in the raw release" in chosen.note()
    everything = select("all", ["n2", "n1"])
    assert everything.rows == [("n1", 0), ("n2", 1)] and everything.note() is None


def test_validation_shards_follow_the_train_shards_with_a_pattern_of_their_own():
    from imnet_assets.settings import Settings

    s = Settings(num_shards=16, val_per_class=10)
    assert s.validation_shards == 2 and s.partition_keys[-3:] == ["0015", "0016", "0017"]
    assert [s.shard_name(k) for k in ("0015", "0016", "0017")] == [
        "imagenet12k-train-0015.tar", "imagenet12k-validation-0000.tar", "imagenet12k-validation-0001.tar"]
    plain = dataclasses.replace(s, shard_pattern="w21-{shard}.tar")
    assert plain.shard_name("0016") == "validation-w21-0000.tar"
    assert dataclasses.replace(s, val_per_class=0).partition_keys[-1] == "0015"  # no validation: as before
    assert Settings(num_shards=1, val_per_class=1).validation_shards == 1


def test_a_jpeg_variant_holds_the_default_releases_plan_as_jpeg_and_stands_alone(family, tmp_path):
    d, j = family.default, family.jpeg
    plan = "SELECT key, shard, position, label FROM plan WHERE release = ? ORDER BY ALL"
    assert query(d, plan, [""]) == query(d, plan, ["jpeg"])  # same selection, seed and shards
    first = wds.WebDataset([os.path.join(j.out_root, j.shard_name("0000"))], shardshuffle=False)
    assert all("jpg" in sample and "webp" not in sample for sample in first)
    assert set(expected_shard_fingerprints(d).values()).isdisjoint(expected_shard_fingerprints(j).values())
    # Its shards removed, the JPEG release is not in; the default release's shards still are.
    moved = tmp_path / "moved"
    shutil.move(os.path.join(j.out_root, j.shard_name("0001")), moved)
    try:
        assert shards_as_they_are(j)[0] is None and "0001" in shards_as_they_are(j)[1]
        assert shards_as_they_are(d)[0] is not None and shards_as_they_are(family.subset)[0] is not None
    finally:
        shutil.move(moved, os.path.join(j.out_root, j.shard_name("0001")))


def test_the_in12k_list_gives_timms_labels():
    from importlib import resources

    text = (resources.files("imnet_assets") / "lists" / "imagenet12k_wnids.txt").read_text()
    wnids = sorted(w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#"))
    assert len(wnids) == 11_821
    chosen = select("in12k", [wnids[0], wnids[11_820]])
    assert dict(chosen.rows)[wnids[11_820]] == 11_820 and len(chosen.absent) == 11_819
