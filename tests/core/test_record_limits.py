"""Small control files are read with a limit (fs.read_many / read_json_many's `limit`): an object
at a commit record's or a marker's name that is far larger than one can be (replaced by a huge
object between its listing and its read) is refused naming it (fs.TooLarge), read no further than
the limit: never fetched whole (memory), never taken for a torn record (a silent rebuild). A lease
file so large is a damaged lease (release/lease.py: an unknown holder, named)."""

from __future__ import annotations

import json

import pytest

from imnet_assets.release import changed_sources, freshness, lease
from imnet_assets.release.outroot import RECORD_MAX_BYTES, state_url
from imnet_assets.storage import fs

HUGE = 3 * RECORD_MAX_BYTES + 17
RECORD = json.dumps({"sha256": "0" * 64, "run_id": "r", "bytes": 10, "stamp": "x"}).encode()



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


# ----------------------------------------------------------------------------- caches: the ledger, staged lookups


def _put(client, bucket: str, url: str, body: bytes) -> None:
    if fs.is_remote(url):
        client.put_object(Bucket=bucket, Key=url[len(f"s3://{bucket}/"):], Body=body)
    else:
        fs.makedirs(fs.dirname(url))
        with open(url, "wb") as f:
            f.write(body)


def _thread_rchar() -> int:
    """Bytes this thread has read through read(2) (moto's server threads read their sockets apart)."""
    with open("/proc/thread-self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _padded(doc: dict, size: int) -> bytes:
    """`doc` as JSON that parses, padded with spaces to `size` bytes."""
    text = json.dumps(doc).encode()
    return text + b" " * (size - len(text))


def test_a_huge_ledger_is_ignored_with_a_warning_and_the_records_are_read_local_and_s3(s3, tmp_path, capsys,
                                                                                   monkeypatch):
    server, client, bucket = s3
    keys, names = ["0000", "0001"], ["a-0000.tar", "a-0001.tar"]
    limit = freshness.ledger_limit(len(keys))
    for out in (str(tmp_path / "out"), f"s3://{bucket}/out3"):
        for key in keys:
            _put(client, bucket, state_url(out, key), RECORD)
        listed = {e["name"]: (e["size"], e["stamp"]) for e in fs.listdir(fs.join(out, "_manifests"))}
        # a ledger whose entries match the records' listings, but say something else: were it
        # used, the looks would hold its documents
        lie = {"format": freshness.LEDGER_FORMAT,
               "records": {n: [*seen, {"from": "the ledger"}] for n, seen in listed.items()}}
        _put(client, bucket, freshness.ledger_url(out), _padded(lie, 3 * limit))
        freshness.forget()
        mark, before = server.mark(), _thread_rchar()
        look = freshness.look_at_shards(out, keys, names)
        assert _thread_rchar() - before < limit  # (the records and listings: kilobytes, never the ledger)
        assert [look.shards[k].state for k in keys] == [json.loads(RECORD)] * 2
        assert f"{freshness.ledger_url(out)} holds more than {limit:,} bytes" in capsys.readouterr().err
        if fs.is_remote(out):  # listed too large: never fetched; written again, and used by the next cold look
            assert not [r for r in server.since(mark) if r.method == "GET" and r.key.endswith("_commit_records.json")]
            assert fs.stat(freshness.ledger_url(out))[0] < 2048
            freshness.forget()
            mark = server.mark()
            assert [freshness.look_at_shards(out, keys, names).shards[k].state for k in keys] == [json.loads(RECORD)] * 2
            assert not [r for r in server.since(mark) if r.key.endswith(".state.json")]
    # replaced by a huge object once listed: read no further than the limit, ignored likewise
    out = f"s3://{bucket}/out3"
    listdir = fs.listdir

    def listed_then_replaced(url: str) -> list[dict]:
        entries = listdir(url)
        if url.endswith("_manifests"):
            _put(client, bucket, freshness.ledger_url(out), _padded(lie, 3 * limit))
        return entries

    monkeypatch.setattr(fs, "listdir", listed_then_replaced)
    freshness.forget()
    mark = server.mark()
    assert [freshness.look_at_shards(out, keys, names).shards[k].state for k in keys] == [json.loads(RECORD)] * 2
    gets = [r for r in server.since(mark) if r.method == "GET" and r.key.endswith("_commit_records.json")]
    assert gets and all(r.range == f"bytes=0-{limit}" for r in gets), gets
    assert "holds more than" in capsys.readouterr().err
    # a shard run's `remember` reads it with the cap for the most records an out root can hold
    monkeypatch.setattr(fs, "listdir", listdir)
    cap = freshness.ledger_limit(freshness.MAX_RECORDS)
    _put(client, bucket, freshness.ledger_url(out), _padded(lie, cap + 10))
    mark = server.mark()
    freshness.remember(out, "0000", json.loads(RECORD))
    gets = [r for r in server.since(mark) if r.method == "GET" and r.key.endswith("_commit_records.json")]
    assert gets and all(r.range == f"bytes=0-{cap}" for r in gets), gets
    assert "holds more than" in capsys.readouterr().err
    assert fs.stat(freshness.ledger_url(out))[0] < 2048  # written again with its own record


def test_a_huge_lookup_of_staged_encodes_counts_as_absent_naming_it_local_and_s3(s3, tmp_path):
    import types

    from imnet_assets.image.encode import EncodeSettings, codec_identity
    from imnet_assets.stages import staged_encodes

    server, client, bucket = s3
    rows = [types.SimpleNamespace(position=0, key="n01_1")]
    doc = {"codec": codec_identity(EncodeSettings()), "files": ["s3://b/_staged/x/n01.tar.bin"],
           "rows": [[0, "n01_1", 0, 0, 10, "0" * 64, 4, 4, 4, 4, 0, None]]}
    limit = staged_encodes.lookup_limit(len(rows))
    for out in (str(tmp_path / "out"), f"s3://{bucket}/out4"):
        url = staged_encodes.lookup_url(out, "0000")
        _put(client, bucket, url, json.dumps(doc).encode())
        assert staged_encodes.read_lookup(out, "0000", rows, EncodeSettings())[0].size == 10  # one that fits
        _put(client, bucket, url, _padded(doc, 40 * limit))
        said: list[str] = []
        mark, before = server.mark(), _thread_rchar()
        assert staged_encodes.read_lookup(out, "0000", rows, EncodeSettings(), said.append) is None
        if fs.is_remote(out):
            gets = [r for r in server.since(mark) if r.method == "GET" and r.key.endswith("0000.staged.json")]
            assert gets and all(r.range == f"bytes=0-{limit}" for r in gets), gets
        else:
            assert _thread_rchar() - before < 2 * limit  # (the file: 40 times that)
        assert len(said) == 1 and f"{url} holds more than {limit:,} bytes" in said[0], said


def test_read_many_with_a_limit_per_file_gives_none_for_one_over_its_own_local_and_s3(s3, tmp_path):
    """The audit's read of the shards' manifests (spooled on S3, read in Python where DuckDB cannot
    load one): each within its own limit (outroot.manifest_limits), one over it None (damaged)."""
    server, client, bucket = s3
    for out in (str(tmp_path / "many"), f"s3://{bucket}/many"):
        small, big = fs.join(out, "a.json"), fs.join(out, "b.json")
        _put(client, bucket, small, RECORD)
        _put(client, bucket, big, RECORD + b" " * HUGE)
        limits = {small: len(RECORD), big: 2 * len(RECORD)}
        mark = server.mark()
        assert fs.read_many([small, big], limit=limits, too_large_as_none=True) == {small: RECORD, big: None}
        if fs.is_remote(out):
            ranges = {r.key: r.range for r in server.since(mark) if r.method == "GET"}
            assert ranges == {"many/a.json": f"bytes=0-{len(RECORD)}", "many/b.json": f"bytes=0-{2 * len(RECORD)}"}
        with pytest.raises(fs.TooLarge, match="b.json"):
            fs.read_many([small, big], limit=limits)
