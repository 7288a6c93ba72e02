"""`s3://` raw and out roots against moto's real S3 server (HTTP on 127.0.0.1).

The sample release is uploaded to a raw bucket; `imnet build` runs as a subprocess with only the
standard AWS variables (AWS_ENDPOINT_URL, keys, region). The build runs in two steps (the
upstream stages + shard 0000, then the rest + the audit) so the second step's requests are
shard runs and the audit only. Then:
- the out bucket is downloaded and checked like the local build (tests/checks.py);
- every raw read during shard runs is a ranged GET of exactly one indexed member;
- the audit read each manifest from S3 once (a GET of the whole object, into a spool it loads from);
- the secret key is nowhere: catalog, out bucket, DAGSTER_HOME (SQLite, compute logs), output.
Plus atomic commits: an object appears only on a successful close; a failure leaves nothing.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import sys
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from botocore.exceptions import ClientError

from imnet_assets.storage import atomic, fs
from tests.checks import catalog, check_release
from tests.conftest import build_env, dagster_home, dead_pid, environ, imnet, other_pid_namespace
from tests.latency_proxy import LatencyProxy
from tests.s3server import ACCESS_KEY, MotoS3

RAW_BUCKET, OUT_BUCKET = "raw-bucket", "out-bucket"
RAW_ROOT, OUT_ROOT = f"s3://{RAW_BUCKET}/winter21", f"s3://{OUT_BUCKET}/wds"
NUM_SHARDS = 4
RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")


def s3_env(tmp: Path, s3: MotoS3, **extra: str) -> dict[str, str]:
    env = build_env(tmp, RAW_ROOT, IMNET_OUT_ROOT=OUT_ROOT, IMNET_NUM_SHARDS=str(NUM_SHARDS), **extra)
    for k in [k for k in env if k.startswith("AWS_")]:  # only the variables this test sets
        del env[k]
    env.update(s3.env())
    return env


@pytest.fixture(scope="module")
def s3_build(sample_release, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3build")
    secret = f"imnetSecret-{uuid.uuid4().hex}"  # distinctive: greppable, unlike any other text
    with MotoS3(secret=secret) as s3:
        client = s3.client()
        MotoS3.fresh_buckets(client, RAW_BUCKET, OUT_BUCKET)  # moto's state outlives a server
        s3.put_tree(client, sample_release[0], RAW_BUCKET, "winter21")
        env = s3_env(tmp, s3, DAGSTER_HOME=str(dagster_home(tmp)))
        first = imnet(["build", "--shards", "0000"], env)
        mark = s3.mark()
        second = imnet(["build"], env)
        second_requests = s3.since(mark)
        mark = s3.mark()
        third = imnet(["build"], env)
        third_requests = s3.since(mark)
        objects = MotoS3.all_objects(client, OUT_BUCKET)
        out = tmp / "out_download"
        MotoS3.download(objects, "wds/", out)
        yield SimpleNamespace(
            tmp=tmp, env=env, s3=s3, client=client, secret=secret, outputs=[first, second, third],
            second=second, third=third, second_requests=second_requests, third_requests=third_requests,
            all_requests=s3.since(0), objects=objects, out=out, summary=sample_release[1],
        )


def test_build_writes_shards_info_and_manifests_to_the_out_bucket(s3_build):
    keys = set(s3_build.objects)
    for i in range(NUM_SHARDS):
        assert f"wds/imagenet12k-train-{i:04d}.tar" in keys
        assert f"wds/_manifests/{i:04d}.json" in keys
        assert f"wds/_manifests/{i:04d}.state.json" in keys
    assert "wds/_info.json" in keys
    assert not [k for k in keys if atomic.TMP_MARK in k], "temporary objects left in the out bucket"
    assert not s3_build.client.list_multipart_uploads(Bucket=OUT_BUCKET).get("Uploads"), "uncommitted uploads"
    assert "shard_audit      ok" in s3_build.second.stdout
    assert (s3_build.tmp / "catalog.duckdb").exists()  # the catalog stays a local file


def test_shards_from_s3_read_back_like_a_local_build(s3_build):
    check_release(s3_build.out, s3_build.tmp / "catalog.duckdb", s3_build.summary.wnids, NUM_SHARDS)


def test_shard_runs_range_read_each_member_once_and_never_a_whole_tar(s3_build):
    """Step two ran shards 0001-0003: its raw reads are exactly those shards' members, by range."""
    raw_gets = [r for r in s3_build.second_requests if r.bucket == RAW_BUCKET and r.method == "GET" and r.key]
    assert raw_gets, ("no raw reads recorded: "
                      f"{Counter((r.method, r.bucket) for r in s3_build.second_requests)}\n{s3_build.second.stdout}")
    unranged = [r.key for r in raw_gets if not r.range]
    assert not unranged, f"whole-object downloads of raw objects during shard runs: {unranged}"
    read = Counter()
    for r in raw_gets:
        m = RANGE.match(r.range)
        assert m and r.status == 206, (r.key, r.range, r.status)
        start, end = int(m.group(1)), int(m.group(2))
        read[(r.key.removeprefix("winter21/"), start, end - start + 1)] += 1
    with catalog(s3_build.tmp / "catalog.duckdb") as con:
        wanted = Counter(con.execute(
            """SELECT p.tar, p."offset", p.size FROM plan p
               WHERE p.shard IN ('0001', '0002', '0003')"""
        ).fetchall())
    assert read == wanted, (
        f"{sum(read.values())} ranged reads, {sum(wanted.values())} planned members; "
        f"unplanned {list((read - wanted).items())[:3]}, unread {list((wanted - read).items())[:3]}"
    )


def _shard_object(key: str, shard: str) -> str | None:
    """Which of a shard run's objects `key` (of the out bucket) is, or None: another's."""
    kinds = {f"wds/imagenet12k-train-{shard}.tar": "tar", f"wds/_manifests/{shard}.json": "manifest",
             f"wds/_manifests/{shard}.state.json": "record", f"wds/_plan/{shard}.csv": "plan slice",
             f"wds/_plan/{shard}.staged.json": "staged encodes"}
    return "lease" if key.startswith(f"wds/_locks/shard-{shard}/") else kinds.get(key)


def test_a_shard_run_on_s3_makes_no_request_it_does_not_need(s3_build):
    """The requests each shard run of step two made for its own objects (the audit's read of its
    manifest, one GET, apart), counted: a request added to a shard run fails this. The manifest
    and the commit record are each one PUT, whose reply gives the ETag the record keeps (no HEAD
    of either); the tar: its upload, a HEAD for its stamp before the check and one after it, and
    per chunk of the check a HEAD and one ranged GET. The lease's requests (its take: a PUT and
    the read back; its release: a GET; a renewal every 30 s of a longer run) are counted apart.
    Deletes (the old record's, the lease's) are POSTs to the bucket, named by no key here."""
    for shard in ("0001", "0002", "0003"):
        mine = [r for r in s3_build.second_requests if r.bucket == OUT_BUCKET and _shard_object(r.key, shard)]
        seen = Counter((r.method, _shard_object(r.key, shard)) for r in mine)
        lease = {m: seen.pop((m, "lease"), 0) for m in ("PUT", "GET")}
        assert lease["GET"] - lease["PUT"] == 1 and lease["PUT"] >= 1, (shard, lease)  # renewals: a GET and a PUT
        chunks = seen[("GET", "tar")]
        assert chunks >= 1, (shard, seen)
        # the build's first shard had its first jobs encoded ahead of its run, from the slice read
        # then (stages/shard_ahead.py); its run reads the slice as always
        reads = 2 if shard == "0001" else 1
        assert seen == Counter({
            ("GET", "plan slice"): reads, ("GET", "staged encodes"): reads,  # (none staged: a 404)
            ("GET", "record"): 1,  # the last record's name (outroot.note_superseded): none yet, a 404
            ("PUT", "tar"): 1, ("HEAD", "tar"): 2 + chunks, ("GET", "tar"): chunks,
            ("PUT", "manifest"): 1, ("PUT", "record"): 1,
            ("GET", "manifest"): 1,  # the audit's load
        }), (shard, [(r.method, r.key, r.range) for r in mine])


def test_audit_loads_manifests_from_s3(s3_build):
    """The audit of step two read each manifest from S3 exactly once, with one GET of the whole object
    (a range from byte 0 past its end, whose answer names the object's size: fs.read_bytes) (they
    are copied into a spool beside the catalog, all at once, and loaded from there), and loaded
    every sample row."""
    gets = Counter((r.key, (r.range or "").startswith("bytes=0-")) for r in s3_build.second_requests
                   if r.bucket == OUT_BUCKET and r.method == "GET" and re.fullmatch(r"wds/_manifests/\d{4}\.json", r.key))
    assert gets == Counter({(f"wds/_manifests/{i:04d}.json", True): 1 for i in range(NUM_SHARDS)}), gets
    assert not list((s3_build.tmp).glob(".audit-manifests-*"))
    with catalog(s3_build.tmp / "catalog.duckdb") as con:
        n = con.execute("SELECT count(*) FROM shard_samples").fetchone()[0]
        planned = con.execute("SELECT count(*) FROM plan").fetchone()[0]
    assert n == planned


def test_catalog_offsets_point_at_the_exact_bytes_in_the_raw_bucket(s3_build):
    with catalog(s3_build.tmp / "catalog.duckdb") as con:
        rows = con.execute(
            'SELECT tar, "offset", size, sha256 FROM images WHERE sha256 IS NOT NULL ORDER BY key LIMIT 25'
        ).fetchall()
    assert rows
    for tar, offset, size, sha in rows:
        body = s3_build.client.get_object(
            Bucket=RAW_BUCKET, Key=f"winter21/{tar}", Range=f"bytes={offset}-{offset + size - 1}"
        )["Body"].read()
        assert hashlib.sha256(body).hexdigest() == sha, (tar, offset)


def test_second_build_on_s3_redoes_and_rewrites_nothing(s3_build):
    out = s3_build.third.stdout
    assert "0 to build" in out
    for stage in ("raw_tars", "synset_manifest", "filtered_index", "shuffled_plan", "shard_audit"):
        assert re.search(rf"{stage}\s+fresh, skipped", out), (stage, out)
    writes = [(r.method, r.key) for r in s3_build.third_requests if r.method in ("PUT", "POST", "DELETE")]
    assert not writes, writes
    # freshness compares each shard's size and ETag with its commit record: no shard is read again
    shard_reads = [r.key for r in s3_build.third_requests
                   if r.bucket == OUT_BUCKET and r.method == "GET" and r.key.endswith(".tar")]
    assert not shard_reads, shard_reads


def test_credentials_appear_nowhere(s3_build):
    secret = s3_build.secret.encode()
    # The builds did use these credentials: every request was signed with the test's key.
    signed = {r.access_key for r in s3_build.all_requests if r.bucket in (RAW_BUCKET, OUT_BUCKET)}
    assert signed == {ACCESS_KEY}, signed
    for proc in s3_build.outputs:
        assert s3_build.secret not in proc.stdout and s3_build.secret not in proc.stderr
    for key, data in s3_build.objects.items():
        assert secret not in data, f"secret in s3://{OUT_BUCKET}/{key}"
    home = Path(s3_build.env["DAGSTER_HOME"])
    files = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.suffix in (".db", ".sqlite") for p in files), "no SQLite storage in DAGSTER_HOME"
    assert any(p.suffix in (".out", ".err", ".complete") for p in files), "no compute logs in DAGSTER_HOME"
    searched = files + [p for p in s3_build.tmp.glob("catalog.duckdb*") if p.is_file()]
    leaks = [str(p) for p in searched if secret in p.read_bytes()]
    assert not leaks, f"the secret key is stored in {leaks}"
    # The key id is less sensitive, but it is not recorded either (fs.redact treats it as secret).
    key_id = ACCESS_KEY.encode()
    leaks = [str(p) for p in searched if key_id in p.read_bytes()]
    leaks += [k for k, data in s3_build.objects.items() if key_id in data]
    leaks += [" ".join(p.args) for p in s3_build.outputs if ACCESS_KEY in p.stdout + p.stderr]
    assert not leaks, f"the access key id is stored in {leaks}"


# ----------------------------------------------------------------------------- atomic commits


@pytest.fixture
def s3(monkeypatch):
    with MotoS3(secret=f"atomicSecret-{uuid.uuid4().hex}") as server:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(k)
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        # moto keeps one S3 state per process: each test gets a bucket of its own.
        server.bucket = f"atomic-{uuid.uuid4().hex[:12]}"
        server.client().create_bucket(Bucket=server.bucket)
        yield server


def _keys(client, bucket: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def _uploads(client, bucket: str) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


@pytest.mark.parametrize("size", [1000, 40 << 20], ids=["single-put", "multipart"])
def test_failed_s3_write_leaves_no_object_at_the_final_key(s3, size, monkeypatch):
    client = s3.client()
    url = f"s3://{s3.bucket}/wds/imagenet12k-train-0000.tar"
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    try:
        with atomic.atomic_open(url) as f:
            f.write(os.urandom(size))
            raise RuntimeError("encoder crashed mid-shard")
    except RuntimeError:
        pass
    f = None  # noqa: F841 - drop the file object: garbage collection must not commit it either
    gc.collect()
    assert _keys(client, s3.bucket) == []
    assert _uploads(client, s3.bucket) == []  # a begun multipart upload was aborted
    assert not unraisable, [str(u.exc_value) for u in unraisable]
    with pytest.raises(ClientError):
        client.head_object(Bucket=s3.bucket, Key="wds/imagenet12k-train-0000.tar")


def test_s3_object_appears_only_when_the_writer_closes(s3):
    client = s3.client()
    url = f"s3://{s3.bucket}/wds/_manifests/0000.json"
    data = os.urandom(20 << 20)  # over the 16 MiB block: a multipart upload with a part sent early
    with atomic.atomic_open(url) as f:
        f.write(data)
        f.flush()
        assert _uploads(client, s3.bucket) == ["wds/_manifests/0000.json"]
        assert _keys(client, s3.bucket) == _leases(client, s3.bucket)  # only the writer's lease
        assert len(_leases(client, s3.bucket)) == 1
    assert _keys(client, s3.bucket) == ["wds/_manifests/0000.json"]  # the lease went on commit
    assert _uploads(client, s3.bucket) == []
    assert fs.read_bytes(url) == data


WRITER = """
import os, sys, time
from imnet_assets.storage import atomic, fs
cm = atomic.atomic_open(sys.argv[1])  # kept referenced: a dropped one would discard the upload
f = cm.__enter__()
f.write(os.urandom(20 << 20))  # over the 16 MiB block: the multipart upload begins, its lease is written
f.flush()
print("uploading", flush=True)
time.sleep(600)
"""


def _leases(client, bucket: str) -> list[str]:
    return [k for k in _keys(client, bucket) if f"/{atomic.UPLOADS_DIR}/" in k]


def test_remove_partials_spares_a_live_writers_upload_and_aborts_a_killed_ones(s3):
    """A live writer's upload (a real process of this host, mid-upload) is kept; once that process
    is SIGKILLed, its upload and lease are removed."""
    import signal
    import subprocess

    client = s3.client()
    url = f"s3://{s3.bucket}/wds/imagenet12k-train-0001.tar"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "uploading"
        assert _uploads(client, s3.bucket) == ["wds/imagenet12k-train-0001.tar"]
        assert len(_leases(client, s3.bucket)) == 1
        assert atomic.remove_partials(url) == []  # its writer is alive: kept
        assert _uploads(client, s3.bucket) == ["wds/imagenet12k-train-0001.tar"]
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
    removed = atomic.remove_partials(url)
    assert len(removed) == 1 and "imagenet12k-train-0001.tar" in removed[0]
    assert _uploads(client, s3.bucket) == []
    assert _keys(client, s3.bucket) == []  # the lease went with it


def _abandon_upload(url: str) -> str:
    """Begin a multipart upload of `url` and leave it as a killed writer does: parts uploaded,
    never completed. Its upload id."""
    s3fs, path = fs.filesystem(url)
    f = s3fs.open(path, "wb", block_size=5 << 20)
    f.write(os.urandom(12 << 20))
    f.closed = True
    return f.mpu["UploadId"]


def _write_lease(url: str, upload: str, lease: dict) -> None:
    atomic.write_atomic(atomic._lease_url(url, upload), json.dumps(lease).encode())


def test_remove_partials_keeps_another_hosts_upload_until_it_is_stale(s3, monkeypatch):
    """An upload whose lease names another host (whose processes cannot be asked) is kept until it
    is older than STALE_UPLOAD_SECONDS; one with no lease at all, once it is that old by the
    storage's clock (moto dates every upload 2010-11-10: stale)."""
    import time

    client = s3.client()
    url = f"s3://{s3.bucket}/wds/imagenet12k-train-0002.tar"
    upload = _abandon_upload(url)
    lease = {"host": "another-host", "pid": 1, "written": time.time(), "key": url}
    _write_lease(url, upload, lease)
    assert atomic.remove_partials(url) == []
    assert _uploads(client, s3.bucket) == ["wds/imagenet12k-train-0002.tar"]
    monkeypatch.setattr(atomic, "STALE_UPLOAD_SECONDS", 3600)
    lease["written"] = time.time() - 7200
    _write_lease(url, upload, lease)
    assert len(atomic.remove_partials(url)) == 1
    assert _uploads(client, s3.bucket) == []
    assert _keys(client, s3.bucket) == []
    # No lease: judged by the storage's Initiated date.
    _abandon_upload(url)
    assert len(atomic.remove_partials(url)) == 1
    assert _uploads(client, s3.bucket) == []


def _lists_uploads(method: str, target: str, _headers: dict) -> bool:
    return method == "GET" and re.search(r"[?&]uploads(=|&|$)", target) is not None


def _aborts_an_upload(method: str, target: str, _headers: dict) -> bool:
    return method == "DELETE" and "uploadId=" in target


@pytest.mark.parametrize("refused", [_lists_uploads, _aborts_an_upload], ids=["list", "abort"])
def test_a_sweep_the_storage_refuses_is_a_warning_naming_it_never_silent_never_a_failed_run(s3, monkeypatch,
                                                                                            refused):
    """A store whose policy refuses ListMultipartUploads or AbortMultipartUpload (403; many IAM
    policies grant neither): remove_partials warns, naming the file and the refusal, keeps the upload
    (never visible) and returns, so the run goes on; once the store allows it, the sweep removes it."""
    import socket
    import time

    from imnet_assets.runtime.host import pid_namespace

    client = s3.client()
    url = f"s3://{s3.bucket}/wds/imagenet12k-train-0004.tar"
    upload = _abandon_upload(url)
    _write_lease(url, upload, {"host": socket.gethostname(), "pid_namespace": pid_namespace(), "pid": dead_pid(),
                               "written": time.time(), "key": url})
    with LatencyProxy(s3.endpoint, latency_ms=0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        proxy.answer(403, "AccessDenied", match=refused, times=None)
        warned: list[str] = []
        assert atomic.remove_partials(url, warn=warned.append) == []
        assert len(warned) == 1 and url in warned[0] and "AccessDenied" in warned[0], warned
        assert "not swept" in warned[0] and s3.secret not in warned[0]
        assert _uploads(client, s3.bucket) == ["wds/imagenet12k-train-0004.tar"]
        proxy.clear_faults()
        removed = atomic.remove_partials(url, warn=warned.append)
    assert len(removed) == 1 and len(warned) == 1
    assert _uploads(client, s3.bucket) == [] and _keys(client, s3.bucket) == []


def test_remove_partials_keeps_an_upload_of_another_pid_namespace_of_this_host(s3):
    """A lease naming this host but another pid namespace (a writer in a container on the host's
    network) is not judged by this namespace's process numbers: kept while not stale. The same
    lease in this namespace, its writer's number gone here: aborted."""
    import socket
    import time

    from imnet_assets.runtime.host import pid_namespace

    client = s3.client()
    url = f"s3://{s3.bucket}/wds/imagenet12k-train-0003.tar"
    upload = _abandon_upload(url)
    container, namespace = other_pid_namespace()
    try:
        assert namespace != pid_namespace()
        lease = {"host": socket.gethostname(), "pid_namespace": namespace, "pid": dead_pid(),
                 "written": time.time(), "key": url}
        _write_lease(url, upload, lease)
        assert atomic.remove_partials(url) == []
        assert _uploads(client, s3.bucket) == ["wds/imagenet12k-train-0003.tar"]
        lease["pid_namespace"] = pid_namespace()
        _write_lease(url, upload, lease)
        assert len(atomic.remove_partials(url)) == 1
        assert _uploads(client, s3.bucket) == []
    finally:
        container.kill()
        container.wait()


def test_read_many_on_s3_is_one_get_per_object_all_in_flight_at_once(s3):
    """read_many: one GET per object (no size look first), all of a batch in flight together over
    kept-alive connections, None for an absent key; a storage error is raised, not None."""
    client = s3.client()
    names = [f"wds/_manifests/{i:04d}.state.json" for i in range(40)]
    for i, name in enumerate(names):
        client.put_object(Bucket=s3.bucket, Key=name, Body=b'{"n": %d}' % i)
    urls = [f"s3://{s3.bucket}/{n}" for n in names] + [f"s3://{s3.bucket}/wds/_manifests/absent.state.json"]
    # 250 ms a request: long enough that on a busy machine every request of one batch is still
    # waiting when the last one arrives
    with LatencyProxy(s3.endpoint, latency_ms=250) as proxy, environ(AWS_ENDPOINT_URL=proxy.endpoint):
        got = fs.read_json_many(urls)
        first = proxy.counts()
        assert fs.read_many(urls[:1]) == {urls[0]: b'{"n": 0}'}
        second = proxy.counts().minus(first)
    assert got == {**{u: {"n": i} for i, u in enumerate(urls[:-1])}, urls[-1]: None}
    assert first.by_method == {"GET": len(urls)}  # no HEAD
    assert first.max_in_flight >= len(urls) - 4  # about one round trip, not 41
    assert first.connections <= len(urls)
    assert second.requests == 1 and second.connections == 0  # the pool's connections are reused
    assert fs.listdir(f"s3://{s3.bucket}/wds/nothing-here") == []  # an absent prefix lists empty
    assert [e["name"] for e in fs.listdir(f"s3://{s3.bucket}/wds/_manifests")] == sorted(n.rpartition("/")[2] for n in names)


def test_read_many_raises_a_storage_error_rather_than_taking_it_for_a_missing_object(s3, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nothing listens on: the storage does not answer
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    url = f"s3://{s3.bucket}/wds/_manifests/0000.state.json"
    with environ(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}"), pytest.raises(fs.StorageError, match=f"cannot read {url}: .*{port}"):
        fs.read_many([url])


def test_status_schedule_and_sensor_look_at_every_shard_in_a_few_round_trips(s3_build, monkeypatch):
    """shard_partition_status (`imnet status`, the schedule) and the audit sensor's look: the plan
    index, one listing of the out root and of _manifests/, and the commit records: read at once
    when nothing remembers them, else taken from the ledger (one GET) that the first look wrote.
    A fixed number of round trips whatever the number of shards. A process that looked before
    reads only the listings again while no shard changed; a rewritten record is read again."""
    from imnet_assets.defs import schedules
    from imnet_assets.release import freshness
    from imnet_assets.stages.audit_due import shards_as_they_are
    from tests.conftest import settings_of

    settings = settings_of(s3_build.env)
    for k, v in s3_build.env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    ledger = f"wds/_manifests/{freshness.LEDGER_NAME}"
    assert ledger in s3_build.objects  # written by the builds
    s3_build.client.delete_object(Bucket=OUT_BUCKET, Key=ledger)
    all_fresh = dict.fromkeys(settings.partition_keys, "fresh")
    records = [f"/{OUT_BUCKET}/wds/_manifests/{k}.state.json" for k in settings.partition_keys]

    def record_reads(log):
        return sorted(t.split("?")[0] for m, t, _ in log if m == "GET" and ".state.json" in t)

    freshness.forget()
    with LatencyProxy(s3_build.s3.endpoint, latency_ms=250) as proxy, environ(AWS_ENDPOINT_URL=proxy.endpoint):
        start = len(proxy.log)
        assert schedules.shard_partition_status(settings, None) == all_fresh
        cold = proxy.counts()
        cold_log = proxy.log[start:]
        freshness.forget()  # a new process: the ledger the first look wrote stands in for the records
        start = len(proxy.log)
        assert schedules.shard_partition_status(settings, None) == all_fresh
        from_ledger = proxy.counts().minus(cold)
        ledger_log = proxy.log[start:]
        proxy.reset_peak()
        assert schedules.shard_partition_status(settings, None) == all_fresh
        warm = proxy.counts().minus(cold).minus(from_ledger)
        digest, why = shards_as_they_are(settings)
        sensor = proxy.counts().minus(cold).minus(from_ledger).minus(warm)
        # One record rewritten (another run id): its ledger entry no longer matches its ETag.
        key = settings.partition_keys[1]
        body = s3_build.client.get_object(Bucket=OUT_BUCKET, Key=f"wds/_manifests/{key}.state.json")["Body"].read()
        state = dict(json.loads(body), run_id="another-run")
        s3_build.client.put_object(Bucket=OUT_BUCKET, Key=f"wds/_manifests/{key}.state.json",
                                   Body=json.dumps(state).encode())
        freshness.forget()
        start = len(proxy.log)
        assert schedules.shard_partition_status(settings, None) == all_fresh
        changed_log = proxy.log[start:]
        # A ledger torn or written by something else is no ledger: every record is read again.
        s3_build.client.put_object(Bucket=OUT_BUCKET, Key=ledger, Body=b'{"format": 1, "records": [')
        freshness.forget()
        start = len(proxy.log)
        assert schedules.shard_partition_status(settings, None) == all_fresh
        torn_log = proxy.log[start:]
    rewritten = json.loads(s3_build.client.get_object(Bucket=OUT_BUCKET, Key=ledger)["Body"].read())
    assert sorted(rewritten["records"]) == sorted(f"{k}.state.json" for k in settings.partition_keys)
    assert record_reads(torn_log) == records, torn_log
    assert digest and why == "every shard is in"
    assert record_reads(cold_log) == records
    assert "HEAD" not in cold.by_method, cold_log
    assert cold.by_method.get("PUT") == 1, cold_log  # the ledger
    assert cold.requests == NUM_SHARDS + 4, cold_log  # the index, two listings, one read per record, the ledger
    assert cold.max_in_flight == NUM_SHARDS  # the records in one round trip
    assert record_reads(ledger_log) == [], ledger_log
    assert from_ledger.requests == 4, ledger_log  # the index, two listings, the ledger
    assert warm.requests == 3 and warm.connections == 0  # index and listings, on the kept connections
    assert sensor.requests == 3 and sensor.connections == 0
    assert record_reads(changed_log) == [f"/{OUT_BUCKET}/wds/_manifests/{key}.state.json"], changed_log


def test_status_lists_a_raw_root_on_s3_only_when_asked(s3_build):
    """`imnet status` answers from the out bucket and the catalog; listing a raw root on object
    storage (20 pages at the real 19,167 tars) is what `--raw` asks for, and then it compares."""
    mark = s3_build.s3.mark()
    plain = imnet(["status"], s3_build.env)
    plain_raw = [r for r in s3_build.s3.since(mark) if r.bucket == RAW_BUCKET]
    mark = s3_build.s3.mark()
    listed = imnet(["status", "--raw"], s3_build.env)
    listed_raw = [r for r in s3_build.s3.since(mark) if r.bucket == RAW_BUCKET]
    assert plain_raw == [], plain_raw
    assert re.search(r"raw_tars\s+built", plain.stdout) and "imnet status --raw" in plain.stdout, plain.stdout
    assert listed_raw and all(r.method == "GET" and not r.key for r in listed_raw), listed_raw  # listings only
    assert re.search(r"raw_tars\s+fresh", listed.stdout) and re.search(r"shuffled_plan\s+fresh", listed.stdout)
    for out in (plain.stdout, listed.stdout):
        assert re.search(rf"wds_shards\s+{NUM_SHARDS} fresh", out), out
