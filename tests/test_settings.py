"""Settings.from_env: SPEC's defaults, every IMNET_* variable, and clear errors for bad values."""

from __future__ import annotations

import os

import pytest

from imnet_assets.settings import (
    DEFAULT_SHARD_PATTERN,
    DEFAULT_WEBP_METHOD,
    DEFAULT_WEBP_QUALITY,
    Settings,
    SettingsError,
    parse_holdout,
    project_root,
    shard_key,
)


def test_defaults_follow_the_spec_table():
    s = Settings.from_env({})
    root = project_root({})  # relative paths resolve against the project root
    assert s.raw_root == str(root / "data/raw")
    assert s.out_root == str(root / "data/out")
    assert s.catalog == str(root / "data/catalog.duckdb")
    assert s.num_shards == 1024
    assert s.seed == 0
    assert s.shard_pattern == "imagenet12k-train-{shard}.tar" == DEFAULT_SHARD_PATTERN
    assert s.workers == (os.cpu_count() or 1)
    assert s.holdout == ()
    assert (s.webp_quality, s.webp_method) == (DEFAULT_WEBP_QUALITY, DEFAULT_WEBP_METHOD)
    assert 0 <= s.webp_quality <= 100 and 0 <= s.webp_method <= 6
    # Partition keys: the shard numbers zero-padded to 4 digits, 0000 ... 1023.
    keys = s.partition_keys
    assert len(keys) == 1024 and keys[0] == "0000" and keys[-1] == "1023"
    assert keys == sorted(keys) and len(set(keys)) == 1024
    assert s.shard_name("0042") == "imagenet12k-train-0042.tar"


def test_empty_values_mean_the_default():
    env = {name: "" for name in (
        "IMNET_RAW_ROOT", "IMNET_OUT_ROOT", "IMNET_CATALOG", "IMNET_NUM_SHARDS", "IMNET_SEED",
        "IMNET_SHARD_PATTERN", "IMNET_WEBP_QUALITY", "IMNET_WEBP_METHOD", "IMNET_WORKERS", "IMNET_HOLDOUT",
    )}
    assert Settings.from_env(env) == Settings.from_env({})


def test_every_variable_is_read():
    env = {
        "IMNET_RAW_ROOT": "s3://bucket/raw/",
        "IMNET_OUT_ROOT": "/tmp/somewhere/out/",
        "IMNET_CATALOG": "/tmp/somewhere/cat.duckdb",
        "IMNET_NUM_SHARDS": "16",
        "IMNET_SEED": "1234",
        "IMNET_SHARD_PATTERN": "w21-{shard}.tar",
        "IMNET_WEBP_QUALITY": "77",
        "IMNET_WEBP_METHOD": "6",
        "IMNET_WORKERS": "3",
        "IMNET_HOLDOUT": "validation:2,test:1",
        "IMNET_SCHEDULE_CRON": "0 * * * *",
        "IMNET_SCHEDULE_MAX_RUNS": "5",
    }
    s = Settings.from_env(env)
    assert s.raw_root == "s3://bucket/raw"  # trailing slash dropped
    assert s.out_root == "/tmp/somewhere/out"
    assert s.catalog == "/tmp/somewhere/cat.duckdb"
    assert s.num_shards == 16
    assert s.seed == 1234
    assert s.shard_pattern == "w21-{shard}.tar"
    assert s.shard_name("0007") == "w21-0007.tar"
    assert (s.webp_quality, s.webp_method) == (77, 6)
    assert s.workers == 3
    assert s.holdout == (("validation", 2), ("test", 1))
    assert s.schedule_cron == "0 * * * *"
    assert s.schedule_max_runs == 5
    assert s.partition_keys == [f"{i:04d}" for i in range(16)]


def test_from_env_without_argument_reads_the_process_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("IMNET_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("IMNET_NUM_SHARDS", "12")
    monkeypatch.setenv("IMNET_SEED", "9")
    s = Settings.from_env()
    assert (s.num_shards, s.seed) == (12, 9)


def test_bounds_are_inclusive():
    s = Settings.from_env({"IMNET_NUM_SHARDS": "1", "IMNET_WEBP_QUALITY": "0", "IMNET_WEBP_METHOD": "0",
                           "IMNET_WORKERS": "1"})
    assert (s.num_shards, s.webp_quality, s.webp_method, s.workers) == (1, 0, 0, 1)
    s = Settings.from_env({"IMNET_NUM_SHARDS": "9999", "IMNET_WEBP_QUALITY": "100", "IMNET_WEBP_METHOD": "6"})
    assert (s.num_shards, s.webp_quality, s.webp_method) == (9999, 100, 6)
    assert s.partition_keys[-1] == "9998"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IMNET_NUM_SHARDS", "abc"),
        ("IMNET_NUM_SHARDS", "0"),
        ("IMNET_NUM_SHARDS", "-4"),
        ("IMNET_NUM_SHARDS", "10000"),
        ("IMNET_NUM_SHARDS", "2.5"),
        ("IMNET_SEED", "-1"),
        ("IMNET_SEED", "seed"),
        ("IMNET_WEBP_QUALITY", "101"),
        ("IMNET_WEBP_QUALITY", "-1"),
        ("IMNET_WEBP_QUALITY", "high"),
        ("IMNET_WEBP_METHOD", "7"),
        ("IMNET_WORKERS", "0"),
        ("IMNET_WORKERS", "many"),
        ("IMNET_SCHEDULE_MAX_RUNS", "0"),
        ("IMNET_IMAGE_TIMEOUT", "0"),
        ("IMNET_IMAGE_TIMEOUT", "ten minutes"),
        ("IMNET_SCHEDULE_CRON", "every minute"),
        ("IMNET_SCHEDULE_CRON", "99 * * * *"),
        ("IMNET_HOLDOUT", "validation"),
        ("IMNET_HOLDOUT", "validation:0"),
        ("IMNET_HOLDOUT", "validation:-1"),
        ("IMNET_HOLDOUT", "validation:two"),
        ("IMNET_HOLDOUT", "validation:\u00b2"),  # a digit to str.isdigit, not to int()
        ("IMNET_HOLDOUT", ":2"),
        ("IMNET_HOLDOUT", "train:1"),
        ("IMNET_HOLDOUT", "test:1,test:2"),
        ("IMNET_HOLDOUT", "val-1:1"),  # Hugging Face datasets refuses the split name (the card's configs)
        ("IMNET_HOLDOUT", "my split:1"),
        ("IMNET_HOLDOUT", "validation:2,test:2"),  # takes all 4 shards: nothing left for train
        ("IMNET_SHARD_PATTERN", "imagenet-train.tar"),
        ("IMNET_SHARD_PATTERN", "sub/{shard}.tar"),
        ("IMNET_SHARD_PATTERN", "{shard}-{part}.tar"),
        ("IMNET_SHARD_PATTERN", "{shard}-{.tar"),
        ("IMNET_SHARD_PATTERN", "{shard}-{0}.tar"),
        ("IMNET_SHARD_PATTERN", "{{shard}}.tar"),  # an escaped brace: one name for every shard
    ],
)
def test_bad_values_raise_settings_error_naming_the_variable(name, value):
    env = {"IMNET_NUM_SHARDS": "4", name: value}
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    assert name in str(err.value)


def test_holdout_may_not_take_the_alt_label_split_name():
    # with IMNET_ALT_LABELS=in1k, _info.json's train_in1k is made of the train shards: a holdout split
    # of that name was overwritten by it, and its shards were in no split at all
    env = {"IMNET_NUM_SHARDS": "4", "IMNET_HOLDOUT": "train_in1k:1", "IMNET_ALT_LABELS": "in1k"}
    with pytest.raises(SettingsError, match=r"IMNET_HOLDOUT names the 'train_in1k' split.*IMNET_ALT_LABELS=in1k"):
        Settings.from_env(env)
    assert Settings.from_env({**env, "IMNET_ALT_LABELS": ""}).holdout == (("train_in1k", 1),)


def test_settings_error_is_a_value_error():
    assert issubclass(SettingsError, ValueError)


def test_parse_holdout():
    assert parse_holdout("") == ()
    assert parse_holdout("validation:2") == (("validation", 2),)
    assert parse_holdout("val_1:1,test.b:1") == (("val_1", 1), ("test.b", 1))
    assert parse_holdout("validation:2,test:2") == (("validation", 2), ("test", 2))
    # Order is kept (it decides which of the last shards each split takes); spaces are ignored.
    assert parse_holdout(" test : 1 , validation:3 ,") == (("test", 1), ("validation", 3))


def test_holdout_must_leave_train_a_shard():
    s = Settings.from_env({"IMNET_NUM_SHARDS": "4", "IMNET_HOLDOUT": "validation:2,test:1"})
    assert s.holdout == (("validation", 2), ("test", 1))
    with pytest.raises(SettingsError, match="IMNET_HOLDOUT"):
        Settings.from_env({"IMNET_NUM_SHARDS": "3", "IMNET_HOLDOUT": "validation:2,test:1"})


def test_custom_shard_pattern_names_every_partition_distinctly():
    s = Settings.from_env({"IMNET_NUM_SHARDS": "20", "IMNET_SHARD_PATTERN": "part-{shard}-of-w21.tar"})
    names = [s.shard_name(k) for k in s.partition_keys]
    assert names[3] == "part-0003-of-w21.tar"
    assert len(set(names)) == 20
    assert all("/" not in n for n in names)
    # Literal braces are allowed when escaped.
    s = Settings.from_env({"IMNET_SHARD_PATTERN": "w21{{x}}-{shard}.tar"})
    assert s.shard_name("0001") == "w21{x}-0001.tar"


def test_shard_key_is_zero_padded():
    assert shard_key(0) == "0000"
    assert shard_key(42) == "0042"
    assert shard_key(1023) == "1023"


def test_audit_sensor_switch():
    import pytest

    from imnet_assets.settings import Settings, SettingsError

    assert Settings.from_env({}).audit_sensor is True
    assert Settings.from_env({"IMNET_AUDIT_SENSOR": "off"}).audit_sensor is False
    with pytest.raises(SettingsError, match="IMNET_AUDIT_SENSOR"):
        Settings.from_env({"IMNET_AUDIT_SENSOR": "maybe"})


def test_check_decode_every():
    import pytest

    from imnet_assets.settings import Settings, SettingsError

    assert Settings.from_env({}).check_decode_every == 16
    assert Settings.from_env({"IMNET_CHECK_DECODE_EVERY": "1"}).check_decode_every == 1
    assert Settings.from_env({"IMNET_CHECK_DECODE_EVERY": "0"}).check_decode_every == 0
    with pytest.raises(SettingsError, match="IMNET_CHECK_DECODE_EVERY"):
        Settings.from_env({"IMNET_CHECK_DECODE_EVERY": "-1"})


def test_image_timeout_is_generous_by_default_and_read_where_the_encoder_runs():
    from imnet_assets.settings import image_timeout

    assert Settings.from_env({}).image_timeout == image_timeout({}) == 600
    assert Settings.from_env({"IMNET_IMAGE_TIMEOUT": "5"}).image_timeout == image_timeout({"IMNET_IMAGE_TIMEOUT": "5"}) == 5


@pytest.mark.parametrize(
    ("raw", "out", "how"),
    [
        ("/data/raw", "/data/raw", "is the raw root"),
        ("/data/raw", "/data/raw/", "is the raw root"),
        ("/data/raw", "/data/raw/out", "is inside the raw root"),
        ("/data/raw", "/data/raw/../raw/wds", "is inside the raw root"),
        ("/data/raw", "/data", "contains the raw root"),
        ("/data/raw", "/", "contains the raw root"),
        ("file:///data/raw", "/data/raw/wds", "is inside the raw root"),
        ("s3://bucket/raw", "s3://bucket/raw", "is the raw root"),
        ("s3://bucket/raw", "s3://bucket/raw/wds", "is inside the raw root"),
        ("s3://bucket/raw/", "s3a://bucket//raw/wds", "is inside the raw root"),
        ("s3://bucket/raw/winter21", "s3://bucket/raw", "contains the raw root"),
        ("s3://bucket/raw", "s3://bucket", "contains the raw root"),
    ],
)
def test_an_out_root_overlapping_the_raw_root_is_refused(raw, out, how):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"IMNET_RAW_ROOT": raw, "IMNET_OUT_ROOT": out})
    text = str(err.value)
    assert how in text and "IMNET_OUT_ROOT" in text and "IMNET_RAW_ROOT" in text and "\n" not in text, text


@pytest.mark.parametrize(
    ("raw", "out"),
    [
        ("/data/raw", "/data/raw2"),  # a sibling whose name starts the same
        ("/data/raw", "/data/out"),
        ("s3://bucket/raw", "s3://bucket/raw2"),
        ("s3://bucket/raw", "s3://other/raw"),  # another bucket
        ("s3://bucket/raw", "/bucket/raw"),  # a local folder is not the bucket
    ],
)
def test_roots_apart_are_accepted(raw, out):
    s = Settings.from_env({"IMNET_RAW_ROOT": raw, "IMNET_OUT_ROOT": out})
    assert (s.raw_root, s.out_root) == (raw, out)


def test_roots_are_compared_after_resolving_relative_paths_and_links(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (tmp_path / "link").symlink_to(raw)
    root = {"IMNET_PROJECT_ROOT": str(tmp_path)}  # relative paths are the project root's
    with pytest.raises(SettingsError, match="is inside the raw root"):
        Settings.from_env({**root, "IMNET_RAW_ROOT": "raw", "IMNET_OUT_ROOT": str(tmp_path / "link" / "out")})
    with pytest.raises(SettingsError, match="is the raw root"):
        Settings.from_env({**root, "IMNET_RAW_ROOT": str(raw), "IMNET_OUT_ROOT": "./link"})
