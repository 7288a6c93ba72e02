"""Many releases from one raw index (IMNET_RELEASES), with `imnet build` run as a user runs it, on
real tars of real images (SPEC: Releases).

One module-wide sequence on a small raw release (4 synsets):
1. two releases, `all` (WebP, 3 shards) and `sub` (a file of 2 wnids, 2 shards), built at once;
2. a third release `extra` added: the shared stages are fresh, no tar is scanned again (the
   catalog's `tar_scans` rows are as they were), the first two releases' shards are untouched;
3. `sub`'s num_shards and `extra`'s codec (WebP -> JPEG) changed: only their shards are rebuilt
   (`extra`'s plan stays fresh: a codec is not part of the selection), `all`'s are untouched;
4. `extra`'s shard files removed, then `imnet build --release extra`: only they come back.
Shard files are compared by path, mtime and sha256.

Needs both halves of issue 25: this branch (the Dagster layer, orchestration, CLI) and relcore's
(per-release plans, stage records and shard tables in the catalog; synset selection and labels).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import webdataset as wds

from imnet_assets.sample.sample_raw import write_sample_raw
from tests.checks import catalog
from tests.conftest import build_env, dagster_home, imnet

SYNSETS, IMAGES = 4, 10


def releases_toml(sub_wnids: Path, sub_shards: int = 2, extra: str | None = None) -> str:
    text = f"""
[release.all]
out_root = "out/all"
num_shards = 3

[release.sub]
out_root = "out/sub"
synsets = "{sub_wnids}"
num_shards = {sub_shards}
shard_pattern = "sub-{{shard}}.tar"
"""
    if extra:
        text += f'\n[release.extra]\nout_root = "out/extra"\nnum_shards = 2\nseed = 5\ncodec = "{extra}"\n'
    return text


def shard_files(out: Path) -> dict[str, tuple[int, str]]:
    """Each shard tar under `out`: (mtime_ns, sha256)."""
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(out.glob("*.tar"))}


def tar_scans(path: Path) -> list[tuple]:
    with catalog(path) as con:
        return con.execute("SELECT * FROM tar_scans ORDER BY ALL").fetchall()


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("releases")
    summary = write_sample_raw(tmp / "raw", synsets=SYNSETS, images=IMAGES, seed=1)
    sub = sorted(summary.wnids)[1:3]  # two of the four classes: labels 0 and 1 in the subset
    (tmp / "sub.txt").write_text("\n".join(reversed(sub)) + "\n")  # order in the file does not matter
    toml = tmp / "releases.toml"
    toml.write_text(releases_toml(tmp / "sub.txt"))
    env = build_env(tmp, tmp / "raw", DAGSTER_HOME=str(dagster_home(tmp)), IMNET_RELEASES=str(toml),
                    IMNET_WORKERS="2", IMNET_PARALLEL_SHARDS="2")
    out = {name: tmp / "out" / name for name in ("all", "sub", "extra")}
    first = imnet(["build"], env)
    files1 = {n: shard_files(o) for n, o in out.items()}
    scans1 = tar_scans(tmp / "catalog.duckdb")

    toml.write_text(releases_toml(tmp / "sub.txt", extra="webp"))
    second = imnet(["build"], env)
    files2 = {n: shard_files(o) for n, o in out.items()}
    scans2 = tar_scans(tmp / "catalog.duckdb")

    toml.write_text(releases_toml(tmp / "sub.txt", sub_shards=3, extra="jpeg"))
    third = imnet(["build"], env)
    files3 = {n: shard_files(o) for n, o in out.items()}

    for p in out["extra"].glob("*.tar"):
        p.unlink()
    fourth = imnet(["build", "--release", "extra"], env)
    files4 = {n: shard_files(o) for n, o in out.items()}
    status = imnet(["status"], env)
    return SimpleNamespace(tmp=tmp, env=env, summary=summary, sub=sub, out=out, outputs=[first, second, third, fourth],
                           files=[files1, files2, files3, files4], scans=(scans1, scans2), status=status.stdout)


def test_first_build_runs_shared_stages_once_and_each_release(steps):
    out = steps.outputs[0].stdout
    for stage in ("raw_tars", "synset_manifest", "filtered_index"):
        assert len(re.findall(rf"^  {stage}\s+materialized", out, re.M)) == 1, (stage, out)
    for name in ("all", "sub"):
        assert re.search(rf"^  {name}/shuffled_plan\s+materialized", out, re.M), out
        assert re.search(rf"^  {name}/shard_audit\s+ok", out, re.M), out
    assert sorted(steps.files[0]["all"]) == [f"imagenet12k-train-{i:04d}.tar" for i in range(3)]
    assert sorted(steps.files[0]["sub"]) == ["sub-0000.tar", "sub-0001.tar"]


def _samples(out: Path) -> list[dict]:
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_each_release_holds_exactly_its_classes_with_labels_in_its_order(steps):
    """`all`: every kept image, labels over all synsets; `sub`: exactly its two classes' kept
    images, labelled 0 and 1 in the sorted list of its synsets."""
    with catalog(steps.tmp / "catalog.duckdb") as con:
        kept = dict(con.execute("SELECT key, wnid FROM images WHERE status = 'kept'").fetchall())
    everything = sorted(steps.summary.wnids)
    for name, wnids in (("all", everything), ("sub", sorted(steps.sub))):
        samples = _samples(steps.out[name])
        keys = [s["__key__"] for s in samples]
        assert len(keys) == len(set(keys)), name
        assert set(keys) == {k for k, w in kept.items() if w in wnids}, name
        for s in samples:
            meta = json.loads(s["json"])
            assert int(s["cls"]) == meta["label"] == wnids.index(meta["class_name"]), (name, s["__key__"], meta)
        info = json.loads((steps.out[name] / "_info.json").read_text())
        assert info["splits"]["train"]["num_samples"] == len(keys), (name, info)
        assert (steps.out[name] / "classes.tsv").read_text().count("\n") == len(wnids) + 1


def test_adding_a_release_reads_no_raw_tar_again_and_leaves_the_others_untouched(steps):
    out = steps.outputs[1].stdout
    for stage in ("raw_tars", "synset_manifest", "filtered_index", "all/shuffled_plan", "sub/shuffled_plan",
                  "all/shard_audit", "sub/shard_audit"):
        assert re.search(rf"^  {re.escape(stage)}\s+fresh, skipped", out, re.M), (stage, out)
    assert re.search(r"^  extra/shuffled_plan\s+materialized", out, re.M), out
    assert "extra: wds_shards: 0 of 2 selected shards fresh, 2 to build" in out, out
    assert steps.scans[1] == steps.scans[0], "tars were scanned again"
    assert steps.files[1]["all"] == steps.files[0]["all"] and steps.files[1]["sub"] == steps.files[0]["sub"]
    assert len(steps.files[1]["extra"]) == 2


def test_changing_one_releases_shard_count_or_codec_rebuilds_only_its_shards(steps):
    out = steps.outputs[2].stdout
    assert "sub: wds_shards: 0 of 3 selected shards fresh, 3 to build" in out, out
    assert "all: wds_shards: 3 of 3 selected shards fresh, 0 to build" in out, out
    assert re.search(r"^  extra/shuffled_plan\s+fresh, skipped", out, re.M), out  # a codec is no selection
    assert "extra: wds_shards: 0 of 2 selected shards fresh, 2 to build" in out, out
    assert sorted(steps.files[2]["sub"]) == ["sub-0000.tar", "sub-0001.tar", "sub-0002.tar"]
    assert steps.files[2]["all"] == steps.files[1]["all"]
    assert sorted(steps.files[2]["extra"]) == sorted(steps.files[1]["extra"])
    assert all(steps.files[2]["extra"][n][1] != sha for n, (_, sha) in steps.files[1]["extra"].items())
    members = {s["__key__"]: sorted(k for k in s if not k.startswith("__")) for s in _samples(steps.out["extra"])}
    assert members and all(m == ["cls", "jpg", "json"] for m in members.values()), list(members.items())[:2]
    info = json.loads((steps.out["sub"] / "_info.json").read_text())
    assert info["splits"]["train"]["filenames"] == ["sub-0000.tar", "sub-0001.tar", "sub-0002.tar"]


def test_removing_one_releases_shards_and_rebuilding_it_leaves_the_others_untouched(steps):
    out = steps.outputs[3].stdout
    assert "extra: wds_shards: 0 of 2 selected shards fresh, 2 to build" in out, out
    assert "all/" not in out and "sub/" not in out, out  # --release extra: the others are not looked at
    assert steps.files[3]["all"] == steps.files[2]["all"] and steps.files[3]["sub"] == steps.files[2]["sub"]
    # the same plan and settings give the same bytes again
    assert {n: sha for n, (_, sha) in steps.files[3]["extra"].items()} == \
        {n: sha for n, (_, sha) in steps.files[2]["extra"].items()}


def test_status_shows_each_release(steps):
    status = steps.status
    for name, shards in (("all", 3), ("sub", 3), ("extra", 2)):
        block = status.split(f"release {name}: ", 1)[1].split("\nrelease ", 1)[0]
        assert re.search(rf"^  wds_shards\s+{shards} fresh$", block, re.M), (name, status)
        assert re.search(r"^  shuffled_plan\s+fresh$", block, re.M), (name, status)
        assert re.search(r"^  shard_audit\s+fresh$", block, re.M), (name, status)


def test_lineage_names_every_release_and_shard_holding_the_image(steps):
    with catalog(steps.tmp / "catalog.duckdb") as con:
        inside = con.execute("SELECT key FROM images WHERE status = 'kept' AND wnid = ? ORDER BY key LIMIT 1",
                             [steps.sub[0]]).fetchone()[0]
        outside = con.execute("SELECT key FROM images WHERE status = 'kept' AND wnid NOT IN (?, ?) ORDER BY key "
                              "LIMIT 1", steps.sub).fetchone()[0]
    out = imnet(["lineage", inside], steps.env).stdout
    assert re.findall(r"^release +(\w+)", out, re.M) == ["all", "sub", "extra"] or \
        sorted(re.findall(r"^release +(\w+)", out, re.M)) == ["all", "extra", "sub"], out
    assert len(re.findall(r"^shard +\d{4} +position \d+ +file .*(imagenet12k-train|sub)-\d{4}\.tar$", out, re.M)) == 3, out
    out = imnet(["lineage", outside], steps.env).stdout
    assert sorted(re.findall(r"^release +(\w+)", out, re.M)) == ["all", "extra"], out


def test_verify_checks_every_release_or_the_one_named(steps):
    out = imnet(["verify"], steps.env).stdout
    assert re.findall(r"^release (\w+): ", out, re.M) == ["all", "sub", "extra"], out
    for n in (3, 3, 2):
        assert f"verify: {n} of {n} shards ok" in out, out
    one = imnet(["verify", "--release", "sub"], steps.env).stdout
    assert re.findall(r"^release (\w+): ", one, re.M) == ["sub"] and "verify: 3 of 3 shards ok" in one, one
    (steps.out["sub"] / "sub-0001.tar").write_bytes(b"not a tar")  # the last test: changes the release
    bad = imnet(["verify", "--release", "sub"], steps.env, check=False)
    assert bad.returncode == 1 and "FAIL shard 0001" in bad.stdout, bad.stdout
    assert imnet(["verify", "--release", "all"], steps.env).returncode == 0


def test_each_releases_schedule_and_sensors_judge_and_name_their_own_shards(steps):
    """After the verify test damaged `sub`'s shard 0001 (this test runs after it): `sub`'s top-up
    schedule asks for `sub/wds_shards` 0001, tagged with its release, and its audit sensor holds
    back; `all`'s ask for nothing; `sub`'s storage sensor fails `sub/shard_audit`'s check naming 0001."""
    from dagster import (
        AssetCheckEvaluation,
        AssetKey,
        DagsterInstance,
        build_schedule_context,
        build_sensor_context,
    )

    from imnet_assets.definitions import build_definitions
    from imnet_assets.defs import schedules, shard_sensor
    from imnet_assets.release import releases
    from imnet_assets.settings import Settings
    from tests.conftest import environ

    rels = {r.release: r for r in releases.from_env(steps.env)}
    defs = build_definitions(Settings.from_env(steps.env), list(rels.values()))
    repo = defs.get_repository_def()
    with environ(DAGSTER_HOME=steps.env["DAGSTER_HOME"]), DagsterInstance.get() as instance:
        ticks = {}
        for name in ("all", "sub"):
            topup, audit = schedules.make(rels[name])
            ticks[name] = (topup.evaluate_tick(build_schedule_context(instance=instance, repository_def=repo)),
                           audit.evaluate_tick(build_sensor_context(instance=instance, definitions=defs)))
        storage = shard_sensor.evaluate(rels["sub"], instance, cursor=None)
    requests = ticks["sub"][0].run_requests
    assert [(r.partition_key, list(r.asset_selection), r.tags.get("imnet/release")) for r in requests] == \
        [("0001", [AssetKey(["sub", "wds_shards"])], "sub")], requests
    assert requests[0].run_key == "sub_wds_shards-0001"
    assert not ticks["sub"][1].run_requests  # a shard not fresh: no audit
    assert not ticks["all"][0].run_requests and "fresh" in ticks["all"][0].skip_message
    failed = [e for e in storage.asset_events if isinstance(e, AssetCheckEvaluation) and not e.passed]
    # verify removed the failed shard's commit record (verify_runs.forget_failed): missing, not stale
    assert "0001 missing" in storage.skip_reason.skip_message, storage.skip_reason
    # the shard check's verdict goes into the run that built the shard (report_check_of_run); the
    # audit's check, in the tick's events: `sub`'s audit, naming the shard
    assert [(e.asset_key, e.check_name) for e in failed] == [(AssetKey(["sub", "shard_audit"]),
                                                              "nothing_lost_or_duplicated")], failed
    assert "0001 missing" in failed[0].description, failed[0].description
