"""`imnet build` with several shard runs at once, `--keep-going`, and a shard that fails: each
shard run is a Dagster run in the instance; a failure stops the build or, with --keep-going,
is named at the end with the audit skipped."""

from __future__ import annotations

import os
import shutil

import pytest

from imnet_assets.defs.schedules import LAUNCHED_BY_TAG
from imnet_assets.sample.sample_raw import write_sample_raw
from tests.conftest import build_env, dagster_home, environ, imnet

KEYS = ["0000", "0001", "0002", "0003"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A small release with its catalog stages and plan built (no shards yet)."""
    tmp = tmp_path_factory.mktemp("runs")
    write_sample_raw(tmp / "raw", synsets=3, images=10, seed=1)
    env = build_env(tmp, tmp / "raw", IMNET_WORKERS="1")
    imnet(["build", "--shards", "none"], env)
    return tmp, env


def copy_of(planned, tmp_path, break_shard: str | None = None) -> dict[str, str]:
    """A private copy of the planned release (out root and catalog) with its own Dagster home;
    `break_shard`: that shard's plan slice is overwritten (not the one the plan's index names), so its run fails."""
    tmp, env = planned
    shutil.copytree(tmp / "out", tmp_path / "out")
    shutil.copy(tmp / "catalog.duckdb", tmp_path / "catalog.duckdb")
    if break_shard:
        (tmp_path / "out" / "_plan" / f"{break_shard}.csv").write_text("not,a,plan,slice\n")
    return {**env, "IMNET_OUT_ROOT": str(tmp_path / "out"), "IMNET_CATALOG": str(tmp_path / "catalog.duckdb"),
            "DAGSTER_HOME": str(dagster_home(tmp_path))}


def shard_files(env) -> list[str]:
    return sorted(p[len("imagenet12k-train-"):-4] for p in os.listdir(env["IMNET_OUT_ROOT"]) if p.endswith(".tar"))


def shard_runs(env) -> dict[str, str]:
    """Partition key -> status of its (latest) wds_shards run in the instance."""
    from dagster import DagsterInstance, RunsFilter

    with environ(DAGSTER_HOME=env["DAGSTER_HOME"]), DagsterInstance.get() as inst:
        runs = inst.get_runs(RunsFilter(tags={LAUNCHED_BY_TAG: "imnet build"}))
        return {r.tags["dagster/partition"]: r.status.value for r in reversed(runs) if "dagster/partition" in r.tags}


def test_two_shard_runs_at_once_each_a_dagster_run(planned, tmp_path):
    env = copy_of(planned, tmp_path)
    out = imnet(["build", "--parallel", "2"], env).stdout
    assert "wds_shards: 2 shard runs at once, sharing 1 encode worker\n" in out, out
    assert all(f"shard {k}: " in out for k in KEYS) and "shard_audit      ok" in out, out
    assert shard_runs(env) == dict.fromkeys(KEYS, "SUCCESS")
    assert shard_files(env) == KEYS


def test_keep_going_builds_the_others_and_names_the_failed_shard(planned, tmp_path):
    env = copy_of(planned, tmp_path, break_shard="0001")
    result = imnet(["build", "--keep-going", "--parallel", "2"], env, check=False)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert shard_files(env) == ["0000", "0002", "0003"]
    assert "shard 0001: FAILED" in out and "_plan/0001.csv is damaged" in out, out  # not the index's slice
    assert "imnet build: wds_shards[0001] FAILED" in out and "1 of 4 shards failed: 0001" in out, out
    assert "shard_audit: skipped (it vouches for every shard" in out and "shard_audit      ok" not in out, out
    assert shard_runs(env) == {"0000": "SUCCESS", "0001": "FAILURE", "0002": "SUCCESS", "0003": "SUCCESS"}
    assert not os.path.exists(os.path.join(env["IMNET_OUT_ROOT"], "_info.json"))


def test_without_keep_going_the_first_failure_stops_the_build(planned, tmp_path):
    env = copy_of(planned, tmp_path, break_shard="0001")
    result = imnet(["build", "--parallel", "1"], env, check=False)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "stopping at the first failure (--keep-going builds the others)" in out, out
    assert shard_files(env) == ["0000"]  # 0002 and 0003 never started
    assert shard_runs(env) == {"0000": "SUCCESS", "0001": "FAILURE"}


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_parallel_takes_a_positive_count(planned, tmp_path, value):
    result = imnet(["build", "--parallel", value], planned[1], check=False)
    assert result.returncode == 2 and "--parallel" in result.stderr and "whole number" in result.stderr


def test_the_first_shard_is_encoded_ahead_of_its_run_and_the_shards_are_the_same(planned, tmp_path):
    """With the stages fresh and IMNET_WORKERS > 1, the first shard's first jobs go to the encoders
    while the build starts (orchestrate/first_look.py); its run takes them over: every shard is byte
    for byte the one a build with one worker and nothing ahead writes."""
    import hashlib

    env = copy_of(planned, tmp_path)
    imnet(["build"], env)  # IMNET_WORKERS=1: no pool, nothing ahead
    out_root = env["IMNET_OUT_ROOT"]
    tars = sorted(p for p in os.listdir(out_root) if p.endswith(".tar"))
    reference = {p: hashlib.sha256(open(os.path.join(out_root, p), "rb").read()).hexdigest() for p in tars}
    for p in tars:
        os.remove(os.path.join(out_root, p))
    shutil.rmtree(os.path.join(out_root, "_manifests"))
    out = imnet(["build"], {**env, "IMNET_WORKERS": "2"}).stdout
    assert "shard 0000's first " in out and "ahead of its run" in out, out
    assert out.count("fresh, skipped") == 4 and "shard_audit      ok" in out, out
    assert {p: hashlib.sha256(open(os.path.join(out_root, p), "rb").read()).hexdigest() for p in tars} == reference
    assert shard_runs(env) == dict.fromkeys(KEYS, "SUCCESS")
