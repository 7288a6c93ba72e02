"""Small control files are read with a limit (fs.read_many / read_json_many's `limit`): an object
at a commit record's or a marker's name that is far larger than one can be (replaced by a huge
object between its listing and its read) is refused naming it (fs.TooLarge), read no further than
the limit: never fetched whole (memory), never taken for a torn record (a silent rebuild). A lease
file so large is a damaged lease (release/lease.py: an unknown holder, named)."""

from __future__ import annotations

import json
import uuid

import pytest

from imnet_assets.release import changed_sources, freshness, lease
from imnet_assets.release.outroot import RECORD_MAX_BYTES, state_url
from imnet_assets.storage import fs
from tests.conftest import environ
from tests.s3server import MotoS3

HUGE = 3 * RECORD_MAX_BYTES + 17
RECORD = json.dumps({"sha256": "0" * 64, "run_id": "r", "bytes": 10, "stamp": "x"}).encode()


@pytest.fixture(scope="module")
def s3():
    with MotoS3(secret=f"limitSecret-{uuid.uuid4().hex}") as server:
        client = server.client()
        bucket = f"limits-{uuid.uuid4().hex[:12]}"
        MotoS3.fresh_buckets(client, bucket)
        with environ(**server.env(), IMNET_STORAGE_RETRY_SECONDS="10"):
            yield server, client, bucket


def test_a_commit_record_replaced_by_a_huge_object_after_its_listing_is_refused_not_read_whole(s3, monkeypatch):
    server, client, bucket = s3
    out = f"s3://{bucket}/out"
    for key in ("0000", "0001"):
        client.put_object(Bucket=bucket, Key=state_url(out, key)[len(f"s3://{bucket}/"):], Body=RECORD)
    listdir = fs.listdir

    def listed_then_replaced(url: str) -> list[dict]:
        entries = listdir(url)
        if url.endswith("_manifests"):  # the race, caused: the record is replaced once it is listed
            client.put_object(Bucket=bucket, Key="out/_manifests/0001.state.json", Body=b" " * HUGE)
        return entries

    monkeypatch.setattr(fs, "listdir", listed_then_replaced)
    freshness.forget()
    mark = server.mark()
    with pytest.raises(fs.TooLarge, match=r"out/_manifests/0001\.state\.json .*more than a commit record"):
        freshness.look_at_shards(out, ["0000", "0001"], ["a-0000.tar", "a-0001.tar"])
    gets = [r for r in server.since(mark) if r.method == "GET" and r.key.endswith("0001.state.json")]
    assert gets and all(r.range == f"bytes=0-{RECORD_MAX_BYTES}" for r in gets), gets  # never the whole object


def test_a_huge_lease_file_or_marker_is_refused_naming_it_local_and_s3(s3, tmp_path):
    _server, client, bucket = s3
    for out in (str(tmp_path / "out"), f"s3://{bucket}/out2"):
        big = fs.join(out, lease.LOCKS_DIR, "build", "00000001.json")
        marker = fs.join(changed_sources.folder(out), "n01.tar.json")
        for url in (big, marker):
            if fs.is_remote(url):
                client.put_object(Bucket=bucket, Key=url[len(f"s3://{bucket}/"):], Body=b"{" + b" " * HUGE)
            else:
                fs.makedirs(fs.dirname(url))
                with open(url, "wb") as f:
                    f.write(b"{" + b" " * HUGE)
        held = lease.held_leases(out)  # a damaged lease: an unknown holder, naming it (read no further)
        assert list(held) == ["build"] and "build/00000001.json is damaged: larger than a lease file" in \
            lease.describe(held["build"]), held
        with pytest.raises(fs.TooLarge, match=r"n01\.tar\.json .*more than a changed-source marker"):
            changed_sources.pending(out)
    small = tmp_path / "small.json"
    small.write_bytes(RECORD)
    assert fs.read_json_many([str(small)], limit=len(RECORD)) == {str(small): json.loads(RECORD)}
