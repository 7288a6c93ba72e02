"""A read fault is never called damage by the checkers (SPEC "Failure behaviour").

A small release (3 synsets x 12 images, 3 shards) is built on moto once; then `imnet verify`,
`imnet status`, `imnet lineage KEY` and a second `imnet build` (everything fresh) are run through the
fault proxy (tests/latency_proxy.py) with the k-th GET of an out-root object cut short (still
promising the whole body, or with its Content-Length rewritten to the part: a well-formed short
answer only the object's checksum, or where the store sends none its Content-Range, tells), reset mid-body, lost, or answered 503 SlowDown for a
while. Each gives the answer it gives without faults (verify: every shard ok; status: every shard
fresh; build: all fresh, nothing rewritten), and no object of the out root changes (their ETags and
LastModified): never "damaged", "mismatch", "stale" or a failed run for a shard that is whole.
"""

from __future__ import annotations

import uuid

import duckdb
import pytest

from imnet_assets.sample.sample_raw import write_sample_raw
from tests.conftest import build_env, dagster_home, imnet
from tests.latency_proxy import LatencyProxy
from tests.s3server import MotoS3

RAW_BUCKET, OUT_BUCKET = "chk-raw", "chk-out"
RAW_ROOT, OUT_ROOT = f"s3://{RAW_BUCKET}/winter21", f"s3://{OUT_BUCKET}/wds"
NUM_SHARDS = 3
FALSE_VERDICTS = ("damaged", "mismatch", "stale", "FAILED", "differs", "Traceback", "unreadable")


def _stamps(client) -> dict[str, tuple[str, str]]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=OUT_BUCKET):
        for o in page.get("Contents", []):
            out[o["Key"]] = (o["ETag"], str(o["LastModified"]))
    return out


def _out_get(method: str, target: str, headers: dict) -> bool:
    """A GET of an object of the out root (not a listing)."""
    return method == "GET" and "?" not in target and target.startswith(f"/{OUT_BUCKET}/")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("check-faults")
    write_sample_raw(tmp / "raw", synsets=3, images=12, seed=0)
    with MotoS3(secret=f"chkSecret-{uuid.uuid4().hex}") as s3, LatencyProxy(s3.endpoint, latency_ms=0) as proxy:
        client = s3.client()
        MotoS3.fresh_buckets(client, RAW_BUCKET, OUT_BUCKET)
        s3.put_tree(client, tmp / "raw", RAW_BUCKET, "winter21")
        env = build_env(tmp, RAW_ROOT, IMNET_OUT_ROOT=OUT_ROOT, IMNET_NUM_SHARDS=str(NUM_SHARDS),
                        DAGSTER_HOME=str(dagster_home(tmp)), IMNET_STORAGE_RETRY_SECONDS="20")
        for k in [k for k in env if k.startswith("AWS_")]:
            del env[k]
        env.update(s3.env())
        env["AWS_ENDPOINT_URL"] = proxy.endpoint
        imnet(["build"], env, cwd=tmp)
        with duckdb.connect(str(tmp / "catalog.duckdb"), read_only=True) as con:
            key = con.execute("SELECT key FROM images ORDER BY key LIMIT 1").fetchone()[0]
        yield {"env": env, "proxy": proxy, "client": client, "cwd": tmp, "key": key}


# What each command says when all is well.
FINE = {
    "verify": f"verify: {NUM_SHARDS} of {NUM_SHARDS} shards ok",
    "status": f"wds_shards       {NUM_SHARDS} fresh",
    "build": f"{NUM_SHARDS} of {NUM_SHARDS} selected shards fresh, 0 to build",
    "lineage": "written by",
}

# (command, fault, k): the k-th GET of an out-root object. verify GETs the plan's index, then the 3
# shards (ranged), then _info.json; status and build GET the index, again, the freshness ledger
# (_commit_records.json), the index again.
CASES = [
    ("verify", "cut-length", 1), ("verify", "cut-length", 2), ("verify", "cut-length", 5),
    ("verify", "cut", 3), ("verify", "reset", 2), ("verify", "lost", 4), ("verify", "503", 2),
    ("status", "cut-length", 1), ("status", "cut-length", 3), ("status", "reset", 3), ("status", "503", 3),
    ("build", "cut-length", 3), ("build", "cut-length", 5), ("build", "lost", 3), ("build", "503", 1),
    # a store that names no checksum of the object (MinIO, Ceph, an object written without one): only
    # the answer's Content-Range tells the part from the whole object
    ("verify", "cut-length-no-checksum", 5), ("status", "cut-length-no-checksum", 2),
    ("status", "cut-length-no-checksum", 3), ("build", "cut-length-no-checksum", 3),
    ("lineage", "reset", 1),
]


@pytest.mark.parametrize(("command", "fault", "k"), CASES, ids=[f"{c}-{f}-{k}" for c, f, k in CASES])
def test_a_read_fault_is_never_called_damage(built, command, fault, k):
    proxy, client = built["proxy"], built["client"]
    args = {"lineage": ["lineage", built["key"]]}.get(command, [command])
    count = {"n": 0}

    def kth(method: str, target: str, headers: dict) -> bool:
        if _out_get(method, target, headers):
            count["n"] += 1
            return count["n"] == k
        return False

    before = _stamps(client)
    proxy.injected.clear()
    if fault == "503":  # every out-root request answered SlowDown for 2 s from the k-th GET on
        proxy.slowdown(2, match=lambda m, t, h: t.startswith(f"/{OUT_BUCKET}"), after=k, when=_out_get)
    elif fault == "lost":
        proxy.lose(match=kth, times=None)
    elif fault == "reset":
        proxy.reset(match=kth)
    else:
        proxy.cut(match=kth, rewrite_length=fault.startswith("cut-length"), checksum="no-checksum" not in fault)
    try:
        result = imnet(args, built["env"], cwd=built["cwd"], check=False)
    finally:
        proxy.clear_faults()
    out = result.stdout + result.stderr
    if command != "lineage":  # lineage reads the catalog only: nothing of the out root to fault
        assert sum(proxy.injected.values()) >= 1, (count, out[-2000:])
    assert result.returncode == 0, out[-3000:]
    assert FINE[command] in out, out[-3000:]
    assert not [w for w in FALSE_VERDICTS if w in out], out[-3000:]
    assert _stamps(client) == before  # nothing rewritten, removed or added


@pytest.mark.parametrize("checksum", [True, False], ids=["checksum", "no-checksum"])
def test_a_short_body_of_one_of_many_documents_is_read_again_never_taken_for_it(built, checksum):
    """fs.read_json_many (the audit's manifests, freshness's commit records): the 2nd of 6 documents
    comes back cut short with its Content-Length rewritten; it is read again, never taken as absent
    (None: a manifest missing, a shard stale) or as the part."""
    from imnet_assets.storage import fs
    from tests.conftest import environ

    proxy, client = built["proxy"], built["client"]
    urls = [f"s3://{OUT_BUCKET}/many/{i}.json" for i in range(6)]
    for i, url in enumerate(urls):
        client.put_object(Bucket=OUT_BUCKET, Key=url.split("/", 3)[3], Body=b'{"n": %d, "pad": "%s"}' % (i, b"x" * 64))
    count = {"n": 0}

    def second(method: str, target: str, headers: dict) -> bool:
        if _out_get(method, target, headers) and "/many/" in target:
            count["n"] += 1
            return count["n"] == 2
        return False

    proxy.injected.clear()
    proxy.cut(match=second, rewrite_length=True, checksum=checksum)
    env = {k: v for k, v in built["env"].items() if k.startswith("AWS_")}
    try:
        with environ(**env, IMNET_STORAGE_RETRY_SECONDS="20"):
            got = fs.read_json_many(urls)
    finally:
        proxy.clear_faults()
        for url in urls:
            client.delete_object(Bucket=OUT_BUCKET, Key=url.split("/", 3)[3])
    assert proxy.injected["cut"] == 1
    assert got == {url: {"n": i, "pad": "x" * 64} for i, url in enumerate(urls)}
