"""Ranged GETs signed here (core/s3get.py), on moto's S3 server behind the latency proxy: the
signature botocore would make, the object's exact bytes with one request per read over
kept-alive connections shared by the process's threads, throttling retried, refusals handed to s3fs, a missing object named."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from imnet_assets.core import fs, s3get
from tests.conftest import environ
from tests.integration.test_s3 import s3  # noqa: F401 - moto on 127.0.0.1, a bucket per test
from tests.latency_proxy import LatencyProxy

HOSTILE_KEY = "winter21/a b+c=d&e~f/ü ñ #1.tar"


@pytest.mark.parametrize("token", [None, "session-token/with+odd=chars"])
@pytest.mark.parametrize("key", ["winter21/n01440764.tar", HOSTILE_KEY])
def test_the_signature_is_the_one_botocore_makes(key, token):
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    t = s3get.Target(secure=False, host="127.0.0.1:9000", connect=("127.0.0.1", 9000), prefix="/raw-bucket",
                     region="eu-west-3", credentials=creds)
    path = t.prefix + "/" + s3get.quote(key, safe="/~")
    request = AWSRequest(method="GET", url=f"http://{t.host}{path}", headers={"Range": "bytes=512-1023"})
    S3SigV4Auth(creds, "s3", t.region).add_auth(request)
    stamp = request.headers["X-Amz-Date"]
    ours = s3get.signed_headers(t, path, "bytes=512-1023", stamp, creds.access_key, creds.secret_key, token)
    assert request.headers["X-Amz-Content-SHA256"] == ours["x-amz-content-sha256"]
    assert ours["authorization"] == request.headers["Authorization"]


@pytest.fixture
def proxied(s3):  # noqa: F811
    with LatencyProxy(s3.endpoint, latency_ms=0) as proxy, environ(AWS_ENDPOINT_URL=proxy.endpoint):
        yield s3, proxy


def _put(server, key: str, data: bytes) -> str:
    server.client().put_object(Bucket=server.bucket, Key=key, Body=data)
    return f"s3://{server.bucket}/{key}"


def test_ranges_come_back_exact_one_request_each_over_one_kept_alive_connection(proxied):
    server, proxy = proxied
    data = os.urandom(300_000)
    url = _put(server, HOSTILE_KEY, data)
    before = proxy.counts()
    ranges = [(0, 1), (1000, 70_000), (299_990, 10), (299_990, 500), (123_457, 1)]
    for offset, length in ranges:
        assert fs.read_range(url, offset, length) == data[offset:offset + length]
    assert fs.read_range(url, 300_000, 10) == b""  # past the end: nothing, not an error
    used = proxy.counts().minus(before)
    assert used.requests == len(ranges) + 1 and used.by_method == {"GET": len(ranges) + 1}
    assert used.connections <= 1  # this thread's connection, kept alive from read to read
    assert s3get.target(server.bucket) is not None  # read here, not handed to s3fs


def test_threads_that_come_and_go_reuse_the_processs_connections(proxied):
    """The index reads each large tar with a thread pool of its own: 5 pools of 8 threads one
    after another, 8 reads each, go over at most 8 connections (not one per thread: 40)."""
    from concurrent.futures import ThreadPoolExecutor

    server, proxy = proxied
    data = os.urandom(100_000)
    url = _put(server, "winter21/pools.tar", data)
    before = proxy.counts()
    for _ in range(5):
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda i: fs.read_range(url, i * 1000, 1000), range(8)))
        assert got == [data[i * 1000:(i + 1) * 1000] for i in range(8)]
    used = proxy.counts().minus(before)
    assert used.requests == 40 and used.connections <= 8, used


def test_a_missing_object_is_file_not_found(proxied):
    server, _proxy = proxied
    with pytest.raises(FileNotFoundError):
        fs.read_range(f"s3://{server.bucket}/winter21/n00000000.tar", 0, 10)


def test_throttling_is_retried_until_it_passes(proxied):
    server, proxy = proxied
    url = _put(server, "winter21/t.tar", b"0123456789" * 10)
    fs.read_range(url, 0, 1)
    before = proxy.counts()
    proxy.fail(503, times=2)
    assert fs.read_range(url, 5, 20) == (b"0123456789" * 10)[5:25]
    assert proxy.counts().minus(before).requests == 3


def test_storage_that_keeps_failing_is_a_storage_error_naming_the_url_after_the_retries(proxied):
    server, proxy = proxied
    url = _put(server, "winter21/f.tar", b"x" * 100)
    fs.read_range(url, 0, 1)
    before = proxy.counts()
    proxy.fail(500, times=s3get.ATTEMPTS)
    with pytest.raises(fs.StorageError, match=r"f\.tar.*HTTP 500"):
        fs.read_range(url, 0, 10)
    assert proxy.counts().minus(before).requests == s3get.ATTEMPTS


def test_a_refusal_hands_the_bucket_to_s3fs_which_reads_it(proxied):
    server, proxy = proxied
    url = _put(server, "winter21/r.tar", b"abcdefghij" * 10)
    proxy.fail(403)
    assert fs.read_range(url, 3, 4) == b"defg"  # refused here, then read by s3fs
    assert s3get.target(server.bucket) is None
    assert fs.read_range(url, 10, 2) == b"ab"


def test_a_bucket_in_another_region_is_read_there_after_its_first_answer(proxied):
    server, proxy = proxied
    url = _put(server, "winter21/m.tar", b"0123456789")
    assert s3get.target(server.bucket).region == "us-east-1"
    proxy.fail(301, headers={"x-amz-bucket-region": "ap-southeast-2"})
    assert fs.read_range(url, 2, 3) == b"234"
    assert s3get.target(server.bucket).region == "ap-southeast-2"  # still read here, not by s3fs
    assert fs.read_range(url, 0, 1) == b"0"


class _OneAnswerServer:
    """Answers one request per connection with 206 and closes it, without saying so (no
    `Connection: close`): a kept-alive connection the server dropped meanwhile."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            self.connections += 1
            with conn:
                got = b""
                while b"\r\n\r\n" not in got:
                    got += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 4\r\n\r\nWXYZ")


def test_a_kept_alive_connection_the_server_closed_is_replaced_and_the_read_succeeds(s3):  # noqa: F811
    server = _OneAnswerServer()
    with environ(AWS_ENDPOINT_URL=f"http://127.0.0.1:{server.sock.getsockname()[1]}"):
        for _ in range(3):
            assert fs.read_range("s3://closing-bucket/k.tar", 0, 4) == b"WXYZ"
    assert server.connections == 3
