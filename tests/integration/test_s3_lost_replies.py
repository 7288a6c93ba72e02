"""A lost reply to a write is never a loss, a refusal or a leftover: S3 carried the request out, and
the connection was reset before a byte of its answer came back (the proxy's `lose`, in front of
moto), so the client tries again a request that already took effect.

For each kind of write a build on `s3://` roots makes (the leases' conditional creates, the plan
files, the shards, their manifests and states, the freshness ledger, `_info.json`, classes.tsv,
the card, the bulk deletes of leases and states), a build whose k-th such write lost its reply
exits 0 with the audit ok, its shards, `_info.json`, classes.tsv and catalog equal to a clean
build's, no lease and no upload left behind; the next build finds every shard fresh.

At the storage level: a lease whose create's reply was lost is its taker's (generation 1, never
taken over from itself), its renewal and release too; a multipart upload whose create, part or
completion lost its reply is committed whole, also on a store that forgets a completed upload at
once and answers the retried completion NoSuchUpload (MinIO, Ceph), with no upload lease and no
unfinished upload left (the one a lost create began is aborted).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from imnet_assets.release import lease
from imnet_assets.runtime.host import pid_namespace
from imnet_assets.sample.sample_raw import write_sample_raw
from imnet_assets.storage import atomic, fs
from tests.checks import catalog
from tests.conftest import build_env, dagster_home, dead_pid, environ, imnet
from tests.latency_proxy import LatencyProxy
from tests.s3server import MotoS3

RAW_BUCKET, OUT_BUCKET = "lost-raw", "lost-out"
RAW_ROOT, OUT_ROOT = f"s3://{RAW_BUCKET}/winter21", f"s3://{OUT_BUCKET}/wds"
NUM_SHARDS = 3


def write_kind(method: str, target: str, headers: dict) -> str | None:
    """What a request to the out bucket writes ("lease create", "shard", ...), None for reads."""
    path, _, query = target.partition("?")
    if not path.startswith(f"/{OUT_BUCKET}") or method not in ("PUT", "POST", "DELETE"):
        return None
    name = path.rpartition("/")[2]
    if method == "POST" and query.startswith("delete"):
        return "bulk delete"
    if "/_locks/" in path:
        return "lease create" if "if-none-match" in headers else "lease renew"
    if "uploads" in query.split("&") or "uploadId" in query:
        return "multipart"
    if "/_plan/" in path:
        return "plan"
    if "/_manifests/" in path:
        return {"_commit_records.json": "ledger"}.get(name, "state" if name.endswith(".state.json") else "manifest")
    if name.endswith(".tar"):
        return "shard"
    return name  # _info.json, classes.tsv, README.md


def _env(tmp: Path, s3: MotoS3, endpoint: str) -> dict[str, str]:
    env = build_env(tmp, RAW_ROOT, IMNET_OUT_ROOT=OUT_ROOT, IMNET_NUM_SHARDS=str(NUM_SHARDS),
                    DAGSTER_HOME=str(dagster_home(tmp)), IMNET_STORAGE_RETRY_SECONDS="60")
    for k in [k for k in env if k.startswith("AWS_")]:
        del env[k]
    env.update(s3.env())
    env["AWS_ENDPOINT_URL"] = endpoint
    return env


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw-small")
    write_sample_raw(root, synsets=3, images=12, seed=0)
    return root


def _kept(client) -> dict:
    """What a build kept: the shards, _info.json and classes.tsv (their sha256), and what it left
    behind that it should not have: leases, upload leases, multipart uploads."""
    objects = MotoS3.all_objects(client, OUT_BUCKET)
    digest = {k.rpartition("/")[2]: hashlib.sha256(v).hexdigest() for k, v in objects.items()
              if k.count("/") == 1 and k.endswith((".tar", "_info.json", "classes.tsv"))}
    leftovers = sorted(k for k in objects if "/_locks/" in k or "/_uploads/" in k)
    leftovers += [f"upload of {u['Key']}" for u in client.list_multipart_uploads(Bucket=OUT_BUCKET).get("Uploads", [])]
    return {"kept": digest, "leftovers": leftovers}


def _images(path: Path) -> list[tuple]:
    with catalog(path) as con:
        return con.execute("SELECT * FROM images ORDER BY key").fetchall()


def _build(small_raw: Path, tmp: Path, lose: tuple = (), rerun: bool = False) -> dict:
    """A build of `small_raw` from and to moto through the proxy, losing the reply of the k-th write
    of kind for each (kind, k) in `lose`: what it kept, its output, the writes it made by kind, the
    replies lost."""
    seen: dict[str, int] = {}

    def lost(method: str, target: str, headers: dict) -> bool:
        what = write_kind(method, target, headers)
        if what is None:
            return False
        seen[what] = seen.get(what, 0) + 1
        return (what, seen[what]) in lose

    with MotoS3(secret=f"lostSecret-{uuid.uuid4().hex}") as s3, LatencyProxy(s3.endpoint, latency_ms=0) as proxy:
        client = s3.client()
        MotoS3.fresh_buckets(client, RAW_BUCKET, OUT_BUCKET)
        s3.put_tree(client, small_raw, RAW_BUCKET, "winter21")
        proxy.lose(match=lost, times=None)
        env = _env(tmp, s3, proxy.endpoint)
        result = imnet(["build"], env, check=False)
        done = {**_kept(client), "rc": result.returncode, "out": result.stdout + result.stderr,
                "writes": dict(seen), "lost": list(proxy.fault_log)}
        if rerun:
            proxy.clear_faults()
            again = imnet(["build"], env, check=False)
            done["rerun"] = (again.returncode, again.stdout + again.stderr)
    done["images"] = _images(tmp / "catalog.duckdb")
    return done


@pytest.fixture(scope="module")
def clean(small_raw, tmp_path_factory) -> dict:
    done = _build(small_raw, tmp_path_factory.mktemp("clean"))
    assert done["rc"] == 0, done["out"][-3000:]
    assert len([n for n in done["kept"] if n.endswith(".tar")]) == NUM_SHARDS
    assert done["leftovers"] == [], done["leftovers"]
    return done


# The replies each build loses, (kind, k): the k-th write of that kind. A build of this release (3
# shards) makes 4 lease creates (the build's, then the shards' in their runs' order), 4 plan
# writes (3 slices, then their index), 3 shards, 3 manifests, states and ledger writes, 7 bulk
# deletes (leases released, states removed before a shard is written again). Each kind once in
# the first and the last of its kind, in builds of one phase each (one build a kind: ~2 minutes more).
CASES = {
    "leases": [("lease create", 1), ("lease create", 3)],
    "plan": [("plan", 1), ("plan", 4)],
    "shards": [("shard", 1), ("shard", 3)],
    "shard-commits": [("manifest", 1), ("state", 2), ("ledger", 3)],
    "release-files": [("_info.json", 1), ("classes.tsv", 1), ("README.md", 1)],
    "deletes": [("bulk delete", 1), ("bulk delete", 7)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_lost_reply_to_a_write_loses_nothing_refuses_nothing_and_leaves_nothing(clean, small_raw, tmp_path, case):
    lose = CASES[case]
    for kind, k in lose:
        assert clean["writes"].get(kind, 0) >= k, ("the clean build made fewer such writes", kind, clean["writes"])
    done = _build(small_raw, tmp_path, tuple(lose), rerun=case == "leases")
    headers = {"if-none-match": "*"} if case == "leases" else {}
    assert sorted(write_kind(f[1], f[2], headers) for f in done["lost"] if f[0] == "lost") == sorted(
        kind for kind, _ in lose), done["lost"]
    out = done["out"]
    assert done["rc"] == 0, out[-3000:]
    assert "shard_audit      ok" in out, out[-3000:]
    assert "holds it" not in out and "LeaseHeld" not in out, out[-3000:]
    assert done["kept"] == clean["kept"]
    assert done["images"] == clean["images"], sorted(set(done["images"]) ^ set(clean["images"]))
    assert done["leftovers"] == [], done["leftovers"]
    if "rerun" in done:  # the lease it took is not one that blocks the next build
        rc, again = done["rerun"]
        assert rc == 0 and f"{NUM_SHARDS} of {NUM_SHARDS} selected shards fresh" in again, again[-3000:]


# ----------------------------------------------------------------------------- the storage level


@pytest.fixture
def proxied():
    with MotoS3(secret=f"lostSecret-{uuid.uuid4().hex}") as s3, LatencyProxy(s3.endpoint, latency_ms=0) as proxy:
        s3.bucket = f"lost-{uuid.uuid4().hex[:12]}"
        client = s3.client()
        client.create_bucket(Bucket=s3.bucket)
        with environ(**s3.env(), IMNET_STORAGE_RETRY_SECONDS="30"), environ(AWS_ENDPOINT_URL=proxy.endpoint):
            yield s3, client, proxy


def _conditional_put(method: str, target: str, headers: dict) -> bool:
    return method == "PUT" and "if-none-match" in headers


def _lock_keys(client, bucket: str) -> list[str]:
    """The lease objects' keys, listed only (a heartbeat may remove one between a listing and a GET)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []) if "/_locks/" in o["Key"])


def test_a_lease_whose_create_reply_was_lost_is_its_takers_own_renewed_and_released(proxied):
    s3, client, proxy = proxied
    root = f"s3://{s3.bucket}/wds"
    proxy.lose(match=_conditional_put)  # S3 creates it; the retry is refused (412) for its own object
    held = lease.acquire(root, "build", "imnet build")
    try:
        assert proxy.injected["lost"] == 1
        # its own: generation 1, not taken over from itself as from a holder gone
        assert held.generation == 1 and not held.lost
        assert _lock_keys(client, s3.bucket) == ["wds/_locks/build/00000001.json"]
        assert fs.read_json(held.url)["token"] == held.token
        with pytest.raises(lease.LeaseHeld):  # held: another taker is refused
            lease.acquire(root, "build", "another build")
        proxy.lose(match=lambda m, t, h: m == "PUT" and "/_locks/" in t)  # a renewal's reply lost
        held.renew()
        assert proxy.injected["lost"] == 2
        held.check()
        assert _lock_keys(client, s3.bucket) == ["wds/_locks/build/00000001.json"]
    finally:
        proxy.lose(match=lambda m, t, h: m == "POST" and "delete" in t)  # the release's delete's reply lost
        held.release()
    assert proxy.injected["lost"] == 3
    assert _lock_keys(client, s3.bucket) == []
    with lease.acquire(root, "build", "the next build") as following:
        assert following.generation == 1


@pytest.mark.parametrize("request_kind", ["create", "part", "complete", "complete-forgotten", "upload-lease",
                                          "upload-lease-removal"])
def test_a_multipart_upload_whose_reply_was_lost_is_committed_whole(proxied, request_kind):
    """17 MiB: two parts of 16 MiB blocks, and the upload's lease naming its writer (written once
    the upload began, removed once committed). Nothing is left: a retried create aborts the upload
    its lost first attempt began (s3fs_retry: it had been left for a day, empty); an upload of the
    key begun before the write (a killed writer's: atomic.remove_partials' to sweep) is kept."""
    s3, client, proxy = proxied
    url = f"s3://{s3.bucket}/wds/imagenet12k-train-0000.tar"
    data = os.urandom(17 << 20)
    proxy.date_uploads = True  # listed with the times S3 would give (moto's: 2010-11-10)
    earlier = client.create_multipart_upload(Bucket=s3.bucket, Key="wds/imagenet12k-train-0000.tar")["UploadId"]

    def selected(method: str, target: str, headers: dict) -> bool:
        query = target.partition("?")[2]
        return {"create": method == "POST" and query == "uploads",
                "part": method == "PUT" and "partNumber=1&" in query,
                "upload-lease": method == "PUT" and f"/{atomic.UPLOADS_DIR}/" in target,
                "upload-lease-removal": method == "POST" and query.startswith("delete"),
                }.get(request_kind, method == "POST" and "uploadId=" in query)

    proxy.forget_completed = request_kind == "complete-forgotten"
    proxy.lose(match=selected)
    atomic.write_atomic(url, data)
    assert proxy.injected["lost"] == 1
    objects = MotoS3.all_objects(client, s3.bucket)
    assert objects.get("wds/imagenet12k-train-0000.tar") == data
    assert sorted(objects) == ["wds/imagenet12k-train-0000.tar"]  # no upload lease left
    uploads = client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
    assert [u["UploadId"] for u in uploads] == [earlier], uploads


def test_a_retried_create_keeps_another_writers_upload_of_the_key_begun_meanwhile(proxied):
    """Another writer of the same key (another host's build that took the shard's lease over from
    this one, whose storage was out of reach past the lease's expiry) begins its upload while this
    process's create lost its reply: it is in the window of the lost create's upload, by the
    store's clock, but its lease names its writer (a lost create's upload never has one, its id
    unknown to its writer). It is kept and completes; only the lost create's own upload is aborted."""
    s3, client, proxy = proxied
    key = "wds/imagenet12k-train-0001.tar"
    url, data, theirs = f"s3://{s3.bucket}/{key}", os.urandom(17 << 20), os.urandom(5 << 20)
    proxy.date_uploads = True
    begun: dict[str, str] = {}

    def lost_create_and_another_writer_begins(method: str, target: str, headers: dict) -> bool:
        if not (method == "POST" and target.partition("?")[2] == "uploads") or begun:
            return False
        upload = client.create_multipart_upload(Bucket=s3.bucket, Key=key)["UploadId"]  # straight to the store
        t = time.time()
        proxy.initiated[upload] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
        writer = {"host": "another-host", "pid_namespace": "pid:[1]", "pid": 4242, "written": t, "key": url}
        lease_key = atomic._lease_url(url, upload).removeprefix(f"s3://{s3.bucket}/")
        client.put_object(Bucket=s3.bucket, Key=lease_key, Body=json.dumps(writer).encode())
        begun.update(upload=upload, lease=lease_key)
        return True

    proxy.lose(match=lost_create_and_another_writer_begins)
    atomic.write_atomic(url, data)
    assert proxy.injected["lost"] == 1 and begun
    uploads = client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
    assert [u["UploadId"] for u in uploads] == [begun["upload"]], uploads  # the lost create's own: aborted
    part = client.upload_part(Bucket=s3.bucket, Key=key, UploadId=begun["upload"], PartNumber=1, Body=theirs)
    client.complete_multipart_upload(Bucket=s3.bucket, Key=key, UploadId=begun["upload"],
                                     MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
    assert MotoS3.all_objects(client, s3.bucket)[key] == theirs


def test_a_lost_creates_upload_the_storage_will_not_list_is_a_warning_and_the_write_goes_on(proxied, capfd):
    """The create's reply is lost and the look for the upload it began is refused (403: a policy
    without s3:ListBucketMultipartUploads): the file is written whole all the same, with a line
    saying what was left and what clears it."""
    s3, client, proxy = proxied
    url = f"s3://{s3.bucket}/wds/imagenet12k-train-0003.tar"
    data = os.urandom(17 << 20)
    proxy.date_uploads = True
    proxy.lose(match=lambda method, target, headers: method == "POST" and target.endswith("?uploads"))
    proxy.answer(403, "AccessDenied", times=None,
                 match=lambda method, target, headers: method == "GET" and "?uploads" in target)
    atomic.write_atomic(url, data)
    assert proxy.injected["lost"] == 1 and proxy.injected["status"] >= 1
    assert MotoS3.all_objects(client, s3.bucket) == {"wds/imagenet12k-train-0003.tar": data}
    err = capfd.readouterr().err
    assert f"warning: cannot abort the upload that a lost reply to beginning {url}'s upload left" in err, err
    assert "AccessDenied" in err and "lifecycle rule" in err and s3.secret not in err, err
    assert len(client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])) == 1


def test_a_completion_refused_for_another_object_at_the_key_still_fails_naming_it(proxied):
    """The completion's retry answered NoSuchUpload while the key holds another object (a writer
    that came after it, before the look at the key): not taken for this upload's; the write fails
    naming the object, and leaves no upload lease."""
    s3, client, proxy = proxied
    url = f"s3://{s3.bucket}/wds/imagenet12k-train-0001.tar"
    key = "wds/imagenet12k-train-0001.tar"
    completed = []

    def lost_then_overwritten(method: str, target: str, headers: dict) -> bool:
        if method == "POST" and "uploadId=" in target and not completed:
            completed.append(target)
            return True  # carried out, its reply lost; the retry is answered NoSuchUpload
        if method == "HEAD" and completed:  # the look at the key: another writer's object first
            client.put_object(Bucket=s3.bucket, Key=key, Body=b"another writer's object")
        return False

    proxy.forget_completed = True
    proxy.lose(match=lost_then_overwritten, times=None)
    with pytest.raises(fs.StorageError) as e:
        atomic.write_atomic(url, os.urandom(17 << 20))
    assert completed and proxy.injected["lost"] == 1
    assert url in str(e.value) and "upload does not exist" in str(e.value), str(e.value)
    assert sorted(MotoS3.all_objects(client, s3.bucket)) == [key]  # no upload lease left


def test_an_abort_of_a_killed_writers_upload_whose_reply_was_lost_takes_its_lease_too(proxied):
    """remove_partials aborts the upload of a writer that is gone; the abort's reply is lost and its
    retry answered NoSuchUpload: the upload is gone all the same, and its upload lease with it."""
    s3, client, proxy = proxied
    url = f"s3://{s3.bucket}/wds/imagenet12k-train-0002.tar"
    fsys, path = fs.filesystem(url)
    f = fsys.open(path, "wb", block_size=5 << 20)  # a writer killed mid-upload: parts sent, never completed
    f.write(os.urandom(12 << 20))
    f.closed = True
    upload = f.mpu["UploadId"]
    gone = {"host": socket.gethostname(), "pid_namespace": pid_namespace(), "pid": dead_pid(), "written": time.time(),
            "key": url}
    atomic.write_atomic(atomic._lease_url(url, upload), json.dumps(gone).encode())
    proxy.lose(match=lambda method, target, headers: method == "DELETE" and "uploadId=" in target)
    removed = atomic.remove_partials(url)
    assert proxy.injected["lost"] == 1
    assert removed == [f"{url} (upload {upload[:8]})"]
    assert client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
    assert MotoS3.all_objects(client, s3.bucket) == {}  # the upload's lease went with it


LEASE_READ = "from imnet_assets.release import lease; lease.acquire({root!r}, 'build', 'another build').release()"


def test_a_lease_whose_read_back_failed_is_removed_once_the_storage_answers(proxied):
    """The take's read back fails (throttled past the retry budget); the storage answers again a
    moment later. The object the take created names this process, alive: left there, every other
    process was refused (LeaseHeld naming it) for as long as this one lived (a code server, a build
    going on with other shards). It is this take's (its token), so it is removed, as a release
    removes it: by the lease heartbeat, once the storage answers (the error is not held up)."""
    import subprocess
    import sys

    s3, client, proxy = proxied
    root = f"s3://{s3.bucket}/wds"
    proxy.slowdown(3, after=1, match=lambda method, target, headers: method == "GET" and "/_locks/" in target
                   and "list-type" not in target)  # from the read back on, for 3 s
    with environ(IMNET_STORAGE_RETRY_SECONDS="2"):
        with pytest.raises(fs.StorageError):
            lease.acquire(root, "build", "imnet build")
        assert proxy.injected["slowdown"] >= 1
        deadline = time.monotonic() + 30
        while _lock_keys(client, s3.bucket) and time.monotonic() < deadline:  # (the heartbeat removes it)
            time.sleep(0.1)
    assert _lock_keys(client, s3.bucket) == []
    taken = subprocess.run([sys.executable, "-c", LEASE_READ.format(root=root)], capture_output=True, text=True,
                           timeout=120)
    assert taken.returncode == 0, taken.stderr  # another process takes it: not refused naming this one


def test_a_lease_whose_read_back_failed_does_not_make_its_taker_refuse_itself(proxied):
    """The taker reads its new lease back (whose it is: a refused create may be its own, whose
    reply was lost). That read failing (throttled past the retry budget) fails the take, and the
    process, told its take failed, is not left counting the object as its own live lease: its next
    take, once the storage answers, is not refused naming itself."""
    s3, client, proxy = proxied
    root = f"s3://{s3.bucket}/wds"
    proxy.slowdown(30, match=lambda method, target, headers: method == "GET" and "/_locks/" in target
                   and "list-type" not in target)
    with environ(IMNET_STORAGE_RETRY_SECONDS="1"), pytest.raises(fs.StorageError):
        lease.acquire(root, "build", "imnet build")
    assert _lock_keys(client, s3.bucket) == ["wds/_locks/build/00000001.json"]  # created; never known to be
    proxy.clear_faults()
    with lease.acquire(root, "build", "imnet build, again") as held:
        # generation 2 beside the failed take's object, or 1 again where the heartbeat removed that
        # object first (it does, once the storage answers): either way taken, never refused naming itself
        assert held.generation in (1, 2) and held.holder["what"] == "imnet build, again", held


def test_a_failed_takes_object_the_storage_will_not_remove_is_given_up_with_a_line_renewals_going_on(
        proxied, monkeypatch, capfd):
    """The take's read back is refused (403), and so is every look at and removal of its object after:
    the heartbeat's removal of it (_settle) is tried SETTLE_ATTEMPTS times, one a round, then given up
    with a line naming it (it was tried every round for as long as the process lived), while the
    process's live lease is renewed throughout (never held up, never lost)."""
    s3, client, proxy = proxied
    root = f"s3://{s3.bucket}/wds"
    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.2)
    monkeypatch.setattr(lease, "SETTLE_ATTEMPTS", 3)
    lease._wake.set()  # a renewer already waiting picks up the shorter period
    held = lease.acquire(root, "shard-0001", "run held")
    try:
        first = fs.read_json(held.url)["renewed"]
        proxy.answer(403, "AccessDenied", times=None,
                     match=lambda method, target, headers: method in ("GET", "DELETE") and "/_locks/build/" in target)
        with environ(IMNET_STORAGE_RETRY_SECONDS="1"), pytest.raises(fs.StorageError):
            lease.acquire(root, "build", "imnet build")
        url = f"{root}/_locks/build/00000001.json"
        deadline = time.monotonic() + 60
        while any(u.url == url for u in list(lease._unsettled.values())):
            assert time.monotonic() < deadline, "the failed take's object is tried for ever"
            time.sleep(0.1)
        err = capfd.readouterr().err
        assert f"warning: gave up removing {url}, the lease object of a take that failed, after 3 tries" in err, err
        assert "AccessDenied" in err and s3.secret not in err
        tried = proxy.injected["status"]
        time.sleep(1.0)  # five rounds more: no further try
        assert proxy.injected["status"] == tried
        assert _lock_keys(client, s3.bucket) == ["wds/_locks/build/00000001.json", "wds/_locks/shard-0001/00000001.json"]
        assert fs.read_json(held.url)["renewed"] > first
        held.check()
    finally:
        proxy.clear_faults()
        held.release()
