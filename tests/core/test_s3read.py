"""Ranged reads of S3 objects (storage/s3read.py, through obstore) and the retry policy of every
storage request, on moto's S3 server behind the fault-injecting proxy: the exact bytes, one
request per read; cut bodies (with a rewritten Content-Length, or still promising the rest),
resets mid-body and SlowDown bursts retried until the read is exact; a budget that runs out, a
silent endpoint, a refusal and a missing object each an error naming the object, never a short read."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from imnet_assets.storage import atomic, fs, s3read
from tests.conftest import environ
from tests.integration.test_s3 import s3  # noqa: F401 - moto on 127.0.0.1, a bucket per test
from tests.latency_proxy import LatencyProxy, SilentEndpoint, any_request, object_get

HOSTILE_KEY = "winter21/a b+c=d&e~f/ü ñ #1.tar"


@pytest.fixture
def proxied(s3):  # noqa: F811
    with LatencyProxy(s3.endpoint, latency_ms=0) as proxy, environ(AWS_ENDPOINT_URL=proxy.endpoint):
        yield s3, proxy


def _put(server, key: str, data: bytes) -> str:
    server.client().put_object(Bucket=server.bucket, Key=key, Body=data)
    return f"s3://{server.bucket}/{key}"


def test_ranges_come_back_exact_one_request_each_over_kept_alive_connections(proxied):
    server, proxy = proxied
    data = os.urandom(300_000)
    url = _put(server, HOSTILE_KEY, data)
    fs.read_range(url, 0, 1)  # the store and its first connection
    before = proxy.counts()
    ranges = [(0, 1), (1000, 70_000), (299_990, 10), (123_457, 1)]
    for offset, length in ranges:
        assert fs.read_range(url, offset, length) == data[offset:offset + length]
    assert fs.read_range(url, 299_990, 500) == data[299_990:]  # the object ends: its last 10 bytes
    assert fs.read_range(url, 300_000, 10) == b""  # past the end: nothing, not an error
    used = proxy.counts().minus(before)
    assert used.by_method == {"GET": len(ranges) + 2}
    assert used.connections <= 1  # kept alive from read to read (a 416 may close one)


@pytest.mark.parametrize("fault", ["cut-rewritten-length", "cut-promising-more", "reset"])
def test_a_body_cut_short_or_reset_is_read_again_never_returned_short(proxied, fault):
    server, proxy = proxied
    data = os.urandom(200_000)
    url = _put(server, "winter21/n01440764.tar", data)
    if fault == "reset":
        proxy.reset(times=3)
    else:
        proxy.cut(times=3, rewrite_length=fault == "cut-rewritten-length")
    before = proxy.counts()
    assert fs.read_range(url, 1000, 150_000) == data[1000:151_000]
    assert sum(proxy.injected.values()) == 3
    assert proxy.counts().minus(before).requests == 4


def test_a_slowdown_burst_is_waited_out(proxied):
    server, proxy = proxied
    data = os.urandom(50_000)
    url = _put(server, "winter21/t.tar", data)
    fs.read_range(url, 0, 1)
    proxy.slowdown(2.0)
    started = time.monotonic()
    assert fs.read_range(url, 5, 20_000) == data[5:20_005]
    assert time.monotonic() - started >= 1.9
    assert proxy.injected["slowdown"] >= 2


def test_faults_that_outlast_the_budget_are_a_storage_error_naming_the_object(proxied):
    server, proxy = proxied
    url = _put(server, "winter21/f.tar", b"x" * 10_000)
    proxy.cut(every=1, rewrite_length=True)  # every answer, for as long as it takes
    started = time.monotonic()
    with environ(IMNET_STORAGE_RETRY_SECONDS="2"), pytest.raises(fs.StorageError) as e:
        fs.read_range(url, 0, 5000)
    assert time.monotonic() - started < 10
    assert "s3://" + server.bucket + "/winter21/f.tar" in str(e.value) and proxy.endpoint in str(e.value)
    assert "IMNET_STORAGE_RETRY_SECONDS" in str(e.value)
    assert server.secret not in str(e.value)


def test_listings_and_writes_through_s3fs_wait_out_a_slowdown_burst_too(proxied):
    server, proxy = proxied
    url = f"s3://{server.bucket}/wds/_manifests/0000.json"
    proxy.slowdown(1.5, match=any_request)
    atomic.write_atomic(url, b'{"n": 1}')
    assert fs.read_json(url) == {"n": 1}
    assert [e["name"] for e in fs.listdir(f"s3://{server.bucket}/wds/_manifests")] == ["0000.json"]
    assert proxy.injected["slowdown"] >= 1


def test_whole_object_reads_through_s3fs_are_retried_after_a_cut_body(proxied):
    server, proxy = proxied
    data = os.urandom(100_000)
    url = _put(server, "wds/_manifests/0001.json", data)
    proxy.cut(times=2, rewrite_length=False, match=object_get)
    assert fs.read_bytes(url) == data
    assert proxy.injected["cut"] == 2


def test_a_missing_object_is_file_not_found(proxied):
    server, _proxy = proxied
    with pytest.raises(FileNotFoundError):
        fs.read_range(f"s3://{server.bucket}/winter21/n00000000.tar", 0, 10)


def test_a_refusal_is_tried_again_then_named(proxied):
    server, proxy = proxied
    url = _put(server, "winter21/r.tar", b"abcdefghij" * 10)
    proxy.fail(403)
    assert fs.read_range(url, 3, 4) == b"defg"  # one refusal: tried again (a credential rotating)
    proxy.fail(403, times=s3read.REFUSALS)
    with pytest.raises(fs.StorageError, match="refused the credentials"):
        fs.read_range(url, 3, 4)


def test_a_bucket_in_another_region_is_read_once_its_region_is_asked_once(proxied, monkeypatch):
    """No AWS_REGION: reads are signed for us-east-1 and S3 answers 301 PermanentRedirect naming
    the bucket's region; the first one makes the process ask the region (one HeadBucket) and sign
    for it from then on: reads from many threads at once come back exact, the region asked once."""
    server, proxy = proxied
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    data = os.urandom(200_000)
    url = _put(server, "winter21/n01440764.tar", data)
    proxy.place(server.bucket, "eu-west-1")
    ranges = [(i * 9_000, 7_000 + i) for i in range(20)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda r: fs.read_range(url, *r), ranges))
    assert got == [data[o:o + n] for o, n in ranges]
    assert proxy.redirected["HEAD"] == 1, proxy.redirected  # HeadBucket, once (botocore then signs for eu-west-1)
    assert 1 <= proxy.redirected["GET"] <= 8, proxy.redirected  # at most the reads in flight before it was known
    before = dict(proxy.redirected)
    assert [fs.read_range(url, o, n) for o, n in ranges] == [data[o:o + n] for o, n in ranges]
    assert dict(proxy.redirected) == before  # no 301 more: every read signed for the bucket's region


def test_a_region_no_answer_names_fails_at_once_saying_to_set_aws_region(proxied):
    """An endpoint whose 301s name no region (one with no regions, or a HeadBucket that cannot
    tell): the read fails at once, without spending the retry budget, telling what to set; the
    region is not asked again by the next read."""
    server, proxy = proxied
    url = _put(server, "winter21/eu.tar", b"abcdefghij" * 10)
    proxy.place(server.bucket, "eu-west-1", tell_region=False)
    started = time.monotonic()
    with environ(AWS_REGION="us-east-1"):
        with pytest.raises(fs.StorageError, match="another region than us-east-1") as got:
            fs.read_range(url, 3, 4)
        assert "set AWS_REGION" in str(got.value) and "1 attempt " in str(got.value), got.value
        asked = proxy.redirected["HEAD"]
        assert asked >= 1
        with pytest.raises(fs.StorageError, match="set AWS_REGION"):
            fs.read_range(url, 3, 4)
        assert proxy.redirected["HEAD"] == asked and proxy.redirected["GET"] == 2
        assert time.monotonic() - started < 5
        with environ(AWS_REGION="eu-west-1"):  # set as the error says: read
            assert fs.read_range(url, 3, 4) == b"defg"


def test_the_region_is_read_from_a_refused_head_bucket_too(proxied):
    """S3 names the bucket's region in HeadBucket's answer even when it refuses it (403): a reader
    allowed GetObject only still finds the region; a throttled HeadBucket is asked again."""
    server, proxy = proxied
    proxy.fail(403, headers={"x-amz-bucket-region": "ap-south-1"})
    assert s3read.bucket_region(server.bucket) == "ap-south-1"
    proxy.fail(403)  # a refusal that names none
    assert s3read.bucket_region(server.bucket) is None
    proxy.fail(503)  # throttled: asked again, under the one retry policy
    proxy.fail(403, headers={"x-amz-bucket-region": "eu-central-1"})
    assert s3read.bucket_region(server.bucket) == "eu-central-1"


def test_a_silent_endpoint_fails_within_a_minute_naming_it(s3):  # noqa: F811
    with SilentEndpoint() as silent, environ(AWS_ENDPOINT_URL=silent.endpoint):
        started = time.monotonic()
        with pytest.raises(fs.StorageError) as e:
            fs.read_range(f"s3://{s3.bucket}/winter21/n01440764.tar", 0, 10)
        took = time.monotonic() - started
        assert took < 60, took
        assert silent.endpoint in str(e.value) and "did not" in str(e.value)
        started = time.monotonic()
        with pytest.raises(fs.StorageError) as e:  # a listing through s3fs too
            fs.listdir(f"s3://{s3.bucket}/winter21")
        assert time.monotonic() - started < 60
        assert silent.endpoint in str(e.value)


def test_a_tar_shorter_than_listed_fails_the_index_naming_it_never_recorded_as_damage(proxied, sample_release):
    """A tar that ends before the size its listing gave (changed since, or cut short in a way no
    retry mends) makes the scan raise StorageError naming it: the stage fails, no damage row."""
    from imnet_assets.stages.scan_pool import scan_tars
    from imnet_assets.storage.prefetch import PrefetchedFile

    server, _proxy = proxied
    tar = sorted(sample_release[0].glob("*.tar"))[0]
    data = tar.read_bytes()
    url = _put(server, f"winter21/{tar.name}", data)
    listed = len(data) + 10_240
    for sizes in ({url: listed}, {}):  # the index scan with the listed size, then prefetch alone
        small = bool(sizes)
        with environ(IMNET_STORAGE_RETRY_SECONDS="2"), pytest.raises(fs.StorageError, match=tar.name):
            if small:
                list(scan_tars([url], workers=1, sizes=sizes))
            else:
                with PrefetchedFile(url, listed, chunk=1 << 20, depth=4) as f:
                    while f.read(1 << 20):
                        pass


def test_the_retry_budget_is_a_setting_checked_at_start():
    from imnet_assets.settings import Settings, SettingsError

    assert Settings.from_env({}).storage_retry_seconds == s3read.DEFAULT_RETRY_SECONDS
    assert Settings.from_env({"IMNET_STORAGE_RETRY_SECONDS": "60"}).storage_retry_seconds == 60
    with environ(IMNET_STORAGE_RETRY_SECONDS="60"):
        assert s3read.retry_seconds() == 60
    for bad in ("0", "soon"):
        with pytest.raises(SettingsError, match="IMNET_STORAGE_RETRY_SECONDS"):
            Settings.from_env({"IMNET_STORAGE_RETRY_SECONDS": bad})


def test_an_info_json_storage_cannot_give_is_a_storage_error_never_a_failed_check(proxied, tmp_path):
    """`imnet verify` and the audit's check read `_info.json` through stages.audit.check_info: a
    storage that keeps failing (503s past IMNET_STORAGE_RETRY_SECONDS) is a StorageError naming the
    object (verify: `imnet: ...`; the audit's run fails), never "_info.json unreadable" reported as
    a release that failed its check; a missing one and one that is not JSON are the check's."""
    from imnet_assets.settings import Settings
    from imnet_assets.stages.audit import check_info

    server, proxy = proxied
    s = Settings.from_env({"IMNET_RAW_ROOT": str(tmp_path / "raw"), "IMNET_OUT_ROOT": f"s3://{server.bucket}/out",
                           "IMNET_CATALOG": str(tmp_path / "catalog.duckdb"), "IMNET_NUM_SHARDS": "2"})
    lengths = dict.fromkeys(s.partition_keys, 1)
    assert check_info(s, lengths) == [f"s3://{server.bucket}/out/_info.json is missing"]
    _put(server, "out/_info.json", b"{not json")
    assert "unreadable" in check_info(s, lengths)[0]
    proxy.slowdown(3600)  # every request, for as long as it takes
    with environ(IMNET_STORAGE_RETRY_SECONDS="2"), pytest.raises(OSError) as e:
        check_info(s, lengths)
    assert "_info.json" in str(e.value) and not isinstance(e.value, FileNotFoundError), e.value
