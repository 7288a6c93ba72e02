"""A read fault is never called damage by the checkers (SPEC "Failure behaviour").

A small release (3 synsets x 12 images, 3 shards) is built on moto once; then `imnet verify`,
`imnet status`, `imnet lineage KEY` and a second `imnet build` (everything fresh) are run through the
fault proxy (tests/latency_proxy.py) with the k-th GET of an out-root object cut short (still
promising the whole body, or with its Content-Length rewritten to the part: a well-formed short
answer only the object's checksum, or where the store sends none its Content-Range, tells), reset mid-body, lost, or answered 503 SlowDown for a
while. Each gives the answer it gives without faults (verify: every shard ok; status: every shard
fresh; build: all fresh, nothing rewritten), and no object of the out root changes (their ETags and
LastModified): never "damaged", "mismatch", "stale" or a failed run for a shard that is whole.
So do a second build and `imnet status` with a page of one of their listings (asked for in pages of
2 entries) cut, reset, lost or answered 5xx: never a shorter listing.
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


def _listing_of(prefix: str):
    """Selects the requests of ListObjectsV2 pages under exactly `prefix` (a key prefix of the bucket)."""
    from urllib.parse import parse_qs

    def match(method: str, target: str, headers: dict) -> bool:
        query = parse_qs(target.partition("?")[2])
        return method == "GET" and "list-type" in query and query.get("prefix") == [prefix]

    return match


# (command, the listing, its k-th page, fault). Listings asked for in pages of 2 entries: the raw
# root's 5 files span 3 pages, the out root's and _manifests/'s 4. Each is listed more than once
# (k counts every page of that prefix's listings, in order): a build's first look (orchestrate/
# first_look.py) lists first, and a fault that outlasts its retries there is looked again by the
# build; the 13th page of _manifests/ is the build's own last look (without the retry of a 5xx by
# its status, this build failed there).
LISTING_CASES = [
    ("build", "winter21/", 1, "cut-length"), ("build", "winter21/", 3, "lost"),
    ("build", "wds/", 1, "cut"), ("build", "wds/", 4, "cut-length"),
    ("build", "wds/_manifests/", 2, "reset"), ("build", "wds/_manifests/", 13, "503-own-code"),
    ("build", "wds/_manifests/_changed_sources/", 1, "500"), ("build", "wds/_locks/", 1, "lost"),
    ("status", "wds/", 2, "cut-length"), ("status", "wds/_manifests/", 4, "lost"),
]


@pytest.mark.parametrize(("command", "prefix", "k", "fault"), LISTING_CASES,
                         ids=[f"{c}-{p.strip('/').replace('/', '.')}-{k}-{f}" for c, p, k, f in LISTING_CASES])
def test_a_fault_on_a_page_of_a_listing_is_never_a_shorter_listing(built, command, prefix, k, fault):
    """A second `imnet build` (everything fresh) and `imnet status`, with the k-th page of one of
    their listings (the raw root's, the out root's, _manifests/, the changed sources', the leases')
    cut short, reset, lost or answered 5xx: the page is asked again; never synsets missing, a shard
    taken as absent or stale, a shard rebuilt or the freshness ledger rewritten."""
    proxy, client = built["proxy"], built["client"]
    listing, count = _listing_of(prefix), {"n": 0}

    def kth(method: str, target: str, headers: dict) -> bool:
        if listing(method, target, headers):
            count["n"] += 1
            return count["n"] == k
        return False

    before = _stamps(client)
    proxy.injected.clear()
    proxy.page_size = 2
    if fault == "lost":
        proxy.lose(match=kth)
    elif fault == "reset":
        proxy.reset(match=kth)
    elif fault.startswith("cut"):
        proxy.cut(match=kth, rewrite_length=fault == "cut-length")
    else:  # a store's own code for a 503 (MinIO starting), S3's for a 500
        proxy.answer(int(fault[:3]), "XMinioServerNotInitialized" if fault == "503-own-code" else "InternalError",
                     match=kth)
    try:
        result = imnet([command], built["env"], cwd=built["cwd"], check=False)
    finally:
        proxy.clear_faults()
        proxy.page_size = None
    out = result.stdout + result.stderr
    assert sum(proxy.injected.values()) == 1, (count, out[-2000:])
    assert result.returncode == 0, out[-3000:]
    assert FINE[command] in out, out[-3000:]
    assert not [w for w in FALSE_VERDICTS if w in out], out[-3000:]
    if command == "build":
        assert "3 to build" not in out and out.count("fresh, skipped") >= 4, out[-3000:]
    assert _stamps(client) == before  # nothing rewritten, removed or added


def _shard_tars(client, prefix: str) -> dict[str, str]:
    """name -> sha256 of the shard tars directly under s3://OUT_BUCKET/prefix/."""
    import hashlib

    return {k.rpartition("/")[2]: hashlib.sha256(v).hexdigest()
            for k, v in MotoS3.all_objects(client, OUT_BUCKET, f"{prefix}/").items()
            if k.endswith(".tar") and k.count("/") == 1}


def test_a_fault_on_the_read_back_of_a_shard_is_retried_or_fails_its_run_never_damage(built, tmp_path):
    """A build into another out root while its shards' read-backs (the check of each committed tar:
    HEAD, then ranged GETs) are cut short (a well-formed short answer with no checksum; one still
    promising the rest), reset, lost or answered 500: each is read again and the shard is committed,
    byte for byte the clean build's. One shard whose every read-back GET is answered 503 past the
    retry budget fails its run naming its tar (a StorageError, not a failed check: no verdict on a
    shard that may be whole), and is not recorded as committed; no exclusion, repair or damage; the
    rerun builds that shard alone and equals the clean build. Meanwhile pages of the raw root's
    listing are cut short and of the leases' and multipart uploads' (atomic.remove_partials) lost:
    no synset is missing (the shards would differ)."""
    proxy, client = built["proxy"], built["client"]
    clean = _shard_tars(client, "wds")
    assert len(clean) == NUM_SHARDS
    names = sorted(clean)
    env = {**built["env"], "IMNET_OUT_ROOT": f"s3://{OUT_BUCKET}/rb", "IMNET_CATALOG": str(tmp_path / "catalog.duckdb"),
           "DAGSTER_HOME": str(dagster_home(tmp_path)), "IMNET_STORAGE_RETRY_SECONDS": "4"}

    def first(method: str, name: str):
        """The first of the requests the proxy asks this fault about (a fault asked before it that
        applied hides a request from it: the second fault on a name hits the first's retry)."""
        count = {"n": 0}

        def match(m: str, target: str, headers: dict) -> bool:
            if m != method or target != f"/{OUT_BUCKET}/rb/{name}" or (m == "GET" and "range" not in headers):
                return False
            count["n"] += 1
            return count["n"] == 1
        return match

    proxy.injected.clear()
    proxy.fault_log.clear()
    proxy.cut(match=first("GET", names[0]), rewrite_length=True, checksum=False)
    proxy.reset(match=first("GET", names[0]))  # the cut read's retry
    proxy.cut(match=first("GET", names[1]), rewrite_length=False)
    proxy.lose(match=first("HEAD", names[1]))
    proxy.answer(500, "InternalError", match=first("HEAD", names[1]))  # the lost HEAD's retry
    proxy.answer(503, "SlowDown", times=None,
                 match=lambda m, t, h: m == "GET" and "range" in h and t == f"/{OUT_BUCKET}/rb/{names[2]}")
    # and the listings a first build makes, in pages of 2: every 2nd page of the raw root's (the
    # first look's and raw_tars') cut short, every 3rd of the leases' lost, multipart uploads' lost
    proxy.page_size = 2
    proxy.cut(match=_listing_of("winter21/"), every=2, rewrite_length=True)
    proxy.lose(match=lambda m, t, h: _listing_of("rb/_locks/")(m, t, h) or (m == "GET" and "?uploads" in t),
               every=3, times=None)
    try:
        first = imnet(["build"], env, cwd=tmp_path, check=False)
    finally:
        proxy.clear_faults()
        proxy.page_size = None
    out = first.stdout + first.stderr
    lost = [f[2] for f in proxy.fault_log if f[0] == "lost"]
    assert len([f for f in proxy.fault_log if f[0] == "cut" and "list-type" in f[2]]) >= 2, proxy.fault_log
    assert any("_locks" in t for t in lost) and any("?uploads" in t for t in lost), lost
    reads = [f[0] for f in proxy.fault_log if f[2].startswith(f"/{OUT_BUCKET}/rb/") and "?" not in f[2]]
    assert sorted(set(reads)) == ["cut", "lost", "reset", "status"] and reads.count("cut") == 2, proxy.fault_log
    assert reads.count("status") > 2, reads
    assert first.returncode != 0, out[-3000:]
    assert names[2] in out and "IMNET_STORAGE_RETRY_SECONDS" in out, out[-3000:]
    assert not [w for w in ("damaged", "excluded)", "Traceback") if w in out], out[-3000:]
    # a run failed by the storage, not a failed check: no verdict on a shard that may be whole
    assert f"cannot read back s3://{OUT_BUCKET}/rb/{names[2]} to check it" in out, out[-3000:]
    assert "shard_holds_its_plan" not in out and "check failed" not in out, out[-3000:]
    committed = {k.rpartition("/")[2] for k in MotoS3.all_objects(client, OUT_BUCKET, "rb/_manifests/")
                 if k.endswith(".state.json")}
    assert len(committed) == NUM_SHARDS - 1, committed  # the shard whose check could not read it back: not committed
    again = imnet(["build"], env, cwd=tmp_path, check=False)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert f"{NUM_SHARDS - 1} of {NUM_SHARDS} selected shards fresh, 1 to build" in out, out[-3000:]
    assert _shard_tars(client, "rb") == clean
    for key in MotoS3.all_objects(client, OUT_BUCKET, "rb/"):
        client.delete_object(Bucket=OUT_BUCKET, Key=key)


@pytest.mark.parametrize("command", ["build", "status"])
def test_a_listing_that_faults_past_the_retry_budget_fails_naming_it_and_changes_nothing(built, command):
    """Every page of the out root's listing answered 503 past a 2 s budget: the command fails
    naming the listing, never a verdict from a listing it could not make (every shard absent,
    stale, built again), and nothing under the out root changes."""
    proxy, client = built["proxy"], built["client"]
    before = _stamps(client)
    proxy.injected.clear()
    proxy.answer(503, "SlowDown", match=_listing_of("wds/"), times=None)
    try:
        result = imnet([command], {**built["env"], "IMNET_STORAGE_RETRY_SECONDS": "2"}, cwd=built["cwd"], check=False)
    finally:
        proxy.clear_faults()
    out = result.stdout + result.stderr
    assert proxy.injected["status"] >= 2, out[-2000:]
    assert result.returncode != 0, out[-3000:]
    assert f"cannot list s3://{OUT_BUCKET}/wds" in out and "IMNET_STORAGE_RETRY_SECONDS" in out, out[-3000:]
    assert not [w for w in ("damaged", "stale", "to build", "missing", "Traceback") if w in out], out[-3000:]
    assert _stamps(client) == before


def test_a_shard_the_storage_does_not_give_past_the_budget_is_not_checked_never_failed(built):
    """`imnet verify` while every ranged GET of one shard is answered 503 past a 2 s budget: that
    shard is reported NOT CHECKED naming the storage's error (no FAIL, no "unreadable" verdict on
    a shard that is whole), the others ok, and verify exits non-zero."""
    proxy, client = built["proxy"], built["client"]
    name = sorted(_shard_tars(client, "wds"))[0]
    proxy.injected.clear()
    proxy.answer(503, "SlowDown", times=None,
                 match=lambda m, t, h: m == "GET" and "range" in h and t == f"/{OUT_BUCKET}/wds/{name}")
    try:
        result = imnet(["verify"], {**built["env"], "IMNET_STORAGE_RETRY_SECONDS": "2"}, cwd=built["cwd"], check=False)
    finally:
        proxy.clear_faults()
    out = result.stdout + result.stderr
    assert proxy.injected["status"] >= 2, out[-2000:]
    assert result.returncode != 0, out[-3000:]
    assert "NOT CHECKED shard" in out and f"({name}): " in out and "not checked:" not in out and "IMNET_STORAGE_RETRY_SECONDS" in out, out
    assert f"verify: {NUM_SHARDS - 1} of {NUM_SHARDS} shards ok, 1 NOT CHECKED" in out, out[-3000:]
    assert "FAIL" not in out and "unreadable" not in out, out[-3000:]
