"""Staged encodes (stages/staged_encodes.py; issue 25): the index's pass encodes each kept image for
every release's codec, and the shard runs take the stored bytes from there. On real tars of real
images, with `imnet build` run as a user runs it:

- shards built from staged encodes are byte for byte the shards built with IMNET_STAGE_ENCODES=off
  (each image read and encoded by the shard run), for a WebP and a JPEG release;
- the staged files are a cache, never an authority: a flipped byte in one and another one removed
  cost no image and no failure: the shards rebuilt from them are the same bytes again, nothing
  excluded (the shard run read and encoded those sources instead);
- a lookup made for another codec identity is not used.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from imnet_assets.sample.sample_raw import write_sample_raw
from tests.checks import catalog
from tests.conftest import build_env, dagster_home, environ, imnet

RELEASES = """
[release.all]
out_root = "out/all"
num_shards = 2

[release.jpg]
out_root = "out/jpg"
num_shards = 2
codec = "jpeg"
"""


def shards(root: Path) -> dict[str, str]:
    return {f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob("out/*/*.tar"))}


def build(root: Path, raw: Path, **extra) -> str:
    root.mkdir()
    (root / "releases.toml").write_text(RELEASES)
    env = build_env(root, raw, DAGSTER_HOME=str(dagster_home(root)), IMNET_RELEASES=str(root / "releases.toml"),
                    IMNET_WORKERS="2", **extra)
    return imnet(["build"], env).stdout, env


def exclusions(root: Path) -> list[tuple]:
    with catalog(root / "catalog.duckdb") as con:
        return con.execute("SELECT release, key, reason FROM shard_exclusions ORDER BY ALL").fetchall()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("staged")
    write_sample_raw(tmp / "raw", synsets=3, images=10, seed=4)
    staged_out, staged_env = build(tmp / "staged", tmp / "raw")
    plain_out, _ = build(tmp / "plain", tmp / "raw", IMNET_STAGE_ENCODES="off")
    return tmp, staged_out, staged_env, plain_out


def test_shards_from_staged_encodes_are_the_shards_encoded_in_the_run(built):
    tmp = built[0]
    with catalog(tmp / "staged" / "catalog.duckdb") as con:
        staged = con.execute("SELECT codec, count(*) FROM staged_images GROUP BY codec ORDER BY codec").fetchall()
        planned = con.execute("SELECT count(*) FROM plan WHERE release = 'all'").fetchone()[0]
    assert [c.split("-")[0] for c, _ in staged] == ["jpeg", "webp"] and all(n >= planned for _, n in staged), staged
    assert sorted(p.name for p in (tmp / "staged/out/all/_plan").glob("*.staged.json")) == [
        "0000.staged.json", "0001.staged.json"]
    assert not list((tmp / "plain").glob("out/*/_staged")) and not list((tmp / "plain").glob("out/*/_plan/*.staged.json"))
    status = imnet(["status"], built[2]).stdout
    assert re.search(r"^  staged encodes webp-\w+: \d+ images \(0 refused by the encoder\), [0-9.]+ MB", status, re.M), status
    got, want = shards(tmp / "staged"), shards(tmp / "plain")
    assert len(want) == 4 and got == want
    assert exclusions(tmp / "staged") == exclusions(tmp / "plain")


def test_a_damaged_or_missing_staged_file_costs_no_image(built):
    tmp, _staged_out, env, _plain_out = built
    root = tmp / "staged"
    before = exclusions(root)
    webp = sorted(root.glob("out/all/_staged/webp-*/*.bin"))
    jpeg = sorted(root.glob("out/jpg/_staged/jpeg-*/*.bin"))  # under the first release with the codec
    assert len(webp) == 3 and len(jpeg) == 3, (webp, jpeg)
    data = bytearray(webp[0].read_bytes())
    data[len(data) // 2] ^= 0x40
    webp[0].write_bytes(bytes(data))
    jpeg[1].unlink()
    for p in root.glob("out/*/*.tar"):
        p.unlink()
    mark = latest_run_ids(root)
    out = imnet(["build"], env).stdout
    assert "all: wds_shards: 0 of 2 selected shards fresh, 2 to build" in out, out
    assert shards(root) == shards(tmp / "plain")
    assert exclusions(root) == before
    # what came from the staged files: all but the damaged image, and but the removed file's images
    with catalog(root / "catalog.duckdb") as con:
        planned = dict(con.execute("SELECT release, count(*) FROM plan GROUP BY release").fetchall())
        lost = con.execute("""SELECT count(*) FROM plan p JOIN staged_images s ON s.key = p.key AND s.source_sha256 = p.sha256
                              AND s.codec LIKE 'jpeg-%' AND s.reason IS NULL WHERE p.release = 'jpg' AND s.url = $url""",
                           {"url": str(jpeg[1])}).fetchone()[0]
    staged = staged_metadata(root, mark)
    assert lost > 0 and staged == {"all": planned["all"] - 1, "jpg": planned["jpg"] - lost}, (staged, planned, lost)


def latest_run_ids(root: Path) -> set[str]:
    from dagster import DagsterInstance

    with environ(DAGSTER_HOME=str(dagster_home(root))), DagsterInstance.get() as inst:
        return {r.dagster_run.run_id for r in inst.get_run_records()}


def staged_metadata(root: Path, before: set[str]) -> dict[str, int]:
    """Per release, the `staged` metadata of its wds_shards materializations in runs not in `before`."""
    from dagster import AssetKey, DagsterInstance

    out: dict[str, int] = {}
    with environ(DAGSTER_HOME=str(dagster_home(root))), DagsterInstance.get() as inst:
        for release in ("all", "jpg"):
            for r in inst.fetch_materializations(AssetKey([release, "wds_shards"]), limit=100).records:
                if r.run_id not in before:
                    meta = r.asset_materialization.metadata
                    out[release] = out.get(release, 0) + (meta["staged"].value if "staged" in meta else 0)
    return out


def test_a_lookup_for_another_codec_identity_is_not_used(built):
    from imnet_assets.image.encode import EncodeSettings
    from imnet_assets.release.plan import read_slice
    from imnet_assets.stages.staged_encodes import read_lookup

    out_root = str(built[0] / "staged/out/all")
    rows, _ = read_slice(out_root, "0000")
    refs = read_lookup(out_root, "0000", rows, EncodeSettings())
    assert refs is not None and sum(r is not None for r in refs) == len(rows)
    assert read_lookup(out_root, "0000", rows, EncodeSettings(quality=80)) is None
    doc = json.loads((Path(out_root) / "_plan/0000.staged.json").read_text())
    assert doc["codec"].startswith("webp-") and len(doc["rows"]) == len(rows)


def test_kill_9_inside_the_staging_index_leaves_only_whole_tars_staged(tmp_path):
    """SIGKILL `imnet build` after the index's first commits: the catalog's staged rows are those
    of whole tars recorded as scanned, each pointing at bytes that are there (a tar's staged file
    appears only once its walk ended); the next build sweeps the killed writers' temporaries and
    ends with the shards of a build that was never killed."""
    from tests.integration.test_catalog_crash_safety import kill_when, start

    write_sample_raw(tmp_path / "raw", synsets=24, images=3, seed=6)
    reference, _ = build(tmp_path / "plain", tmp_path / "raw", IMNET_STAGE_ENCODES="off")
    root = tmp_path / "killed"
    root.mkdir()
    (root / "releases.toml").write_text(RELEASES)
    env = build_env(root, tmp_path / "raw", DAGSTER_HOME=str(dagster_home(root)), IMNET_WORKERS="2",
                    IMNET_RELEASES=str(root / "releases.toml"), IMNET_INDEX_BATCH_ROWS="6")
    log = root / "build.log"
    proc = start(env, root, log)
    # a tar's staged files appear as its walk ends, its rows are committed a few tars later (every 2 tars)
    kill_when(proc, log, lambda: len(list(root.glob("out/all/_staged/*/*.bin"))) >= 10, "the index's first commits")
    with catalog(root / "catalog.duckdb") as con:
        scanned = {t for (t,) in con.execute("SELECT tar FROM tar_scans").fetchall()}
        rows = con.execute("SELECT tar, url, \"offset\", size, sha256 FROM staged_images WHERE reason IS NULL").fetchall()
    assert 0 < len(scanned) < 24, f"the kill did not land inside the index ({len(scanned)} tars committed)"
    assert rows and {r[0] for r in rows} <= scanned
    for _tar, url, offset, size, sha in rows:
        with open(url, "rb") as f:
            f.seek(offset)
            assert hashlib.sha256(f.read(size)).hexdigest() == sha, url
    imnet(["build"], env)
    assert not [p for p in root.glob("out/*/_staged/*/*") if not p.name.endswith(".tar.bin")]
    assert shards(root) == shards(tmp_path / "plain") and len(shards(root)) == 4
    assert exclusions(root) == exclusions(tmp_path / "plain")
    assert reference


def test_an_extracted_folder_release_is_staged_per_synset_folder(tmp_path):
    """The extracted layout (`<wnid>/` folders): each folder's kept images are staged in
    `<wnid>.bin`, and the shards are the ones encoded in the run."""
    write_sample_raw(tmp_path / "raw", synsets=3, images=8, seed=8, layout="folders")
    build(tmp_path / "plain", tmp_path / "raw", IMNET_STAGE_ENCODES="off")
    build(tmp_path / "staged", tmp_path / "raw")
    staged = sorted(p.name for p in (tmp_path / "staged").glob("out/all/_staged/webp-*/*"))
    assert len(staged) == 3 and all(n.startswith("n") and n.endswith(".bin") and "/" not in n for n in staged), staged
    assert shards(tmp_path / "staged") == shards(tmp_path / "plain") and len(shards(tmp_path / "plain")) == 4


def test_staged_encodes_on_s3_out_roots(tmp_path):
    """Out roots on S3 (moto's server): the index uploads each tar's staged images, the shard runs
    read them back by range, and the shards are the ones encoded in the run."""
    from tests.s3server import MotoS3

    write_sample_raw(tmp_path / "raw", synsets=3, images=8, seed=9)
    build(tmp_path / "plain", tmp_path / "raw", IMNET_STAGE_ENCODES="off")
    root = tmp_path / "s3"
    root.mkdir()
    (root / "releases.toml").write_text(RELEASES.replace('"out/', '"s3://staged-out-bucket/'))
    with MotoS3() as s3:
        client = s3.client()
        client.create_bucket(Bucket="staged-out-bucket")
        env = build_env(root, tmp_path / "raw", DAGSTER_HOME=str(dagster_home(root)), IMNET_WORKERS="2",
                        IMNET_RELEASES=str(root / "releases.toml"))
        for k in [k for k in env if k.startswith("AWS_")]:
            del env[k]
        env.update(s3.env())
        out = imnet(["build"], env).stdout
        staged_reads = [r for r in s3.since(0) if r.method == "GET" and r.range and "/_staged/" in (r.key or "")]
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="staged-out-bucket")["Contents"]]
        got = {f"{k.split('/')[0]}/{k.split('/')[-1]}": hashlib.sha256(
            client.get_object(Bucket="staged-out-bucket", Key=k)["Body"].read()).hexdigest()
            for k in keys if k.endswith(".tar") and k.count("/") == 1}
    assert re.search(r"^  jpg/shard_audit\s+ok: ", out, re.M), out
    assert len([k for k in keys if "/_staged/" in k and k.endswith(".tar.bin")]) == 6, keys
    assert got == shards(tmp_path / "plain")
    with catalog(root / "catalog.duckdb") as con:
        planned = con.execute("SELECT count(*) FROM plan").fetchone()[0]
    assert len(staged_reads) == planned, (len(staged_reads), planned)  # each planned image read from _staged, once
