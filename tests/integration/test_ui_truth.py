"""The UI tells what `imnet status` says, at a glance: one shard changed on storage shows as failed,
by its partition key, within one tick of the `wds_shards_on_storage` sensor.

A small demo-like world (8 shards, `imnet build` into a DAGSTER_HOME with the project's
dagster.yaml), then `dagster dev` on that instance as tests/integration/test_dagster_ui.py starts
it. One shard's tar is changed on storage; `imnet status` says 1 stale. The same is asserted
through Dagster's GraphQL API (the check's partition statuses and executions, the partition's
observation, the sensor's tick and the audit's reconciliation check) and in the UI itself with
Debian's headless Chromium (Playwright): the check's partitions view names the failed shard, the
audit shows its failed check and its distributions as labelled tables. Screenshots are kept under
the test's folder (and in UI_TEST_SCREENSHOTS, when set).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import build_env, dagster_home, imnet
from tests.integration.test_dagster_ui import ACTIVE, DagsterDev, metadata

NUM_SHARDS = 8
CHANGED = "0003"
GONE = "0005"
CHROMIUM = "/usr/bin/chromium"  # Debian's package `chromium` (.ci/run installs it)
SENSOR = "wds_shards_on_storage"
CHECK = "shard_holds_its_plan"


@pytest.fixture(scope="module")
def world(sample_release, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("truth")
    env = build_env(tmp, sample_release[0], DAGSTER_HOME=str(dagster_home(tmp)),
                    IMNET_NUM_SHARDS=str(NUM_SHARDS), IMNET_WORKERS="1")
    imnet(["build"], env, cwd=tmp)
    status = imnet(["status"], env, cwd=tmp).stdout
    assert f"{NUM_SHARDS} fresh" in status, status
    dev = DagsterDev(tmp, env)
    try:
        dev.wait_ready()
        yield tmp, env, dev
    finally:
        dev.stop()


def sensor_ticks(dev: DagsterDev, limit: int = 5, name: str = SENSOR) -> list[dict]:
    data = dev.query(
        """query($s: SensorSelector!, $n: Int) { sensorOrError(sensorSelector: $s) { __typename
             ... on Sensor { sensorState { status ticks(limit: $n) { id status timestamp skipReason
               error { message } } } } } }""",
        s=dev.selector(sensorName=name), n=limit,
    )["sensorOrError"]
    assert data["__typename"] == "Sensor", data
    assert data["sensorState"]["status"] == "RUNNING"
    return data["sensorState"]["ticks"]


def check_partition_statuses(dev: DagsterDev) -> dict:
    nodes = dev.query(
        """{ assetNodes(assetKeys: [{path: ["wds_shards"]}]) { assetChecksOrError { ... on AssetChecks {
             checks { name partitionStatuses { __typename ... on AssetCheckDefaultPartitionStatuses {
               succeededPartitions failedPartitions inProgressPartitions skippedPartitions
               executionFailedPartitions } } } } } } }""")["assetNodes"]
    (check,) = [c for c in nodes[0]["assetChecksOrError"]["checks"] if c["name"] == CHECK]
    return check["partitionStatuses"] or {}


def test_a_shard_changed_on_storage_shows_as_failed_in_dagster_within_one_tick(world):
    tmp, env, dev = world
    out = tmp / "out"
    keys = [f"{i:04d}" for i in range(NUM_SHARDS)]

    # every partition materialized by `imnet build`, every check result carrying its partition
    stats = dev.query('{ assetNodes(assetKeys: [{path: ["wds_shards"]}]) { partitionStats { '
                      "numMaterialized numPartitions numFailed } } }")["assetNodes"][0]["partitionStats"]
    assert stats == {"numMaterialized": NUM_SHARDS, "numPartitions": NUM_SHARDS, "numFailed": 0}
    execs = dev.check_executions("wds_shards", CHECK)
    assert sorted(e["partition"] for e in execs) == keys, execs
    assert check_partition_statuses(dev)["succeededPartitions"] == keys

    # the audit sensor's first tick asks for an audit of these shards (it has not seen them): let
    # it finish before the change, or it would audit the changed shard (and fail for that reason)
    dev.wait("the audit sensor's first tick", lambda: [
        t for t in sensor_ticks(dev, name="shard_audit_when_complete") if t["status"] in ("SUCCESS", "SKIPPED")],
        cap=180, every=3)
    dev.wait("the run queue to drain", lambda: not dev.runs(statuses=ACTIVE), cap=240, every=3)

    # the sensor's first tick says what `imnet status` says: all fresh (its skip reason, in its ticks)
    first = dev.wait("the sensor's first tick", lambda: [t for t in sensor_ticks(dev) if t["status"] == "SKIPPED"],
                     cap=180, every=3)[0]
    assert f"{NUM_SHARDS} shards: {NUM_SHARDS} fresh" in first["skipReason"], first

    # a per-partition metadata page is readable: humanized size, the shard's name
    mats = {m["partition"]: metadata(m) for m in dev.materializations("wds_shards")}
    md = mats[CHANGED]
    assert re.fullmatch(r"\d+(\.\d)? (B|KiB|MiB|GiB)", md["size"]["text"]), md["size"]
    assert md["shard"]["text"].startswith(CHANGED)
    assert "excluded_reasons" not in md or md["excluded_reasons"]["__typename"] == "TextMetadataEntry"

    # one shard's tar changes on storage (same name, other bytes): `imnet status` says 1 stale
    tar = out / f"imagenet12k-train-{CHANGED}.tar"
    before = tar.stat()
    with open(tar, "ab") as f:
        f.write(b"\0" * 1024)
    status = imnet(["status"], env, cwd=tmp).stdout
    assert f"{NUM_SHARDS - 1} fresh" in status and "1 stale" in status and f"not fresh: {CHANGED}" in status, status

    # within one tick, Dagster's own API says so: the check fails for that partition only
    def reported():
        ticks = [t for t in sensor_ticks(dev) if float(t["timestamp"]) > float(first["timestamp"])]
        return ticks[0] if ticks and "1 stale" in (ticks[0]["skipReason"] or "") else None

    tick = dev.wait("the sensor's next tick to report the changed shard", reported, cap=180, every=3)
    assert f"not fresh: {CHANGED}" in tick["skipReason"] and f"{CHANGED} stale" in tick["skipReason"], tick
    partition_statuses = check_partition_statuses(dev)
    assert partition_statuses["failedPartitions"] == [CHANGED], partition_statuses
    assert sorted(partition_statuses["succeededPartitions"]) == [k for k in keys if k != CHANGED]
    latest = [e for e in dev.check_executions("wds_shards", CHECK) if e["partition"] == CHANGED][0]
    assert latest["status"] == "FAILED" and not latest["evaluation"]["success"], latest
    assert "stale" in latest["evaluation"]["description"], latest
    # ... the partition's events hold an observation saying why, with a new data version
    obs = dev.query(
        """query($k: AssetKeyInput!, $p: [String!]) { assetOrError(assetKey: $k) { ... on Asset {
             assetObservations(partitions: $p, limit: 5) { partition description tags { key value }
               metadataEntries { label ... on TextMetadataEntry { text } } } } } }""",
        k={"path": ["wds_shards"]}, p=[CHANGED])["assetOrError"]["assetObservations"]
    assert obs and metadata(obs[0])["imnet_status"]["text"] == "stale", obs
    assert any(t["key"] == "dagster/data_version" and t["value"].startswith("stale@") for t in obs[0]["tags"]), obs
    # ... and the audit, done before the change, now fails its reconciliation naming the shard
    audit = dev.check_executions("shard_audit", "nothing_lost_or_duplicated")
    assert audit[0]["status"] == "FAILED" and f"{CHANGED} stale" in audit[0]["evaluation"]["description"], audit
    assert audit[1]["status"] == "SUCCEEDED", audit  # the audit itself, before the change
    info = dev.check_executions("shard_audit", "info_json_agrees")
    assert info[0]["status"] == "SUCCEEDED", info
    # the audit sensor's ticks say why it asks for no audit now (SkipReason)
    sensed = dev.dry_run("sensor", "shard_audit_when_complete")
    assert not sensed["runRequests"] and CHANGED in sensed["skipReason"], sensed
    dev.wait("an audit sensor tick that names the changed shard", lambda: [
        t for t in sensor_ticks(dev, name="shard_audit_when_complete")
        if t["status"] == "SKIPPED" and f"shard {CHANGED} is not in yet (stale" in (t["skipReason"] or "")],
        cap=180, every=3)

    # the audit's distributions are tables with every bucket labelled, sizes humanized
    (audit_mat,) = dev.materializations("shard_audit", 1)
    amd = metadata(audit_mat)
    assert re.fullmatch(r"\d+\.\d (KiB|MiB|GiB)", amd["shard_size"]["text"]), amd["shard_size"]
    for name in ("class_sizes", "image_short_sides"):
        assert amd[name]["__typename"] == "TableMetadataEntry", amd[name]
        rows = [json.loads(r) for r in amd[name]["table"]["records"]]
        label = amd[name]["table"]["schema"]["columns"][0]["name"]
        assert rows and all(re.fullmatch(r"\d+(–\d+)? (samples|px)", r[label]) for r in rows), rows

    browse(dev, tmp)

    # the tar put back as committed (its bytes and stamp): fresh again, said within one more tick (a
    # second verdict for the same partition must not break the sensor's tick)
    os.truncate(tar, before.st_size)
    os.utime(tar, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert f"{NUM_SHARDS} fresh" in imnet(["status"], env, cwd=tmp).stdout

    def fresh_again():
        ticks = [t for t in sensor_ticks(dev) if float(t["timestamp"]) > float(tick["timestamp"])]
        assert not any(t["status"] == "FAILURE" for t in ticks), ticks
        return ticks[0] if ticks and f"{CHANGED} fresh again" in (ticks[0]["skipReason"] or "") else None

    again = dev.wait("the sensor's tick to report the shard fresh again", fresh_again, cap=180, every=3)
    partition_statuses = check_partition_statuses(dev)
    assert partition_statuses["failedPartitions"] == [] and sorted(partition_statuses["succeededPartitions"]) == keys
    assert dev.check_executions("shard_audit", "nothing_lost_or_duplicated")[0]["status"] == "SUCCEEDED"

    # another shard's tar goes: missing, as `imnet status` says
    (out / f"imagenet12k-train-{GONE}.tar").unlink()
    assert f"not fresh: {GONE}" in imnet(["status"], env, cwd=tmp).stdout

    def gone():
        ticks = [t for t in sensor_ticks(dev) if float(t["timestamp"]) > float(again["timestamp"])]
        return ticks[0] if ticks and f"{GONE} missing" in (ticks[0]["skipReason"] or "") else None

    dev.wait("the sensor's tick to report the missing shard", gone, cap=180, every=3)
    assert check_partition_statuses(dev)["failedPartitions"] == [GONE]


def browse(dev: DagsterDev, tmp: Path) -> None:
    """The same, as a person sees it in the UI (Chromium, headless)."""
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} missing: apt-get install chromium (.ci/run does)"
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # a loaded machine renders slowly
    shots = tmp / "screenshots"
    shots.mkdir(exist_ok=True)
    base = dev.url.removesuffix("/graphql")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.set_default_timeout(60_000)

            def visit(path: str) -> None:
                page.goto(base + path)
                skip = page.get_by_role("button", name="Skip")  # Dagster's "join the community" dialog
                try:
                    skip.first.click(timeout=5_000)
                except PlaywrightTimeout:
                    pass

            # the asset's overview: its latest check results show one failure
            visit("/assets/wds_shards")
            expect(page.get_by_text("Latest check results").first).to_be_visible()
            # the check's partitions view: the changed shard, by key, failed; the others passed
            visit(f"/assets/wds_shards?view=checks&checkDetail={CHECK}")
            expect(page.get_by_text(CHECK).first).to_be_visible()
            page.get_by_text("Partitions", exact=True).last.click()
            expect(page.get_by_text("Failed (1)", exact=True)).to_be_visible()
            expect(page.get_by_text(f"Passed ({NUM_SHARDS - 1})", exact=True)).to_be_visible()
            page.locator(f'text="{CHANGED}" >> visible=true').last.click()
            page.screenshot(path=str(shots / "check_partitions.png"))
            # the partition's own page says what `imnet status` says, above its materialization's metadata
            visit(f"/assets/wds_shards?view=partitions&partition={CHANGED}")
            expect(page.get_by_text("imnet_status", exact=True).first).to_be_visible()
            expect(page.get_by_text("stale", exact=True).first).to_be_visible()
            expect(page.get_by_text("size", exact=True).first).to_be_visible()
            page.screenshot(path=str(shots / "partition.png"))
            # the audit: its failed reconciliation names the shard; the distributions are labelled tables
            visit("/assets/shard_audit?view=checks&checkDetail=nothing_lost_or_duplicated")
            expect(page.get_by_text(f"{CHANGED} stale").first).to_be_visible()
            page.screenshot(path=str(shots / "audit_checks.png"))
            visit("/assets/shard_audit")
            expect(page.get_by_text("samples per class", exact=True).first).to_be_visible()
            expect(page.get_by_text("source short side", exact=True).first).to_be_visible()
            expect(page.get_by_text("shard_size", exact=True).first).to_be_visible()
            page.get_by_text("class_sizes", exact=True).first.scroll_into_view_if_needed()
            page.screenshot(path=str(shots / "audit.png"))
        finally:
            browser.close()
    if keep := os.environ.get("UI_TEST_SCREENSHOTS"):
        shutil.copytree(shots, keep, dirs_exist_ok=True)


def test_distributions_label_every_bucket_and_sizes_read_as_people_write_them():
    from imnet_assets.defs.assets.common import human_bytes, reason_counts
    from imnet_assets.defs.assets.shard_audit import distribution

    assert [human_bytes(n) for n in (0, 1023, 1536, 1288490189, 3 << 40)] == [
        "0 B", "1023 B", "1.5 KiB", "1.2 GiB", "3.0 TiB"]
    assert reason_counts({"too_small": 1, "decode": 2}) == "decode: 2, too_small: 1"
    table = distribution([(0, 2), (20, 1)], 10, "samples per class", "samples", "classes")
    rows = [r.data for r in table.records]
    assert [(r["samples per class"], r["classes"], r["share"]) for r in rows] == [
        ("0–9 samples", 2, "66.7%"), ("10–19 samples", 0, "0.0%"), ("20–29 samples", 1, "33.3%")]
    assert rows[0]["bar"] == "█" * 40 and rows[1]["bar"] == "" and rows[2]["bar"] == "█" * 20
    assert [r.data["px"] for r in distribution([(5, 1)], 1, "px", "px", "n").records] == ["5 px"]
