"""The out-root damage sweep's cases whose code paths differ on an s3:// out root (moto's S3 server
on 127.0.0.1): the audit's seal read through the object store, the commit-record ledger (S3 only),
a plan slice set aside there, and verify removing a commit record there. On S3 a changed object
always has another ETag (the stamp freshness compares), so a changed shard is stale at once; the
cases run one after another on one built release, each ending byte-equal to the clean build."""

from __future__ import annotations

import hashlib

import pytest

from tests.conftest import dagster_home, imnet
from tests.integration.test_s3 import OUT_BUCKET, RAW_BUCKET, s3_env
from tests.s3server import MotoS3

SHARD0 = "wds/imagenet12k-train-0000.tar"


def objects(client) -> dict[str, str]:
    """Every object under the out root but the commit records, manifests and the ledger: sha256."""
    return {k: hashlib.sha256(v).hexdigest() for k, v in MotoS3.all_objects(client, OUT_BUCKET).items()
            if not k.startswith("wds/_manifests/")}


def put(client, key: str, data: bytes) -> None:
    client.put_object(Bucket=OUT_BUCKET, Key=key, Body=data)


def get(client, key: str) -> bytes:
    return client.get_object(Bucket=OUT_BUCKET, Key=key)["Body"].read()


def status(env, cwd) -> str:
    proc = imnet(["status"], env, cwd=cwd)
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stdout


def flipped(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x20 if b[at] else 0x31
    return bytes(b)


@pytest.fixture(scope="module")
def s3_release(sample_release, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3damage")
    with MotoS3() as s3:
        client = s3.client()
        MotoS3.fresh_buckets(client, RAW_BUCKET, OUT_BUCKET)  # moto's state outlives a server
        s3.put_tree(client, sample_release[0], RAW_BUCKET, "winter21")
        env = s3_env(tmp, s3, DAGSTER_HOME=str(dagster_home(tmp)))
        imnet(["build"], env, cwd=tmp)
        yield tmp, env, client, objects(client)


@pytest.mark.parametrize("name", ["wds/_info.json", "wds/README.md", "wds/_plan/_index.json"])
def test_a_damaged_small_file_on_s3_is_not_fresh_and_build_writes_it_again(s3_release, name):
    tmp, env, client, clean = s3_release
    put(client, name, flipped(get(client, name), 40))
    said = status(env, tmp)
    assert "shard_audit      fresh" not in said, said
    built = imnet(["build"], env, cwd=tmp)
    assert "0 to build" in built.stdout, built.stdout
    # the index is the plan's: made again identical, the audit's record still holds
    redone = "shuffled_plan    materialized" if name.endswith("_index.json") else "shard_audit      ok"
    assert redone in built.stdout, built.stdout
    assert objects(client) == clean
    assert "shard_audit      fresh" in status(env, tmp)


@pytest.mark.parametrize("kind", ["byte", "empty"])
def test_a_damaged_ledger_costs_reads_never_a_wrong_verdict(s3_release, kind):
    tmp, env, client, clean = s3_release
    ledger = "wds/_manifests/_commit_records.json"
    data = get(client, ledger)
    put(client, ledger, flipped(data, len(data) // 2) if kind == "byte" else b"")
    said = status(env, tmp)
    assert "wds_shards       4 fresh" in said and "shard_audit      fresh" in said, said
    assert "0 to build" in imnet(["build"], env, cwd=tmp).stdout
    assert objects(client) == clean


def test_a_damaged_slice_and_shard_on_s3_fail_naming_the_slice_then_are_repaired(s3_release):
    tmp, env, client, clean = s3_release
    put(client, "wds/_plan/0000.csv", flipped(get(client, "wds/_plan/0000.csv"), 100))
    put(client, SHARD0, flipped(get(client, SHARD0), 5000))
    assert "not fresh: 0000" in status(env, tmp)
    verify = imnet(["verify"], env, cwd=tmp, check=False)
    assert verify.returncode != 0 and "FAIL shard 0000" in verify.stdout, verify.stdout
    failed = imnet(["build"], env, cwd=tmp, check=False)
    assert failed.returncode != 0 and "0000.csv is damaged" in failed.stdout + failed.stderr
    built = imnet(["build"], env, cwd=tmp)
    assert "shuffled_plan    materialized" in built.stdout and "1 to build" in built.stdout, built.stdout
    assert objects(client) == clean
    imnet(["verify"], env, cwd=tmp)


@pytest.mark.parametrize("kind", ["removed", "byte"])
def test_a_manifest_removed_or_changed_on_s3_is_not_fresh_and_build_writes_its_shard_alone(s3_release, kind):
    """A shard's commit record holds its manifest's size and stamp (the ETag): a manifest removed, or
    with a byte changed (still valid JSON), makes the shard stale at once, the ledger's cached record
    notwithstanding; verify fails it naming the manifest; the next build writes that shard alone."""
    tmp, env, client, clean = s3_release
    name = "wds/_manifests/0000.json"
    if kind == "removed":
        client.delete_object(Bucket=OUT_BUCKET, Key=name)
    else:
        data = get(client, name)
        put(client, name, flipped(data, data.index(b'"sha256":"') + 12))
    assert "not fresh: 0000" in status(env, tmp)
    verify = imnet(["verify"], env, cwd=tmp, check=False)
    said = verify.stdout + verify.stderr
    assert verify.returncode != 0 and "FAIL shard 0000" in said and "0000.json is " in said, said
    built = imnet(["build"], env, cwd=tmp)
    assert "1 to build" in built.stdout, built.stdout
    assert objects(client) == clean
    assert "not fresh" not in status(env, tmp)
    imnet(["verify"], env, cwd=tmp)


def _held_at_fault(proxy, args: list[str], env: dict, cwd, what: str):
    """A real `imnet ARGS` process through `proxy`, once it has met the proxy's first injected fault
    (held there while the fault lasts): the caller acts meanwhile, then clears the fault."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    exe = shutil.which("imnet", path=os.path.dirname(sys.executable)) or "imnet"  # as conftest.imnet
    process = subprocess.Popen([exe, *args], env={**env, "AWS_ENDPOINT_URL": proxy.endpoint}, cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not proxy.injected["slowdown"] and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.injected["slowdown"], f"imnet {' '.join(args)} never went to {what}"
    return process


def _batch_delete(method: str, target: str, headers: dict) -> bool:
    return method == "POST" and "delete" in target.partition("?")[2]  # s3fs removes a key by DeleteObjects


def test_verify_never_forgets_the_commit_of_a_shard_a_build_rewrote_meanwhile(s3_release):
    """Two real processes on one out root (SPEC "Failure behaviour": one build at a time per out
    root; verify is not a build): verify fails a damaged shard and goes to remove its commit record,
    but the storage throttles that request (503 SlowDown, retried); meanwhile `imnet build` writes
    the shard again, correct, and commits it. The throttled remove must never take the new commit
    away: the shard the build wrote stays fresh, or the build was told to wait for verify."""

    from tests.latency_proxy import LatencyProxy

    tmp, env, client, clean = s3_release
    put(client, SHARD0, flipped(get(client, SHARD0), 5000))
    with LatencyProxy(env["AWS_ENDPOINT_URL"], latency_ms=0) as proxy:
        throttled = proxy.slowdown(600, match=_batch_delete, after=1)
        verifying = _held_at_fault(proxy, ["verify"], env, tmp, "remove the commit record")
        built = imnet(["build"], env, cwd=tmp, check=False)  # the same out root, while verify waits
        proxy.clear_faults()
        throttled.until = 0
        said = verifying.communicate(timeout=300)[0]
    assert verifying.returncode != 0 and "FAIL shard 0000" in said, said
    rewritten = hashlib.sha256(get(client, SHARD0)).hexdigest() == clean[SHARD0]
    if rewritten:  # the build committed it: its record must still be there
        assert "not fresh" not in status(env, tmp), (built.stdout, said)
    else:  # the build was refused the shard while verify held it, naming verify
        assert built.returncode != 0 and "imnet verify" in built.stdout + built.stderr, built.stdout + built.stderr
        assert "1 to build" in imnet(["build"], env, cwd=tmp).stdout
    assert objects(client) == clean
    imnet(["verify"], env, cwd=tmp)


SHARD1 = "wds/imagenet12k-train-0001.tar"


def _shard1_request(method: str, target: str, headers: dict) -> bool:
    return method in ("HEAD", "GET") and target.partition("?")[0] == f"/{OUT_BUCKET}/{SHARD1}"


def test_a_shard_a_build_rewrites_while_verify_checks_it_is_not_checked_never_failed(s3_release):
    """`imnet verify` reads the catalog (the spool of every shard's rows) and shard 0001's commit
    record, then goes to read the shard (a byte of it changed: damaged, and stale); its first request
    for the tar is held (answered 503 SlowDown, which it retries) while `imnet build`, a real build
    of the same out root, writes the shard again and commits it with its own record, and its audit
    records the new commit in the catalog. Released, verify reads what the build wrote against the
    catalog as it read it: a shard changed under verify is no damage. It says NOT CHECKED, naming
    the change (exit 3, as for any shard not checked while nothing failed), never FAIL, and the new commit stays: fresh,
    and the next verify passes."""

    from tests.latency_proxy import LatencyProxy

    tmp, env, client, clean = s3_release
    put(client, SHARD1, flipped(get(client, SHARD1), 5000))  # damaged (another stamp: not fresh)
    record = get(client, "wds/_manifests/0001.state.json")
    with LatencyProxy(env["AWS_ENDPOINT_URL"], latency_ms=0) as proxy:
        held = proxy.slowdown(600, match=_shard1_request, after=1)
        verifying = _held_at_fault(proxy, ["verify", "--jobs", "1"], env, tmp, "read shard 0001")
        built = imnet(["build"], env, cwd=tmp)  # the same out root, while verify waits on the shard
        proxy.clear_faults()
        held.until = 0
        said = verifying.communicate(timeout=300)[0]
    assert "1 to build" in built.stdout, built.stdout
    rewritten = get(client, "wds/_manifests/0001.state.json")
    assert rewritten != record  # the build's commit
    assert verifying.returncode == 3, said
    assert "FAIL" not in said, said
    assert "NOT CHECKED shard 0001 (imagenet12k-train-0001.tar): it changed while it was checked: " in said, said
    assert "3 of 4 shards ok, 1 NOT CHECKED (0001)" in said, said
    assert "verify: 4/4 shards done (0 failed, 1 not checked)" in said, said  # not counted as failed
    assert get(client, "wds/_manifests/0001.state.json") == rewritten  # the new commit is never forgotten
    assert objects(client) == clean
    assert "not fresh" not in status(env, tmp)
    imnet(["verify"], env, cwd=tmp)


def _manifest2_get(method: str, target: str, headers: dict) -> bool:
    return method == "GET" and target.partition("?")[0] == f"/{OUT_BUCKET}/wds/_manifests/0002.json"


def test_a_manifest_replaced_between_the_audits_look_and_its_load_is_never_recorded(s3_release):
    """The audit looks at the out root (listings, commit records), then loads every manifest; shard
    0002's manifest is replaced in between (its read is held, answered 503 SlowDown, while another
    valid manifest of the same size, another run's, takes its place): the audit must not record it
    (the bytes it loaded are not the sha256 the commit record committed). It names the manifest and
    removes the shard's commit record; no catalog row names the other run; the next build writes
    that shard again, and all ends as the clean build."""
    import json

    from tests.checks import catalog
    from tests.latency_proxy import LatencyProxy

    tmp, env, client, clean = s3_release
    put(client, "wds/_info.json", flipped(get(client, "wds/_info.json"), 40))  # the audit runs again
    name = "wds/_manifests/0002.json"
    committed = get(client, name)
    run = json.loads(committed)["run_id"]
    other = committed.replace(f'"run_id":"{run}"'.encode(), f'"run_id":"{run[::-1]}"'.encode())
    assert other != committed and len(other) == len(committed)
    with LatencyProxy(env["AWS_ENDPOINT_URL"], latency_ms=0) as proxy:
        held = proxy.slowdown(600, match=_manifest2_get, after=1)
        building = _held_at_fault(proxy, ["build"], env, tmp, "load manifest 0002 (the audit)")
        put(client, name, other)  # between the audit's look and its load
        proxy.clear_faults()
        held.until = 0
        said = building.communicate(timeout=300)[0]
    assert building.returncode != 0, said
    assert "shard 0002: its manifest s3://out-bucket/wds/_manifests/0002.json is missing or damaged" in said, said
    with catalog(tmp / "catalog.duckdb") as con:
        runs = {r[0] for r in con.execute("SELECT DISTINCT run_id FROM shards").fetchall()}
    assert run[::-1] not in runs, runs
    assert "0002.state.json" not in "".join(MotoS3.all_objects(client, OUT_BUCKET, "wds/_manifests/"))
    built = imnet(["build"], env, cwd=tmp)
    assert "1 to build" in built.stdout, built.stdout
    assert objects(client) == clean
    assert "not fresh" not in status(env, tmp)
    imnet(["verify"], env, cwd=tmp)
