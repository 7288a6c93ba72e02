"""A fault of the storage is never a loss: `imnet build` on `s3://` roots through the
fault-injecting proxy (tests/latency_proxy.py) in front of moto, while it cuts bodies short with a
rewritten Content-Length, cuts them still promising the rest, resets connections mid-body and
answers everything with 503 SlowDown for seconds, during the index and during the shard runs. The
catalog's images and the shards equal a clean local build's, with no extra exclusion. So does a
build from and to buckets in another region than the one configured (none), each region asked once.

Then TLS: the same build against moto serving HTTPS with a certificate of a private CA given in
AWS_CA_BUNDLE; without it, the certificate is refused at once, naming the endpoint.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

import pytest

from tests.checks import catalog
from tests.conftest import build_env, dagster_home, imnet
from tests.latency_proxy import LatencyProxy, SilentEndpoint, ranged_get
from tests.s3server import MotoS3, private_ca

RAW_BUCKET, OUT_BUCKET = "raw-bucket", "out-bucket"
RAW_ROOT, OUT_ROOT = f"s3://{RAW_BUCKET}/winter21", f"s3://{OUT_BUCKET}/wds"
NUM_SHARDS = 4


def _env(tmp: Path, s3: MotoS3, endpoint: str, **extra: str) -> dict[str, str]:
    env = build_env(tmp, RAW_ROOT, IMNET_OUT_ROOT=OUT_ROOT, IMNET_NUM_SHARDS=str(NUM_SHARDS),
                    DAGSTER_HOME=str(dagster_home(tmp)), **extra)
    for k in [k for k in env if k.startswith("AWS_")]:
        del env[k]
    env.update(s3.env())
    env["AWS_ENDPOINT_URL"] = endpoint
    return env


def _images(path: Path) -> list[tuple]:
    with catalog(path) as con:
        return con.execute("SELECT * FROM images ORDER BY key").fetchall()


def _excluded(rows: list[tuple]) -> int:
    return sum(1 for r in rows if r[11] == "excluded")


def _local_shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def _s3_shards(client) -> dict[str, str]:
    out = {}
    for obj in client.list_objects_v2(Bucket=OUT_BUCKET, Prefix="wds/").get("Contents", []):
        name = obj["Key"].rpartition("/")[2]
        if obj["Key"].count("/") == 1 and name.endswith(".tar"):
            out[name] = hashlib.sha256(client.get_object(Bucket=OUT_BUCKET, Key=obj["Key"])["Body"].read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def clean(sample_release, tmp_path_factory):
    """A clean build of the sample release from a local folder: what every other build must equal."""
    tmp = tmp_path_factory.mktemp("clean")
    env = build_env(tmp, sample_release[0], IMNET_NUM_SHARDS=str(NUM_SHARDS), DAGSTER_HOME=str(dagster_home(tmp)))
    imnet(["build"], env)
    images = _images(tmp / "catalog.duckdb")
    shards = _local_shards(tmp / "out")
    assert len(shards) == NUM_SHARDS and images
    return images, shards


def _upload(s3: MotoS3, raw: Path):
    client = s3.client()
    MotoS3.fresh_buckets(client, RAW_BUCKET, OUT_BUCKET)  # moto's state outlives a server
    # moto's buckets live in the pytest process, not in one server: what an earlier test (or this
    # module's) left in the out bucket would be found fresh and never read through the faults
    for obj in MotoS3.all_objects(client, OUT_BUCKET):
        client.delete_object(Bucket=OUT_BUCKET, Key=obj)
    s3.put_tree(client, raw, RAW_BUCKET, "winter21")
    return client


def test_cut_reset_and_throttled_reads_during_index_and_shards_lose_nothing(clean, sample_release, tmp_path):
    with MotoS3(secret=f"faultSecret-{uuid.uuid4().hex}") as s3, LatencyProxy(s3.endpoint, latency_ms=0) as proxy:
        client = _upload(s3, sample_release[0])
        # Every third ranged GET cut short with a well-formed, rewritten Content-Length; every fifth
        # cut still promising the rest; every seventh reset mid-body. Once the shard runs have read
        # 20 sources, every request (listings and writes too) is answered 503 SlowDown for 4 s.
        tars = {p.name: p.stat().st_size for p in sample_release[0].glob("*.tar")}

        def member_read(method, target, headers):  # a shard run's read of one source, not a whole tar
            if not ranged_get(method, target, headers):
                return False
            name, start = target.rpartition("/")[2], int(headers.get("range", "bytes=0-").split("=")[1].split("-")[0])
            return name in tars and start > 0

        # the SlowDown first: the proxy asks its faults in turn, and a fault that answers a request
        # hides it from those after it, so the burst's count sees every source read
        proxy.slowdown(4.0, after=20, when=member_read)
        proxy.cut(every=3, rewrite_length=True)
        proxy.cut(every=5, rewrite_length=False)
        proxy.reset(every=7)
        env = _env(tmp_path, s3, proxy.endpoint, IMNET_STORAGE_RETRY_SECONDS="120")
        started = time.monotonic()
        result = imnet(["build"], env)
        took = time.monotonic() - started
        shards = _s3_shards(client)
        log = list(proxy.fault_log)
    index_faults = [f for f in log if f[3] and f[3].startswith("bytes=0-")]
    shard_faults = [f for f in log if f[3] and not f[3].startswith("bytes=0-")]
    kinds = {f[0] for f in log}
    assert kinds == {"cut", "reset", "slowdown"}, (kinds, result.stdout[-2000:])
    assert index_faults, "no read of the index was cut or reset"
    assert len(shard_faults) > 20, len(shard_faults)
    assert sum(1 for f in log if f[0] == "slowdown") > 3
    images = _images(tmp_path / "catalog.duckdb")
    differ = sorted(set(images) ^ set(clean[0]))
    assert _excluded(images) == _excluded(clean[0]), ("a fault of the storage became an exclusion", differ)
    assert images == clean[0], differ
    assert shards == clean[1]
    assert "shorter than indexed" not in result.stdout + result.stderr
    assert took < 600


def test_a_build_from_and_to_buckets_in_another_region_with_no_aws_region_equals_the_clean_one(
        clean, sample_release, tmp_path):
    """Raw and out buckets in eu-west-1, no AWS_REGION: every request is signed for us-east-1 at
    first and answered 301 PermanentRedirect naming eu-west-1 (the proxy as S3). Each process asks
    a bucket's region once (obstore's reads: HeadBucket; s3fs's botocore follows the 301 and keeps
    the region): the build completes, equal to the clean one, with a handful of 301s (14 of 430
    requests when written) however many reads there are."""
    with MotoS3(secret=f"regionSecret-{uuid.uuid4().hex}") as s3, LatencyProxy(s3.endpoint, latency_ms=0) as proxy:
        client = _upload(s3, sample_release[0])
        for bucket in (RAW_BUCKET, OUT_BUCKET):
            proxy.place(bucket, "eu-west-1")
        env = _env(tmp_path, s3, proxy.endpoint)
        env.pop("AWS_DEFAULT_REGION")
        env["AWS_CONFIG_FILE"] = str(tmp_path / "no-aws-config")  # botocore's default region: none
        result = imnet(["build"], env)
        shards = _s3_shards(client)
        redirected, requests = dict(proxy.redirected), proxy.counts().requests
    images = _images(tmp_path / "catalog.duckdb")
    assert images == clean[0], sorted(set(images) ^ set(clean[0]))
    assert shards == clean[1]
    assert redirected.get("HEAD", 0) >= 1 and redirected.get("GET", 0) >= 1, redirected
    # asked once per bucket per process (the build's, a few worker pools'): never per read
    assert sum(redirected.values()) <= 40 and requests > 10 * sum(redirected.values()), (redirected, requests)
    assert "AWS_REGION" not in result.stdout + result.stderr


def _failing_build(env: dict[str, str]) -> tuple[str, float]:
    """`imnet build` that must fail: its output (stdout and stderr) and the seconds it took."""
    started = time.monotonic()
    result = imnet(["build"], env, check=False)
    took = time.monotonic() - started
    assert result.returncode != 0, result.stdout[-2000:]
    return result.stdout + result.stderr, took


def test_a_build_against_a_silent_endpoint_fails_within_a_minute_naming_it(tmp_path):
    """An endpoint that accepts connections and never answers (it used to hold a build for 7
    minutes): every request times out; the build fails within a minute, naming the endpoint."""
    with MotoS3() as s3, SilentEndpoint() as silent:
        out, took = _failing_build(_env(tmp_path, s3, silent.endpoint))
    assert took < 60, took
    assert silent.endpoint in out and "AWS_ENDPOINT_URL" in out, out[-3000:]
    assert silent.accepted >= 1


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ca")
    ca, ctx = private_ca(folder)
    return ca, ctx


def test_a_build_over_https_with_a_private_ca_equals_the_clean_one(clean, sample_release, tmp_path, tls):
    ca, ctx = tls
    with MotoS3(secret=f"tlsSecret-{uuid.uuid4().hex}", ssl_context=ctx, ca_bundle=ca) as s3:
        assert s3.endpoint.startswith("https://")
        client = _upload(s3, sample_release[0])
        env = _env(tmp_path, s3, s3.endpoint)
        assert env["AWS_CA_BUNDLE"] == ca
        imnet(["build"], env)
        raw_reads = [r for r in s3.since(0) if r.bucket == RAW_BUCKET and r.method == "GET" and r.range]
        shards = _s3_shards(client)
    assert raw_reads, "no ranged reads over HTTPS"
    assert _images(tmp_path / "catalog.duckdb") == clean[0]
    assert shards == clean[1]


def test_an_untrusted_certificate_is_refused_at_once_naming_the_endpoint(sample_release, tmp_path, tls):
    from imnet_assets.storage import fs
    from tests.conftest import environ

    ca, ctx = tls
    with MotoS3(ssl_context=ctx, ca_bundle=ca) as s3:
        _upload(s3, sample_release[0])
        env = _env(tmp_path, s3, s3.endpoint)
        env.pop("AWS_CA_BUNDLE")  # the system's roots only: they do not vouch for the private CA
        out, took = _failing_build(env)
        assert took < 60, took
        assert s3.endpoint in out and "AWS_CA_BUNDLE" in out, out[-3000:]
        # A ranged read (obstore) is refused at once too, naming the endpoint.
        env_now = {k: v for k, v in s3.env().items() if k != "AWS_CA_BUNDLE"}
        with environ(**env_now, AWS_CA_BUNDLE=""):
            os.environ.pop("AWS_CA_BUNDLE", None)
            started = time.monotonic()
            name = sorted(p.name for p in sample_release[0].glob("*.tar"))[0]
            with pytest.raises(fs.StorageError) as e:
                fs.read_range(f"s3://{RAW_BUCKET}/winter21/{name}", 0, 100)
            assert time.monotonic() - started < 10
            assert s3.endpoint in str(e.value) and "AWS_CA_BUNDLE" in str(e.value)
