"""The whole pipeline through Dagster (`imnet build`) on a generated raw release, read back the
way users read it: webdataset for the shards, DuckDB for the catalog, Dagster's instance."""

from __future__ import annotations

import hashlib
import io
import os

import duckdb
import pytest
import webdataset as wds
from PIL import Image

from imnet_assets.storage.member_names import member_key, printable_name
from tests.checks import check_info_json, check_samples
from tests.conftest import build_env, dagster_home, environ, imnet


@pytest.fixture(scope="module")
def built(sample_release, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    env = build_env(tmp, sample_release[0], DAGSTER_HOME=str(dagster_home(tmp)))
    first = imnet(["build"], env)
    return tmp, env, first, sample_release[1]


def catalog(tmp):
    return duckdb.connect(str(tmp / "catalog.duckdb"), read_only=True)


def test_info_json_lists_balanced_shards(built):
    tmp, _, _, _ = built
    check_info_json(tmp / "out", tmp / "catalog.duckdb", 4)


def test_webdataset_reads_every_kept_image_exactly_once(built):
    tmp, _, _, summary = built
    check_samples(tmp / "out", tmp / "catalog.duckdb", summary.wnids, 4)


def test_raw_members_are_stored_as_lossy_webp_with_fixed_member_metadata(built):
    import tarfile

    tmp, _, _, _ = built
    with tarfile.open(tmp / "out" / "imagenet12k-train-0000.tar") as tf:
        members = tf.getmembers()
    assert [m.name.rsplit(".", 1)[1] for m in members[:3]] == ["cls", "json", "webp"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    with tarfile.open(tmp / "out" / "imagenet12k-train-0000.tar") as tf:
        webp = tf.extractfile(members[2]).read()
    assert webp[:4] == b"RIFF" and webp[8:16] == b"WEBPVP8 "  # lossy VP8 (or VP8X + VP8 with metadata)


def test_excluded_files_are_recorded_with_reasons(built):
    tmp, _, _, summary = built
    with catalog(tmp) as con:
        rows = dict(con.execute("SELECT member, reason FROM images WHERE status = 'excluded'").fetchall())
        total = con.execute("SELECT count(*) FROM images").fetchone()[0]
    assert total == summary.total_members  # one row per raw member, none dropped
    for quirk in ("tiny", "undecodable", "empty"):
        for member in summary.quirks[quirk]:
            assert member in rows, f"{quirk} {member} is not recorded as excluded"
            assert rows[member], f"{quirk} {member} has no reason"
    assert all("too small" in rows[m] for m in summary.quirks["tiny"])


def test_catalog_offsets_point_at_the_exact_raw_bytes(built, sample_release):
    tmp, _, _, _ = built
    with catalog(tmp) as con:
        rows = con.execute('SELECT tar, member, "offset", size, sha256 FROM images WHERE sha256 IS NOT NULL').fetchall()
    assert rows
    import tarfile

    for tar, member, offset, size, sha in rows:
        with open(sample_release[0] / tar, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        assert hashlib.sha256(data).hexdigest() == sha
        with tarfile.open(sample_release[0] / tar) as tf:
            info = next(i for i in tf.getmembers() if i.offset_data == offset)
            assert tf.extractfile(info).read() == data
            assert member == printable_name(info.name)  # hostile names, escaped as printable UTF-8


def test_catalog_tables_agree_with_shards(built):
    tmp, _, _, _ = built
    with catalog(tmp) as con:
        shards = con.execute("SELECT shard, path, num_samples, bytes, sha256, run_id, code_version FROM shards ORDER BY shard").fetchall()
        per_shard = dict(con.execute("SELECT shard, count(*) FROM shard_samples GROUP BY shard").fetchall())
        plan_vs_samples = con.execute(
            "SELECT count(*) FROM plan p JOIN shard_samples s USING (key) WHERE p.shard = s.shard AND p.position = s.position"
        ).fetchone()[0]
        planned = con.execute("SELECT count(*) FROM plan").fetchone()[0]
    assert [s[0] for s in shards] == ["0000", "0001", "0002", "0003"]
    assert plan_vs_samples == planned
    for shard, path, n, size, sha, run_id, code_version in shards:
        data = (tmp / "out" / path).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha
        assert per_shard[shard] == n
        assert run_id and code_version


def test_dagster_instance_records_every_partition_and_passing_checks(built):
    tmp, env, _, _ = built
    from dagster import AssetKey, DagsterInstance

    with environ(DAGSTER_HOME=env["DAGSTER_HOME"]):
        inst = DagsterInstance.get()
        mats = inst.get_materialized_partitions(AssetKey("wds_shards"))
        assert mats == {"0000", "0001", "0002", "0003"}
        for asset in ("raw_tars", "synset_manifest", "filtered_index", "shuffled_plan", "shard_audit"):
            assert inst.get_latest_materialization_event(AssetKey(asset)) is not None


def test_second_build_redoes_nothing(built):
    tmp, env, first, _ = built
    before = {p.name: p.stat().st_mtime_ns for p in (tmp / "out").glob("*.tar")}
    second = imnet(["build"], env)
    assert "0 to build" in second.stdout
    for stage in ("raw_tars", "synset_manifest", "filtered_index", "shuffled_plan", "shard_audit"):
        assert f"{stage}" in second.stdout and "fresh, skipped" in second.stdout
    after = {p.name: p.stat().st_mtime_ns for p in (tmp / "out").glob("*.tar")}
    assert before == after


def test_images_decode_close_to_their_sources(built, sample_release):
    """Spot-check pixels: a stored WebP is its source's RGB conversion, resized, within WebP loss."""
    tmp, _, _, _ = built
    with catalog(tmp) as con:
        rows = con.execute(
            """SELECT i.tar, i."offset", i.size, s.shard, s.key FROM images i JOIN shard_samples s USING (key)
               WHERE i.format = 'JPEG' AND NOT coalesce(i.needs_repair, false) ORDER BY i.key LIMIT 12"""
        ).fetchall()
    import numpy as np

    for tar, offset, size, shard, key in rows:
        with open(sample_release[0] / tar, "rb") as f:
            f.seek(offset)
            src = Image.open(io.BytesIO(f.read(size))).convert("RGB")
        ds = wds.WebDataset(str(tmp / "out" / f"imagenet12k-train-{shard}.tar"), shardshuffle=False).decode("pil")
        got = next(s["webp"] for s in ds if s["__key__"] == key)
        ref = src.resize(got.size, Image.Resampling.LANCZOS)
        diff = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(ref, dtype=np.int16)).mean()
        assert diff < 6, f"{key}: mean abs diff {diff:.2f}"


def test_status_says_what_is_fresh_missing_and_unknown(built, tmp_path):
    import shutil

    tmp, env, _, _ = built
    fresh = imnet(["status"], env)
    assert fresh.stdout.splitlines()[:5] == [
        "raw_tars         fresh", "synset_manifest  fresh", "filtered_index   fresh", "shuffled_plan    fresh",
        "wds_shards       4 fresh"]
    shutil.copytree(tmp / "out", tmp_path / "out")
    (tmp_path / "out" / "imagenet12k-train-0002.tar").unlink()
    elsewhere = {**env, "IMNET_OUT_ROOT": str(tmp_path / "out"), "IMNET_CATALOG": str(tmp_path / "none.duckdb")}
    out = imnet(["status"], elsewhere).stdout
    assert out.startswith("catalog stages   unknown here: no catalog at "), out
    assert "wds_shards       3 fresh, 1 missing\n  not fresh: 0002" in out, out
    assert not (tmp_path / "none.duckdb").exists()


def test_status_names_a_shard_layout_other_than_the_built_one(built):
    """As after `imnet demo` (which picks its own shard count) in a shell without IMNET_NUM_SHARDS:
    status says the plan would be made again, and with what, instead of only listing missing shards."""
    _tmp, env, _, _ = built
    out = imnet(["status"], {**env, "IMNET_NUM_SHARDS": "6"}).stdout
    assert out.splitlines()[0].startswith("note: ") and "was made with seed 0, 4 shards;" in out, out
    assert "ask for seed 0, 6 shards" in out and "shuffled_plan    stale" in out, out
    assert "wds_shards       2 missing, 4 stale" in out, out
    assert "note:" not in imnet(["status"], env).stdout


def test_a_release_with_nothing_to_exclude_builds(tmp_path):
    """No exclusion reasons at all: the index's metadata table is empty and must still be valid."""
    import tarfile

    from dagster import AssetKey, DagsterInstance

    raw = tmp_path / "raw"
    raw.mkdir()
    for s, wnid in enumerate(["n00000001", "n00000002"]):
        with tarfile.open(raw / f"{wnid}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for n in range(3):
                buf = io.BytesIO()
                Image.new("RGB", (64 + n, 48), (40 * s, 80, 20 * n)).save(buf, "JPEG", quality=90)
                info = tarfile.TarInfo(f"{wnid}_{n}.JPEG")
                info.size = buf.tell()
                tf.addfile(info, io.BytesIO(buf.getvalue()))
    env = build_env(tmp_path, raw, IMNET_NUM_SHARDS="2", DAGSTER_HOME=str(dagster_home(tmp_path)))
    out = imnet(["build"], env, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    with catalog(tmp_path) as con:
        assert con.execute("SELECT count(*) FROM images WHERE status = 'excluded'").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM shard_samples").fetchone() == (6,)
    with environ(DAGSTER_HOME=env["DAGSTER_HOME"]), DagsterInstance.get() as inst:
        event = inst.get_latest_materialization_event(AssetKey("filtered_index"))
    assert event is not None
    assert event.asset_materialization.metadata["exclusion_reasons"].value.records == []


def test_a_shard_edited_in_place_fails_the_audit_and_is_rebuilt_alone(built, tmp_path):
    """A flipped byte keeps the shard's size: the commit record's stamp (the tar's mtime) still
    catches it. A shard only retimed (a copy that did not keep times) is stale too: rebuilt, to the
    same bytes, rather than hashed on every look."""
    import shutil

    from imnet_assets.settings import Settings
    from imnet_assets.stages.audit import run_audit
    from imnet_assets.stages.audit_due import shards_as_they_are

    tmp, env, _, _ = built
    shutil.copytree(tmp / "out", tmp_path / "out")
    shutil.copy(tmp / "catalog.duckdb", tmp_path / "catalog.duckdb")
    env = {k: v for k, v in env.items() if k != "DAGSTER_HOME"}
    env.update(IMNET_OUT_ROOT=str(tmp_path / "out"), IMNET_CATALOG=str(tmp_path / "catalog.duckdb"))
    settings = Settings.from_env(env)
    assert shards_as_they_are(settings)[0] is not None  # copytree keeps times: every shard is in
    edited, retimed = (tmp_path / "out" / f"imagenet12k-train-{k}.tar" for k in ("0001", "0002"))
    original, same = edited.read_bytes(), retimed.read_bytes()
    with open(edited, "r+b") as f:
        f.seek(3000)
        byte = f.read(1)
        f.seek(3000)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(retimed, ns=(10**18, 10**18))

    status = imnet(["status"], env).stdout
    assert "wds_shards       2 fresh, 2 stale\n  not fresh: 0001, 0002" in status, status
    assert shards_as_they_are(settings) == (None, "shard 0001 is not in yet (stale: written from another "
                                            "plan or settings, or changed on storage)")
    report = run_audit(settings, "test-audit", log=lambda _m: None)
    for key in ("0001", "0002"):
        assert any(p.startswith(f"shard {key}: the file on storage is not the one run") for p in report.problems)
    assert not report.info_written
    build = imnet(["build"], env)
    assert "2 to build" in build.stdout and "shard_audit      ok" in build.stdout, build.stdout
    assert edited.read_bytes() == original and retimed.read_bytes() == same
    assert "wds_shards       4 fresh\n" in imnet(["status"], env).stdout


def test_hostile_member_names_are_all_accounted_for_and_read_back(built):
    # The sample release gives ordinary photos hostile names (not UTF-8, long, folders, '..', an
    # absolute path, a newline, a dot in the stem, a repeated key, '.jpeg'): every one has its
    # images row; unsafe ones and the repeated key are excluded with their reason; the others are
    # in the shards under keys webdataset splits back exactly.
    tmp, _, _, summary = built
    assert len(summary.hostile) == 9
    with catalog(tmp) as con:
        rows = {m: (k, s, r) for m, k, s, r in con.execute("SELECT member, key, status, reason FROM images").fetchall()}
        per_tar = con.execute("SELECT count(*) FROM raw_tars r WHERE r.num_members <> "
                              "(SELECT count(*) FROM images i WHERE i.tar = r.tar)").fetchone()[0]
    assert per_tar == 0
    keys_in_shards = set()
    for i in range(4):
        for sample in wds.WebDataset(str(tmp / "out" / f"imagenet12k-train-{i:04d}.tar"), shardshuffle=False):
            assert {k for k in sample if not k.startswith("__")} == {"cls", "json", "webp"}, sample.keys()
            keys_in_shards.add(sample["__key__"])
    for kind, name in summary.hostile.items():
        key, status, reason = rows[printable_name(name)]
        if kind in ("dotdot", "absolute"):
            assert status == "excluded" and reason.startswith("unsafe member name"), (kind, reason)
        elif kind == "repeated_key":
            assert status == "excluded" and reason.startswith("duplicate key"), (kind, reason)
        else:
            assert (status, key) == ("kept", member_key(name)[0]) and key in keys_in_shards, (kind, key, status)
    # nothing was written outside the out root: the unsafe names are not on disk anywhere
    for name in (summary.hostile["dotdot"], summary.hostile["absolute"]):
        assert not os.path.exists(name) and not os.path.exists(tmp / name.lstrip("/"))
