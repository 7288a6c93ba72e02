"""IMNET_RELEASES: a TOML file of [release.<name>] tables read into one Settings per release
(release/releases.py), each problem one line naming the file, release and key; and the Dagster
definitions those releases give (keys, groups, partitions, schedules and sensors per release)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dagster import AssetKey, Definitions

from imnet_assets.release import releases
from imnet_assets.settings import Settings, SettingsError
from tests.conftest import imnet


def write(folder: Path, text: str) -> Path:
    path = folder / "releases.toml"
    path.write_text(text, encoding="utf-8")
    return path


def env_for(tmp_path: Path, text: str | None, **extra: str) -> dict[str, str]:
    env = {"IMNET_PROJECT_ROOT": str(tmp_path), "IMNET_RAW_ROOT": str(tmp_path / "raw"), "IMNET_NUM_SHARDS": "8",
           **extra}
    if text is not None:
        write(tmp_path, text)
        env["IMNET_RELEASES"] = "releases.toml"  # relative: against the project root
    return env


THREE = """
[release.w21_webp]
out_root = "out/w21"

[release.in12k]
out_root = "out/in12k"
synsets = "in12k"
val_per_class = 5
num_shards = 4
seed = 3
shard_pattern = "in12k-{shard}.tar"

[release.w21_jpeg]
out_root = "s3://bucket/w21-jpeg"
codec = "jpeg"
quality = 85
max_short_edge = 512
holdout = "test:1"
"""


def test_unset_is_the_one_default_release_exactly_as_the_base(tmp_path):
    env = env_for(tmp_path, None)
    assert releases.from_env(env) == [Settings.from_env(env)]
    assert releases.from_env(env)[0].release == ""


def test_each_release_is_the_base_with_its_keys(tmp_path):
    env = env_for(tmp_path, THREE, IMNET_WEBP_QUALITY="80", IMNET_SEED="7")
    base = Settings.from_env(env)
    w21, in12k, jpeg = releases.from_env(env)
    assert [r.release for r in (w21, in12k, jpeg)] == ["w21_webp", "in12k", "w21_jpeg"]  # the file's order
    assert w21.out_root == str(tmp_path / "out" / "w21")  # relative to the project root
    assert (w21.num_shards, w21.seed, w21.webp_quality, w21.synsets, w21.codec) == (8, 7, 80, "all", "webp")
    assert (in12k.synsets, in12k.val_per_class, in12k.num_shards, in12k.seed) == ("in12k", 5, 4, 3)
    assert in12k.shard_name("0003") == "in12k-0003.tar"
    assert (jpeg.out_root, jpeg.codec, jpeg.jpeg_quality, jpeg.webp_quality) == ("s3://bucket/w21-jpeg", "jpeg", 85, 80)
    assert (jpeg.max_short_edge, jpeg.holdout) == (512, (("test", 1),))
    # everything else is the base's
    for r in (w21, in12k, jpeg):
        assert (r.raw_root, r.catalog, r.workers, r.dedup) == (base.raw_root, base.catalog, base.workers, base.dedup)


def test_synsets_may_be_a_file_of_wnids_relative_to_the_project_root(tmp_path):
    (tmp_path / "mine.txt").write_text("n01440764\n")
    env = env_for(tmp_path, '[release.mine]\nout_root = "out/mine"\nsynsets = "mine.txt"\n')
    assert releases.from_env(env)[0].synsets == str(tmp_path / "mine.txt")


@pytest.mark.parametrize("text, words", [
    ('[release.a]\nsynsets = "in1k"\n', ["[release.a]", "out_root is missing"]),
    ('[release.a]\nout_root = "o/a"\nnum_shard = 4\n', ["unknown key 'num_shard'", "did you mean num_shards?"]),
    ('[release.a]\nout_root = "o/a"\ncodec = "avif"\n', ["codec='avif'", "webp, jpeg"]),
    ('[release.a]\nout_root = "o/a"\nnum_shards = 0\n', ["num_shards=0", "between 1 and 9999"]),
    ('[release.a]\nout_root = "o/a"\nnum_shards = "4"\n', ["num_shards must be a whole number"]),
    ('[release.a]\nout_root = "o/a"\nval_per_class = true\n', ["val_per_class must be a whole number"]),
    ('[release.a]\nout_root = "o/a"\nsynsets = "in2k"\n', ["synsets='in2k'", "nor a file of wnids"]),
    ('[release.a]\nout_root = "o/a"\ncodec = "jpeg"\nmethod = 4\n', ["method is a WebP setting"]),
    ('[release.a]\nout_root = "o/a"\ncodec = "jpeg"\nquality = 100\n', ["quality=100", "jpeg"]),
    ('[release.a]\nout_root = "o/a"\nshard_pattern = "x.tar"\n', ["[release.a] shard_pattern='x.tar'", "{shard}"]),
    ('[release.a]\nout_root = "o/a"\nholdout = "validation"\n', ["[release.a] holdout entry 'validation'"]),
    ('[release.a]\nout_root = "o/a"\nnum_shards = 2\nholdout = "test:2"\n', ["holdout takes 2 shards of 2"]),
    ('[release.a]\nout_root = "o/a"\nval_per_class = 3\nholdout = "validation:1"\n', ["val_per_class", "holdout"]),
    ('[release.a]\nout_root = "o/x"\n[release.b]\nout_root = "o/x"\n', ["[release.b]", "is the out root of [release.a]"]),
    ('[release.a]\nout_root = "o"\n[release.b]\nout_root = "o/b"\n', ["[release.b]", "is inside the out root of [release.a]"]),
    ('[release.a]\nout_root = "raw/a"\n', ["[release.a] out_root", "is inside the raw root"]),
    ('[release.a]\nout_root = "."\n', ["[release.a] out_root", "contains the raw root"]),
    ('[release."in-12k"]\nout_root = "o/a"\n', ["[release.in-12k]", "letters, digits and '_'"]),
    ('[release.12k]\nout_root = "o/a"\n', ["[release.12k]", "not starting with a digit"]),
    ('[releases.a]\nout_root = "o/a"\n', ["'releases' at the top", "did you mean release?"]),
    ('[release]\n', ["defines no release"]),
    ('[release.a\nout_root = "o/a"\n', ["is not TOML"]),
])
def test_each_problem_is_one_line_naming_file_release_and_key(tmp_path, text, words):
    env = env_for(tmp_path, text)
    with pytest.raises(SettingsError) as e:
        releases.from_env(env)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"IMNET_RELEASES={tmp_path / 'releases.toml'}"), message
    for w in words:
        assert w in message, (w, message)


def test_a_release_holdout_may_not_take_the_alt_label_split_name(tmp_path):
    env = env_for(tmp_path, '[release.a]\nout_root = "o/a"\nholdout = "train_in1k:1"\n', IMNET_ALT_LABELS="in1k")
    with pytest.raises(SettingsError, match=r"\[release.a\] holdout names the 'train_in1k' split"):
        releases.from_env(env)


def test_a_missing_file_is_named(tmp_path):
    env = {**env_for(tmp_path, None), "IMNET_RELEASES": "nowhere.toml"}
    with pytest.raises(SettingsError, match=r"nowhere.toml: no such file"):
        releases.from_env(env)


def test_the_command_line_says_it_in_one_line_and_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMNET_", "DAGSTER_HOME"))}
    env.update(env_for(tmp_path, '[release.a]\nout_root = "o/a"\nqualty = 80\n'))
    for args in (["status"], ["build"]):
        proc = imnet(args, env, check=False, timeout=120)
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "unknown key 'qualty'" in lines[0] and "did you mean quality?" in lines[0], lines


def test_build_release_names_the_known_ones(tmp_path):
    rels = releases.from_env(env_for(tmp_path, THREE))
    assert releases.by_name(rels, "in12k").release == "in12k"
    with pytest.raises(SettingsError, match=r"no such release \(did you mean in12k\?\); the releases file has "
                                            r"w21_webp, in12k, w21_jpeg"):
        releases.by_name(rels, "in12"),
    with pytest.raises(SettingsError, match="IMNET_RELEASES is not set"):
        releases.by_name(releases.from_env(env_for(tmp_path, None)), "in12k")


def test_definitions_unset_keep_todays_keys_group_and_names(tmp_path):
    from imnet_assets.definitions import build_definitions

    base = Settings.from_env(env_for(tmp_path, None))
    defs = build_definitions(base, releases.from_env(env_for(tmp_path, None)))
    Definitions.validate_loadable(defs)
    keys = {a.key.to_user_string(): a for a in defs.assets}
    assert sorted(keys) == sorted(["raw_tars", "synset_manifest", "filtered_index", "shuffled_plan", "wds_shards",
                                   "shard_audit"])
    assert {a.group_names_by_key[a.key] for a in defs.assets} == {"imagenet_w21"}
    assert [s.name for s in defs.schedules] == ["wds_shards_topup"]
    assert sorted(s.name for s in defs.sensors) == ["shard_audit_when_complete", "wds_shards_on_storage"]


def test_definitions_give_each_release_its_group_partitions_checks_schedule_and_sensors(tmp_path):
    from imnet_assets.definitions import build_definitions

    env = env_for(tmp_path, THREE)
    defs = build_definitions(Settings.from_env(env), releases.from_env(env))
    Definitions.validate_loadable(defs)
    assets = {a.key: a for a in defs.assets}
    for stage in ("raw_tars", "synset_manifest", "filtered_index"):  # shared, once, plain keys
        assert assets[AssetKey(stage)].group_names_by_key[AssetKey(stage)] == "imagenet_w21"
    rels = releases.from_env(env)
    for name, shards in (("w21_webp", 8), ("in12k", 4), ("w21_jpeg", 8)):
        plan, wds, audit = (AssetKey([name, s]) for s in ("shuffled_plan", "wds_shards", "shard_audit"))
        for key in (plan, wds, audit):
            assert assets[key].group_names_by_key[key] == name
        assert assets[plan].asset_deps[plan] == {AssetKey("filtered_index")}
        assert assets[wds].asset_deps[wds] == {plan} and assets[audit].asset_deps[audit] == {wds}
        keys = assets[wds].partitions_def.get_partition_keys()
        assert keys == releases.by_name(rels, name).partition_keys  # (+ validation shards for val_per_class)
        assert keys[:shards] == [f"{i:04d}" for i in range(shards)]
        assert {c.asset_key for c in assets[wds].check_specs} == {wds}
        assert {c.name for c in assets[audit].check_specs} == {"nothing_lost_or_duplicated", "info_json_agrees"}
    assert sorted(s.name for s in defs.schedules) == sorted(f"{n}_wds_shards_topup" for n in ("w21_webp", "in12k", "w21_jpeg"))
    assert len(defs.sensors) == 6
    # each release's schedule targets its own shards, and each release's shards code version its own settings
    topup = {s.name: s for s in defs.schedules}["in12k_wds_shards_topup"]
    job = defs.get_repository_def().get_job(topup.job_name)
    assert job.asset_layer.selected_asset_keys == {AssetKey(["in12k", "wds_shards"])}


def test_a_shard_run_counts_for_its_own_release_only(tmp_path):
    """Every release's partitions are 0000, 0001, ...: a run in flight for one release's partition
    (launched with an asset selection, as the UI and the schedule do; or tagged with its release,
    as `imnet build` and the asset itself do) leaves the same partition of another release alone."""
    from dagster import instance_for_test

    from imnet_assets.definitions import build_definitions
    from imnet_assets.defs.release_keys import RELEASE_TAG
    from imnet_assets.defs.schedules import PARTITION_TAG, shard_partition_status

    env = env_for(tmp_path, '[release.a]\nout_root = "out/a"\n[release.b]\nout_root = "out/b"\n')
    a, b = releases.from_env(env)
    job = build_definitions(Settings.from_env(env), [a, b]).resolve_implicit_global_asset_job_def()
    (tmp_path / "dagster_home").mkdir()
    with instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        instance.create_run_for_job(job_def=job, asset_selection={AssetKey(["a", "wds_shards"])},
                                    tags={PARTITION_TAG: "0001"})
        instance.create_run_for_job(job_def=job, tags={PARTITION_TAG: "0002", RELEASE_TAG: "b"})
        of_a, of_b = shard_partition_status(a, instance), shard_partition_status(b, instance)
    assert (of_a["0001"], of_b["0001"]) == ("in_flight", "missing")
    assert (of_a["0002"], of_b["0002"]) == ("missing", "in_flight")
