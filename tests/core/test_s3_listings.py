"""A listing is never cut short by a fault (SPEC "Failure behaviour"): fs.listdir_and_folders and
fs.find_files on moto behind the fault proxy (tests/latency_proxy.py), which asks for pages of 2
entries so that a listing of a few objects spans several pages (S3's: 1,000 each), as one of
thousands of raw tars or commit records does. The first, second or last page cut short (with its
Content-Length rewritten: XML that does not parse; or still promising the rest), reset, lost or
answered 5xx is asked again (its continuation token kept): the listing equals the fault-free one,
never a shorter one (synsets missing from the index, shards taken as absent). A store's 5xx with an
error code of its own is retried as S3's are.
"""

from __future__ import annotations

import uuid

import pytest

from imnet_assets.storage import fs, s3read
from tests.conftest import environ
from tests.latency_proxy import LatencyProxy
from tests.s3server import MotoS3

FILES = [f"n0{i}.tar" for i in range(7)]  # 7 files and 1 folder: 4 pages of 2 (the folder comes on the last)
PAGES = 4


def _listing(method: str, target: str, headers: dict) -> bool:
    return method == "GET" and "list-type=2" in target


@pytest.fixture(scope="module")
def listed():
    """moto behind the proxy, a root of 7 files and a folder, and its fault-free listings."""
    with MotoS3(secret=f"listSecret-{uuid.uuid4().hex}") as s3, LatencyProxy(s3.endpoint, latency_ms=0) as proxy:
        client = s3.client()
        bucket = f"list-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=bucket)
        for i, name in enumerate(FILES):
            client.put_object(Bucket=bucket, Key=f"root/{name}", Body=b"x" * (i + 1))
        client.put_object(Bucket=bucket, Key="root/sub/0000.json", Body=b"{}")
        proxy.page_size = 2
        env = {**{k: v for k, v in s3.env().items()}, "AWS_ENDPOINT_URL": proxy.endpoint,
               "IMNET_STORAGE_RETRY_SECONDS": "10"}
        with environ(**env):
            url = f"s3://{bucket}/root"
            before = len(proxy.log)
            clean = fs.listdir_and_folders(url), fs.find_files(url)
            pages = sum(1 for m, t, _ in proxy.log[before:] if _listing(m, t, {}))
            assert pages == 2 * PAGES, pages  # each listing spans PAGES pages: the faults below hit each
            assert [e["name"] for e in clean[0][0]] == FILES and clean[0][1] == ["sub"]
            assert len(clean[1]) == len(FILES) + 1
            yield url, proxy, clean


FAULTS = ["cut-length", "cut", "reset", "lost", "503", "500"]


@pytest.mark.parametrize("page", [1, 2, PAGES], ids=["first", "second", "last"])
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("listing", ["listdir", "find"])
def test_a_fault_on_any_page_of_a_listing_is_retried_never_a_shorter_listing(listed, listing, fault, page):
    url, proxy, clean = listed
    count = {"n": 0}

    def kth(method: str, target: str, headers: dict) -> bool:
        if _listing(method, target, headers):
            count["n"] += 1
            return count["n"] == page
        return False

    proxy.injected.clear()
    if fault == "cut-length":
        proxy.cut(match=kth, rewrite_length=True)
    elif fault == "cut":
        proxy.cut(match=kth, rewrite_length=False)
    elif fault == "reset":
        proxy.reset(match=kth)
    elif fault == "lost":
        proxy.lose(match=kth)
    else:
        proxy.answer(int(fault), "SlowDown" if fault == "503" else "InternalError", match=kth)
    try:
        got = fs.listdir_and_folders(url) if listing == "listdir" else fs.find_files(url)
    finally:
        proxy.clear_faults()
    assert sum(proxy.injected.values()) == 1, proxy.injected
    assert got == clean[0 if listing == "listdir" else 1]


@pytest.mark.parametrize(("status", "code"), [(503, "XMinioServerNotInitialized"), (500, "ServerError")])
def test_a_server_error_with_a_code_of_the_stores_own_is_retried_by_its_status(listed, status, code):
    """A 5xx is a fault of the machinery whatever the error code in its document says: MinIO
    answers 503 XMinioServerNotInitialized while it starts. The listing (s3fs: botocore's error,
    which named only the code) is asked again, as a ranged read (obstore: the status) is."""
    url, proxy, clean = listed
    count = {"n": 0}

    def second(method: str, target: str, headers: dict) -> bool:
        if _listing(method, target, headers):
            count["n"] += 1
            return count["n"] == 2
        return False

    proxy.injected.clear()
    proxy.answer(status, code, match=second)
    try:
        got = fs.listdir_and_folders(url)
    finally:
        proxy.clear_faults()
    assert proxy.injected["status"] == 1
    assert got == clean[0]


def test_a_listing_whose_faults_outlast_the_budget_fails_naming_it(listed):
    """Every page answered 503 past the retry budget: an error naming the listing, never an empty
    or shorter one."""
    url, proxy, _clean = listed
    proxy.answer(503, "SlowDown", match=_listing, times=None)
    try:
        with environ(IMNET_STORAGE_RETRY_SECONDS="1"), pytest.raises(fs.StorageError) as e:
            fs.listdir_and_folders(url)
    finally:
        proxy.clear_faults()
    assert f"cannot list {url}" in str(e.value) and s3read.RETRY_SECONDS_VARIABLE in str(e.value), e.value
