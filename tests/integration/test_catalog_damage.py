"""A damaged catalog, caused for real on a small built release (imnet sample-raw + imnet build):
cut short, its header overwritten, 64 KiB overwritten inside table data, a text file in its place.
Every command that opens it prints one line naming the file and the recovery, and exits non-zero;
the recovery (move it aside, `imnet build`) gives the same catalog content and rewrites no shard.
Then, with the same release: a raw tar changed in place (same size and mtime) fails its shard's
rebuild naming the tar, `imnet status` names it, and the next build heals it; a tampered byte
count in the catalog fails `imnet verify` naming the tar."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import duckdb
import pytest

from tests.conftest import built_sample_release, copy_built_release, imnet
from tests.core.test_changed_sources import change_in_place

TABLES = ["raw_tars", "synsets", "images", "tar_scans", "plan", "shards", "shard_samples", "shard_exclusions"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return built_sample_release(tmp_path_factory, "catalog_damage")


@pytest.fixture
def copy(release, tmp_path):
    """A private copy of the built release: out root, catalog and raw root."""
    return copy_built_release(release, tmp_path)


def content(catalog: Path) -> dict[str, list]:
    with duckdb.connect(str(catalog), read_only=True) as con:
        return {t: sorted(map(repr, con.execute(f"SELECT * FROM {t}").fetchall())) for t in TABLES}


def shard_files(out: Path) -> dict[str, tuple[int, str]]:
    """Each shard tar and manifest: (mtime_ns, sha256)."""
    files = [*out.glob("*.tar"), *(out / "_manifests").glob("*.json")]
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}


def table_data_offset(catalog: Path) -> int:
    """A byte offset inside a block holding the images table's data."""
    with duckdb.connect(str(catalog), read_only=True) as con:
        block_size = con.execute("SELECT block_size FROM pragma_database_size()").fetchone()[0]
        block = con.execute("SELECT min(block_id) FROM pragma_storage_info('images') WHERE block_id >= 0").fetchone()[0]
    return 3 * 4096 + block * block_size + 4096  # DuckDB's file starts with three 4 KiB headers


def damage(catalog: Path, kind: str) -> None:
    size = catalog.stat().st_size
    if kind == "cut":
        os.truncate(catalog, size // 2)
    elif kind == "header":
        with open(catalog, "r+b") as f:
            f.write(os.urandom(4096))
    elif kind == "mid-file":
        at = table_data_offset(catalog)
        assert at + 65536 < size
        with open(catalog, "r+b") as f:
            f.seek(at)
            f.write(os.urandom(65536))
    else:
        catalog.write_text("this is not a catalog\n")


@pytest.mark.parametrize("kind", ["cut", "header", "mid-file", "text"])
def test_every_command_names_the_damaged_catalog_and_the_recovery(copy, kind):
    tmp, env = copy
    catalog = tmp / "catalog.duckdb"
    with duckdb.connect(str(catalog), read_only=True) as con:
        key = con.execute("SELECT min(key) FROM images WHERE status = 'kept'").fetchone()[0]
    before = shard_files(tmp / "out")
    damage(catalog, kind)
    for command in (["status"], ["build"], ["lineage", key], ["verify"]):
        result = imnet(command, env, cwd=tmp, check=False)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode != 0, (command, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout, (command, result.stderr)
        said = [line for line in lines if "is damaged" in line]
        assert len(said) == 1 and len(lines) == 1, (command, result.stderr)
        assert str(catalog) in said[0] and "move it aside" in said[0] and "`imnet build`" in said[0], said
        assert "fresh" not in result.stdout, (command, result.stdout)
    assert shard_files(tmp / "out") == before


def test_moving_the_catalog_aside_and_building_recovers_it_without_rewriting_a_shard(copy):
    tmp, env = copy
    catalog = tmp / "catalog.duckdb"
    was = content(catalog)
    before = shard_files(tmp / "out")
    damage(catalog, "mid-file")
    catalog.rename(tmp / "catalog.duckdb.damaged")
    built = imnet(["build"], env, cwd=tmp)
    assert "3 of 3 selected shards fresh, 0 to build" in built.stdout, built.stdout
    assert "shard_audit      ok" in built.stdout, built.stdout
    assert content(catalog) == was
    assert shard_files(tmp / "out") == before  # no shard, manifest or commit record rewritten
    assert imnet(["verify"], env, cwd=tmp).returncode == 0


def test_a_raw_tar_changed_in_place_fails_its_shard_is_named_by_status_and_healed_by_the_next_build(copy):
    tmp, env = copy
    with duckdb.connect(str(tmp / "catalog.duckdb"), read_only=True) as con:
        key, tar, member, offset, size, shard = con.execute(
            'SELECT key, tar, member, "offset", size, shard FROM plan WHERE size > 20000 ORDER BY key LIMIT 1').fetchone()
    change_in_place(tmp / "raw" / tar, offset, size)
    shard_tar = next((tmp / "out").glob(f"*-{shard}.tar"))
    shard_tar.unlink()  # its rebuild reads the changed source

    failed = imnet(["build"], env, cwd=tmp, check=False)
    assert failed.returncode != 0, failed.stdout
    assert re.search(rf"raw tar {re.escape(tar)} member {re.escape(member)}", failed.stdout), failed.stdout
    assert "excluded" not in failed.stdout.split("FAILED", 1)[1]

    status = imnet(["status"], env, cwd=tmp)
    assert re.search(r"filtered_index +stale", status.stdout) and re.search(r"shuffled_plan +stale", status.stdout)
    assert f"raw tar {tar} changed since indexing" in status.stdout, status.stdout

    healed = imnet(["build"], env, cwd=tmp)
    assert "filtered_index   materialized" in healed.stdout and "shuffled_plan    materialized" in healed.stdout
    assert "shard_audit      ok" in healed.stdout, healed.stdout
    with duckdb.connect(str(tmp / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("SELECT status FROM images WHERE key = ?", [key]).fetchone()[0] == "kept"
        assert con.execute("SELECT count(*) FROM shard_samples WHERE key = ?", [key]).fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM shard_exclusions").fetchone()[0] == 0
    status = imnet(["status"], env, cwd=tmp)
    assert "changed since indexing" not in status.stdout and "stale" not in status.stdout, status.stdout


def test_a_tampered_byte_count_fails_verify_naming_the_tar(copy):
    tmp, env = copy
    with duckdb.connect(str(tmp / "catalog.duckdb")) as con:
        tar = con.execute("SELECT min(tar) FROM tar_scans").fetchone()[0]
        con.execute("UPDATE tar_scans SET accounted_bytes = accounted_bytes + 512 WHERE tar = ?", [tar])
    result = imnet(["verify"], env, cwd=tmp, check=False)
    assert result.returncode != 0, result.stdout
    assert re.search(rf"FAIL conservation: tar {re.escape(tar)}: its walk read \d+ bytes", result.stdout), result.stdout


def test_status_after_a_visible_raw_change_says_the_shards_are_judged_against_a_stale_plan(copy):
    tmp, env = copy
    tar = sorted((tmp / "raw").glob("*.tar"))[0]
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))  # touched: the listing differs
    status = imnet(["status"], env, cwd=tmp).stdout
    assert re.search(r"filtered_index +stale", status) and re.search(r"shuffled_plan +stale", status), status
    assert "judged against the published plan, which is stale" in status, status


def test_a_dagster_run_of_an_asset_over_a_damaged_catalog_fails_with_the_one_line(copy):
    """As the UI, the schedule or the sensor would start them: the asset's run fails, and its
    failure is the line naming the file and the recovery."""
    from imnet_assets.orchestrate.build import Build
    from tests.conftest import environ, settings_of

    tmp, env = copy
    damage(tmp / "catalog.duckdb", "mid-file")
    with environ(**{k: v for k, v in env.items() if k.startswith("IMNET_")}):
        build = Build(settings_of(env))
        for asset in ("shard_audit", "shuffled_plan"):
            _result, failures = build.materialize([asset])
            assert len(failures) == 1 and "is damaged" in failures[0], (asset, failures)
            assert f"catalog {tmp / 'catalog.duckdb'}" in failures[0] and "move it aside" in failures[0]
