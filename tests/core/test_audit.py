"""shard_audit on a tiny built release: reconciliation, `_info.json`, and what it reports when a
shard is missing or a manifest lists a sample twice."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import types
from pathlib import Path

import duckdb
import pytest
import webdataset as wds

from imnet_assets.release.info import DATASET_NAME, info_url
from imnet_assets.release.outroot import manifest_limits, manifest_url, state_url
from imnet_assets.release.plan import read_index, shard_sizes
from imnet_assets.sample.sample_raw import write_sample_raw
from imnet_assets.settings import Settings
from imnet_assets.stages.audit import (
    audit_fingerprint,
    check_info,
    encode_settings,
    expected_shard_fingerprints,
    info_differences,
    run_audit,
    stray_shards,
)
from imnet_assets.stages.shard import build_shard
from tests.conftest import build_catalog_stages, local_settings

QUIET = lambda _m: None  # noqa: E731
NUM_SHARDS = 3


settings_for = functools.partial(local_settings, IMNET_NUM_SHARDS=NUM_SHARDS, IMNET_HOLDOUT="validation:1")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Raw release, catalog stages and every shard built once (the audit not run yet)."""
    base = tmp_path_factory.mktemp("audit")
    write_sample_raw(base / "raw", synsets=2, images=20, seed=0)
    settings = settings_for(base / "raw", base)
    build_catalog_stages(settings)
    for key in settings.partition_keys:
        build_shard(out_root=settings.out_root, raw_root=settings.raw_root, shard_key=key,
                    shard_name=settings.shard_name(key), settings=encode_settings(settings),
                    workers=1, run_id=f"run-shard-{key}")
    return base


@pytest.fixture
def copy(release, tmp_path):
    """A private copy of the built out root and catalog (the raw release is shared, read-only)."""
    shutil.copytree(release / "out", tmp_path / "out")
    shutil.copy(release / "catalog.duckdb", tmp_path / "catalog.duckdb")
    return types.SimpleNamespace(folder=tmp_path, settings=settings_for(release / "raw", tmp_path),
                                 raw=release / "raw")


def query(settings: Settings, text: str) -> list[tuple]:
    with duckdb.connect(settings.catalog, read_only=True) as con:
        return con.execute(text).fetchall()


def test_clean_release_audits_without_problems_and_writes_info(copy):
    s = copy.settings
    assert not os.path.exists(info_url(s))
    report = run_audit(s, "run-audit", log=QUIET)
    assert report.problems == []
    assert report.missing == [] and report.stale == [] and report.bad_files == []
    r = report.reconcile
    assert r["planned"] > 0 and r["written"] == r["planned"] - r["excluded_at_encode"]
    assert (r["lost"], r["duplicated"], r["misplaced"], r["unplanned"]) == (0, 0, 0, 0)
    assert report.info_written

    info = json.loads(open(info_url(s)).read())
    assert info["name"] == DATASET_NAME
    assert list(info["splits"]) == ["train", "validation"]
    names = [s.shard_name(k) for k in s.partition_keys]
    train, val = info["splits"]["train"], info["splits"]["validation"]
    assert train["name"] == "train" and val["name"] == "validation"
    assert train["filenames"] == names[:2]  # the holdout takes the last shard
    assert val["filenames"] == names[2:]
    # shard_lengths are what the tars hold, num_samples their sum.
    for split in (train, val):
        assert split["num_samples"] == sum(split["shard_lengths"])
        for fname, n in zip(split["filenames"], split["shard_lengths"]):
            assert sum(1 for _ in wds.WebDataset([os.path.join(s.out_root, fname)], shardshuffle=False)) == n
    kept = query(s, "SELECT count(*) FROM images WHERE status = 'kept'")[0][0]
    assert train["num_samples"] + val["num_samples"] == kept == r["written"]
    assert train["shard_lengths"] + val["shard_lengths"] == shard_sizes(r["planned"], NUM_SHARDS)
    assert check_info(s) == []

    # The catalog's shard tables now hold what the shards hold.
    shards = query(s, "SELECT shard, path, num_samples, bytes, sha256, run_id FROM shards ORDER BY shard")
    assert [row[0] for row in shards] == s.partition_keys
    for key, path, _n, size, sha, run_id in shards:
        data = open(os.path.join(s.out_root, path), "rb").read()
        assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
        assert run_id == f"run-shard-{key}"
    assert [row[2] for row in shards] == train["shard_lengths"] + val["shard_lengths"]
    assert query(s, "SELECT count(*), count(DISTINCT key) FROM shard_samples")[0] == (kept, kept)
    mismatched = query(s, "SELECT count(*) FROM shard_samples ss JOIN plan p USING (key) "
                          "WHERE ss.shard <> p.shard OR ss.position <> p.position")[0][0]
    assert mismatched == 0
    assert report.totals["samples"] == kept and report.totals["shards"] == NUM_SHARDS
    assert [row["written"] for row in report.per_shard] == [row[2] for row in shards]


def test_info_without_holdout_has_only_train(copy):
    s = settings_for(copy.raw, copy.folder, IMNET_HOLDOUT="")
    report = run_audit(s, "run-audit", log=QUIET)
    assert report.problems == []
    info = json.loads(open(info_url(s)).read())
    assert list(info["splits"]) == ["train"]
    assert info["splits"]["train"]["filenames"] == [s.shard_name(k) for k in s.partition_keys]
    assert info["splits"]["train"]["num_samples"] == report.reconcile["written"]


def test_audit_is_repeatable(copy):
    first = run_audit(copy.settings, "run-a", log=QUIET)
    info = open(info_url(copy.settings), "rb").read()
    second = run_audit(copy.settings, "run-b", log=QUIET)
    assert second.problems == [] and second.reconcile == first.reconcile
    assert open(info_url(copy.settings), "rb").read() == info


def test_deleted_shard_is_reported_missing_and_info_is_not_rewritten(copy):
    s = copy.settings
    run_audit(s, "run-1", log=QUIET)
    info_path = info_url(s)
    before = open(info_path, "rb").read()
    stamp = os.stat(info_path).st_mtime_ns - 10_000_000_000
    os.utime(info_path, ns=(stamp, stamp))
    gone = s.partition_keys[1]
    planned_there = read_index(s.out_root)["shard_lengths"][1]
    os.unlink(os.path.join(s.out_root, s.shard_name(gone)))

    logged: list[str] = []
    report = run_audit(s, "run-2", log=logged.append)
    assert report.missing == [gone]
    assert not report.info_written
    assert any("missing" in p and gone in p for p in report.problems)
    assert report.reconcile["lost"] == planned_there
    assert any("_info.json not written" in m for m in logged)
    assert open(info_path, "rb").read() == before
    assert os.stat(info_path).st_mtime_ns == stamp
    assert query(s, "SELECT shard FROM shards ORDER BY shard") == [(k,) for k in s.partition_keys if k != gone]
    # Not fresh: the next build runs the audit again instead of taking this one as done.
    assert query(s, "SELECT count(*) FROM stages WHERE stage = 'shard_audit'") == [(0,)]


def test_only_a_clean_audit_is_recorded_as_fresh(copy):
    s = copy.settings
    run_audit(s, "run-1", log=QUIET)
    assert query(s, "SELECT input_fingerprint, run_id FROM stages WHERE stage = 'shard_audit'") == [
        (audit_fingerprint(s), "run-1")]
    # A problem that changes no shard, so the audit's input fingerprint stays the same.
    (copy.folder / "out" / s.shard_name("0009")).write_bytes(b"stray")
    assert run_audit(s, "run-2", log=QUIET).problems
    assert query(s, "SELECT count(*) FROM stages WHERE stage = 'shard_audit'") == [(0,)]
    os.unlink(copy.folder / "out" / s.shard_name("0009"))
    assert run_audit(s, "run-3", log=QUIET).problems == []
    assert query(s, "SELECT run_id FROM stages WHERE stage = 'shard_audit'") == [("run-3",)]


def test_missing_manifest_counts_as_missing_shard(copy):
    s = copy.settings
    key = s.partition_keys[0]
    os.unlink(manifest_url(s.out_root, key))
    report = run_audit(s, "run", log=QUIET)
    assert report.missing == [key] and not report.info_written
    assert not os.path.exists(info_url(s))


def test_a_manifest_not_the_committed_one_is_not_loaded_and_its_commit_is_forgotten(copy):
    """A manifest edited after its run committed it (still valid JSON, the catalog would take it) is
    not what a catalog may be rebuilt from: the audit names it, does not load it, and removes its
    shard's commit record so the next build writes the shard again."""
    s = copy.settings
    key = s.partition_keys[0]
    path = Path(manifest_url(s.out_root, key))
    data = path.read_bytes()
    at = data.index(b'"webp_sha256":"') + 20
    path.write_bytes(data[:at] + (b"0" if data[at:at + 1] != b"0" else b"1") + data[at + 1:])
    report = run_audit(s, "run", log=QUIET)
    assert report.missing == [key] and not report.info_written
    assert any(p.startswith(f"shard {key}: its manifest") and "missing or damaged" in p for p in report.problems)
    assert not os.path.exists(state_url(s.out_root, key))
    assert query(s, f"SELECT count(*) FROM shard_samples WHERE shard = '{key}'") == [(0,)]


def committed_manifest(s: Settings, key: str, manifest: dict, pad: int = 0) -> None:
    """Write `manifest` as `key`'s run would have committed it: its commit record names the
    manifest's size, stamp and sha256 (else the audit takes it for damage and does not load it).
    `pad`: spaces after the document (it still parses)."""
    url = manifest_url(s.out_root, key)
    data = json.dumps(manifest).encode() + b" " * pad
    Path(url).write_bytes(data)
    st = os.stat(url)
    record = json.loads(Path(state_url(s.out_root, key)).read_bytes())
    record.update(manifest_bytes=st.st_size, manifest_stamp=str(st.st_mtime),
                  manifest_sha256=hashlib.sha256(data).hexdigest())
    Path(state_url(s.out_root, key)).write_text(json.dumps(record, sort_keys=True))


def _process_rchar() -> int:
    """Bytes this process has read through read(2) and pread(2), DuckDB's threads included."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_a_manifest_larger_than_its_plan_allows_is_damaged_and_never_read_whole(copy):
    """A manifest far larger than one of its shard's planned samples can be (here even committed
    so: its record names its size, stamp and sha256, and it parses) is damaged, as one that is not
    the committed one: not loaded, its commit forgotten, the shard built again; never read whole
    (a huge one would take the audit's memory), nor by `imnet verify`'s check of it."""
    from imnet_assets.release.verify_runs import manifest_problems

    s = copy.settings
    key = s.partition_keys[0]
    limit = manifest_limits(s.partition_keys, read_index(s.out_root))[key]
    manifest = json.loads(Path(manifest_url(s.out_root, key)).read_bytes())
    committed_manifest(s, key, manifest, pad=48 << 20)
    huge = os.stat(manifest_url(s.out_root, key)).st_size
    assert limit < (2 << 20) < huge
    record = json.loads(Path(state_url(s.out_root, key)).read_bytes())
    shard = {"shard": key, "planned": manifest["planned"], "sha256": record["sha256"], "run_id": record["run_id"]}
    assert manifest_problems(s.out_root, shard) == [
        f"its manifest {manifest_url(s.out_root, key)} is damaged (over {limit:,} bytes, more than a manifest of "
        "its planned samples can hold)"]
    before = _process_rchar()
    report = run_audit(s, "run", log=QUIET)
    assert _process_rchar() - before < huge / 4
    assert report.missing == [key] and not report.info_written
    assert any(p.startswith(f"shard {key}: its manifest") and f"holds more than {limit:,} bytes" in p
               for p in report.problems), report.problems
    assert not os.path.exists(state_url(s.out_root, key))
    assert query(s, f"SELECT count(*) FROM shard_samples WHERE shard = '{key}'") == [(0,)]


def test_duplicated_sample_in_a_manifest_is_reported(copy):
    s = copy.settings
    key = s.partition_keys[0]
    path = manifest_url(s.out_root, key)
    manifest = json.loads(open(path).read())
    manifest["samples"].append(dict(manifest["samples"][0]))
    committed_manifest(s, key, manifest)
    report = run_audit(s, "run", log=QUIET)
    assert report.reconcile["duplicated"] == 1
    assert any("duplicated" in p for p in report.problems)
    assert report.reconcile["lost"] == 0
    assert not report.info_written and not os.path.exists(info_url(s))


def test_sample_in_the_wrong_shard_is_misplaced(copy):
    s = copy.settings
    a, b = (manifest_url(s.out_root, k) for k in s.partition_keys[:2])
    ma, mb = json.loads(open(a).read()), json.loads(open(b).read())
    moved = ma["samples"].pop()
    mb["samples"].append(moved)
    for k, m in zip(s.partition_keys[:2], (ma, mb)):
        committed_manifest(s, k, m)
    report = run_audit(s, "run", log=QUIET)
    assert report.reconcile["misplaced"] == 1
    assert report.reconcile["lost"] == 1 and report.reconcile["lost_examples"] == [moved["key"]]
    assert report.problems
    assert not report.info_written and not os.path.exists(info_url(s))


def test_shard_from_other_settings_is_stale(copy):
    s = settings_for(copy.raw, copy.folder, IMNET_WEBP_QUALITY=encode_settings(copy.settings).quality - 1)
    assert expected_shard_fingerprints(s) != expected_shard_fingerprints(copy.settings)
    report = run_audit(s, "run", log=QUIET)
    assert report.stale == s.partition_keys
    assert not report.info_written


def test_audit_without_a_plan_is_a_clear_error(tmp_path):
    s = settings_for(tmp_path / "raw", tmp_path)
    with pytest.raises(FileNotFoundError, match="shuffled_plan"):
        run_audit(s, "run", log=QUIET)


def test_remote_out_root_loads_every_manifest_in_one_statement(copy):
    """On a remote out root the manifests are copied into a spool folder beside the catalog (all
    in flight at once) and loaded from there in one statement, not read one by one through
    DuckDB; the spool is gone afterwards, and a killed audit's leftover spool is swept."""
    import fsspec

    from imnet_assets.stages import audit as audit_module
    from imnet_assets.storage.catalog import Catalog

    mem = fsspec.filesystem("memory")
    root = "memory://audit-remote/out"
    local = copy.folder / "out"
    for path in local.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if path.name.endswith(".state.json"):  # the memory store has no mtime to compare with
                data = json.dumps({k: v for k, v in json.loads(data).items()
                                   if k not in ("stamp", "manifest_stamp", "manifest_bytes")}).encode()
            mem.pipe(f"/audit-remote/out/{path.relative_to(local).as_posix()}", data)
    s = settings_for(copy.raw, copy.folder, IMNET_OUT_ROOT=root)
    catalog_folder = Path(s.catalog).resolve().parent
    leftover = catalog_folder / f"{audit_module.SPOOL_PREFIX}killed"
    leftover.mkdir()
    (leftover / "0000.json").write_text("{}")
    try:
        with Catalog(s.catalog) as cat:
            heads = audit_module._load_manifests(cat, s)
        assert heads is not None and sorted(heads) == s.partition_keys
        spooled = {Path(h["filename"]).parent for h in heads.values()}
        assert len(spooled) == 1 and spooled.pop().parent == catalog_folder
        assert not list(catalog_folder.glob(f"{audit_module.SPOOL_PREFIX}*"))  # the spool, and the leftover
        report = run_audit(s, "run-remote", log=QUIET)
        assert report.problems == [] and report.info_written
        r = report.reconcile
        assert r["written"] == r["planned"] - r["excluded_at_encode"] > 0
        assert query(s, "SELECT count(*) FROM shards")[0][0] == NUM_SHARDS
    finally:
        mem.rm("/audit-remote", recursive=True)


def test_stray_shard_files_fail_the_audit(copy):
    """A build with more shards leaves its higher-numbered shards behind when IMNET_NUM_SHARDS is
    lowered: they repeat this release's images, so the audit names them and publishes nothing."""
    s = copy.settings
    out = copy.folder / "out"
    first = out / s.shard_name(s.partition_keys[0])
    for name in (s.shard_name("0003"), s.shard_name("0010"), "imagenet12k-train-0003.tar.tmp",
                 "imagenet12k-train-03.tar", "other-0004.tar"):
        shutil.copy(first, out / name)
    report = run_audit(s, "run", log=QUIET)
    assert report.stray == [s.shard_name("0003"), s.shard_name("0010")]
    assert report.reconcile["lost"] == report.reconcile["duplicated"] == 0
    assert any("not shards of this release" in p and s.shard_name("0010") in p for p in report.problems)
    assert not report.info_written and not os.path.exists(info_url(s))
    for name in (s.shard_name("0003"), s.shard_name("0010")):
        os.unlink(out / name)
    assert run_audit(s, "run", log=QUIET).problems == []


def test_stray_shards_follow_the_shard_pattern(copy):
    s = settings_for(copy.raw, copy.folder, IMNET_SHARD_PATTERN="w21-{{v2}}-{shard}.tar")
    out = copy.folder / "out"
    for name in ("w21-{v2}-0007.tar", "w21-{v2}-0001.tar", "imagenet12k-train-0007.tar", "w21-v2-0007.tar"):
        (out / name).write_bytes(b"x")
    assert stray_shards(s) == ["w21-{v2}-0007.tar"]  # 0001 is one of its 3 shards


def test_check_info_wants_exactly_the_document_the_audit_writes(copy):
    s = copy.settings
    assert run_audit(s, "run", log=QUIET).info_written
    path = info_url(s)
    good = json.loads(open(path).read())
    assert check_info(s) == [] and info_differences(good, good) == []

    def variant(change) -> list[str]:
        doc = json.loads(json.dumps(good))
        change(doc)
        with open(path, "w") as f:
            json.dump(doc, f)
        problems = check_info(s)
        assert problems == info_differences(doc, good)
        return problems

    train = "'train'"
    assert variant(lambda d: d["splits"]["train"].update(num_samples=999)) == [
        f"_info.json split {train}: num_samples is 999, expected {good['splits']['train']['num_samples']}"]
    assert "same entries in another order (first at position 0" in variant(
        lambda d: d["splits"]["train"]["filenames"].reverse())[0]
    assert variant(lambda d: d["splits"].update(test=d["splits"]["validation"])) == [
        "_info.json split 'test' is not one of this release's splits ['train', 'validation']"]
    dropped = variant(lambda d: d["splits"].pop("validation"))
    assert dropped == ["_info.json split 'validation' is missing"]
    moved = variant(lambda d: d["splits"]["train"]["filenames"].append(d["splits"]["validation"]["filenames"][0]))
    assert moved == [f"_info.json split {train}: filenames 3 entries, expected 2; not expected: "
                     f"['{s.shard_name('0002')}']"]
    assert variant(lambda d: d.update(name="x"))[0].startswith("_info.json name 'x'")
    assert variant(lambda d: d.update(extra=1)) == ["_info.json has fields the audit does not write: ['extra']"]
    assert variant(lambda d: d.update(splits=[])) == ["_info.json has no 'splits' object"]


@pytest.mark.parametrize("damage, named", [
    # a tar's rows lost after its scan was recorded (the kill bug this guards against)
    ("DELETE FROM images WHERE rowid = (SELECT min(rowid) FROM images WHERE tar = '{tar}')",
     "tar {tar}: 20 members counted from its headers, 19 images rows"),
    # a tar whose scan never finished
    ("UPDATE raw_tars SET num_members = NULL WHERE tar = '{tar}'", "tar {tar}: never fully indexed"),
    # a kept image that the plan does not hold
    ("DELETE FROM plan WHERE rowid = (SELECT min(rowid) FROM plan)", "kept by the index but not planned: 1 images"),
    # the bytes its walk read do not add up to the size its listing gave (a read cut short)
    ("UPDATE tar_scans SET accounted_bytes = accounted_bytes - 512 WHERE tar = '{tar}'", "tar {tar}: its walk read "),
    ("UPDATE raw_tars SET size = size + 1 WHERE tar = '{tar}'", "tar {tar}: its walk read "),
    # damage bytes that no damage row records
    ("UPDATE tar_scans SET damaged_bytes = 512, accounted_bytes = accounted_bytes - 512 WHERE tar = '{tar}'",
     "tar {tar}: its walk read 512 bytes of damage, but no damage row records them"),
    # scanned by an indexer that did not count bytes
    ("UPDATE tar_scans SET accounted_bytes = NULL WHERE tar = '{tar}'", "tar {tar}: no count of the bytes its walk read"),
])
def test_the_audit_fails_naming_the_tar_or_shard_that_does_not_add_up(copy, damage, named):
    tar = sorted(n for n in os.listdir(copy.settings.raw_root) if n.endswith(".tar"))[0]
    assert run_audit(copy.settings, "run-clean", log=QUIET).conservation == []
    with duckdb.connect(copy.settings.catalog) as con:
        con.execute(damage.format(tar=tar))
    report = run_audit(copy.settings, "run-damaged", log=QUIET)
    assert any(p.startswith(named.format(tar=tar)) for p in report.conservation), report.conservation
    assert report.problems and not report.info_written


def test_the_audit_fails_naming_a_shard_whose_samples_do_not_add_up(copy):
    run_audit(copy.settings, "run-clean", log=QUIET)
    # a manifest that lost a sample and does not record it as excluded either
    url = manifest_url(copy.settings.out_root, "0001")
    with open(url) as f:
        manifest = json.load(f)
    manifest["samples"].pop()
    committed_manifest(copy.settings, "0001", manifest)
    report = run_audit(copy.settings, "run-damaged", log=QUIET)
    assert any(p.startswith("shard 0001: ") and "planned" in p for p in report.conservation), report.conservation
