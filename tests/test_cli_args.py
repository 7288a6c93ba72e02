"""`imnet build --shards SPEC`: which partitions a shard spec selects."""

from __future__ import annotations

import pytest

from imnet_assets.cli import parse_shards
from imnet_assets.settings import SettingsError

KEYS = [f"{i:04d}" for i in range(16)]


def test_ranges_and_single_shards():
    assert parse_shards("0000-0002,0005", KEYS) == ["0000", "0001", "0002", "0005"]
    assert parse_shards("0015", KEYS) == ["0015"]
    assert parse_shards("0003-0003", KEYS) == ["0003"]


def test_unpadded_numbers_and_spaces_are_accepted():
    assert parse_shards(" 1-2 , 7 ", KEYS) == ["0001", "0002", "0007"]


def test_order_given_is_kept_and_repeats_are_dropped():
    assert parse_shards("0005,0000-0002,0001,0005", KEYS) == ["0005", "0000", "0001", "0002"]


@pytest.mark.parametrize("spec", [None, "", "all"])
def test_all_or_nothing_selects_every_shard(spec):
    assert parse_shards(spec, KEYS) == KEYS
    assert parse_shards(spec, KEYS) is not KEYS  # a copy the caller may change


@pytest.mark.parametrize(
    "spec",
    [
        "abc",
        "0000-",
        "-0003",
        "0001-0002-0003",
        "0000..0003",
        "1.5",
        "0016",  # one past the last shard
        "0010-0020",  # runs past the last shard
        "0005-0002",  # a backwards range selects nothing: an error, not a silent empty build
        ",",  # nothing at all
    ],
)
def test_bad_specs_raise_settings_error(spec):
    with pytest.raises(SettingsError, match="--shards"):
        parse_shards(spec, KEYS)


def test_none_selects_no_shard():
    from imnet_assets.cli import parse_shards

    assert parse_shards("none", [f"{i:04d}" for i in range(4)]) == []
