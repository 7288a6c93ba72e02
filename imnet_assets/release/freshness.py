"""Every shard's state at once, from two listings and one concurrent batch of small reads.

Looking at one shard at a time takes three sequential requests (its commit record, whether the
tar is there, the tar's size and stamp): at 1,024 shards and 20 ms a request that is a minute,
longer than Dagster gives a schedule tick. Here the out root and its `_manifests/` folder are
listed once each (one request per 1,000 entries on S3), and the commit records the listing shows
are read concurrently (fs.read_many). A commit record already read by this process is read again
only when the listing shows it changed (another size or stamp): the daemon's code server, which
evaluates every tick, then needs the two listings and nothing else while no shard changes.
Each verdict is decided by `outroot.unchanged_on_storage`, as the audit decides it: the commit
record, the tar's size and stamp, and the manifest's (the `_manifests/` listing has them: no more
requests; a shard whose manifest is gone or changed is stale, as the audit would find it).

A process that has not looked before (the `imnet status` CLI, a fresh code server, the audit)
would still read all 1,024 records. On S3 the records it reads are therefore kept together in
one more object, the ledger (`_manifests/_commit_records.json`): every record's document next to
the size and stamp its listing showed when it was read. A cold look reads the ledger (one GET)
and then only the records whose listing no longer matches their ledger entry; a look that had to
read records writes the ledger again, and a shard run adds its own record as it commits
(`remember`). The ledger is a cache and nothing more: an entry counts only while the record's
listed size and stamp (its ETag) are still the ones recorded, so a lost or stale ledger costs
reads, never a wrong verdict. Writers do not coordinate (the last write wins; an entry it drops
is read again next time), and a ledger that cannot be written (read-only credentials) is skipped.
Local out roots have no ledger: reading 1,024 local files is milliseconds.

The ledger is read with a limit (`ledger_limit`: it grows with the commit records listed beside
it, LEDGER_ENTRY_MAX_BYTES each); one listed or read larger is ignored with a warning line on
stderr, never read whole and never an error: its records are read instead, and the ledger is
written again.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass

from imnet_assets.release.outroot import (
    MANIFEST_DIR,
    RECORD_MAX_BYTES,
    STATE_SUFFIX,
    manifest_url,
    state_url,
    unchanged_on_storage,
)
from imnet_assets.storage import atomic, fs

LEDGER_NAME = "_commit_records.json"
LEDGER_FORMAT = 1
_cache: dict[str, tuple[tuple[int, str], dict | None]] = {}  # state url -> ((size, stamp), document)
_cache_lock = threading.Lock()
_ledger_cache: dict[str, tuple[tuple[int, str], dict]] = {}  # ledger url -> ((size, stamp), its entries)
# A ledger entry is one commit record (~500 bytes: a dozen fields, the shard run writes them) and
# its name, size and stamp; 4 KiB is eight times that. RECORD_MAX_BYTES more: entries of records
# removed since the ledger was written.
LEDGER_ENTRY_MAX_BYTES = 4096
MAX_RECORDS = 10_000  # shard keys are four digits (plan.split_shards): no out root holds more records


def ledger_limit(records: int) -> int:
    """The most bytes a ledger can hold beside `records` commit records."""
    return RECORD_MAX_BYTES + LEDGER_ENTRY_MAX_BYTES * records


@dataclass(frozen=True)
class ShardLook:
    """What the out root holds for one shard: its commit record (None: none, or unreadable), its
    tar's and its manifest's (size, stamp) from the listings (None: no such file). Every field is
    required: a manifest left out would read as "gone", and every such shard would be stale."""

    key: str
    name: str
    state: dict | None
    tar: tuple[int, str] | None
    manifest: tuple[int, str] | None


@dataclass(frozen=True)
class OutRootLook:
    shards: dict[str, ShardLook]
    names: list[str]  # every file name directly under the out root (strays included)
    manifests: list[str] | None = None  # every file name in its manifests folder (outroot.written_elsewhere)


def look_at_shards(out_root: str, keys: list[str], names: list[str]) -> OutRootLook:
    """Each shard's commit record and tar as the out root holds them now (`keys[i]`'s tar is
    named `names[i]`)."""
    listing = {e["name"]: (e["size"], e["stamp"]) for e in fs.listdir(out_root)}
    listed = {e["name"]: (e["size"], e["stamp"]) for e in fs.listdir(fs.join(out_root, MANIFEST_DIR))}
    records = {name: seen for name, seen in listed.items() if name.endswith(STATE_SUFFIX)}
    urls = {key: state_url(out_root, key) for key in keys}
    states: dict[str, dict | None] = {}
    to_read = []
    with _cache_lock:
        for key, url in urls.items():
            seen = records.get(f"{key}{STATE_SUFFIX}")
            if seen is None:
                states[key] = None
                continue
            cached = _cache.get(url)
            if cached is not None and cached[0] == seen:
                states[key] = cached[1]
            else:
                to_read.append(url)
    by_url = {url: key for key, url in urls.items()}
    if to_read and LEDGER_NAME in listed:
        entries = _ledger_entries(out_root, listed[LEDGER_NAME], ledger_limit(len(records)))
        unread = []
        with _cache_lock:
            for url in to_read:
                seen, entry = records[fs.basename(url)], entries.get(fs.basename(url))
                if entry is not None and entry[0] == seen:
                    states[by_url[url]] = entry[1]
                    _cache[url] = entry
                else:
                    unread.append(url)
        to_read = unread
    if to_read:
        docs = fs.read_json_many(to_read, limit=RECORD_MAX_BYTES, kind="a commit record")
        with _cache_lock:
            for url, doc in docs.items():
                doc = doc if isinstance(doc, dict) else None
                states[by_url[url]] = doc
                seen = records[fs.basename(url)]
                if doc is not None:  # an unreadable record (a torn write) is read again next time
                    _cache[url] = (seen, doc)
                else:
                    _cache.pop(url, None)
        if fs.is_remote(out_root) and any(isinstance(doc, dict) for doc in docs.values()):
            _write_ledger(out_root, {f"{key}{STATE_SUFFIX}": (records[f"{key}{STATE_SUFFIX}"], doc)
                                     for key, doc in states.items() if doc is not None})
    shards = {}
    for key, name in zip(keys, names):
        manifest = listed.get(fs.basename(manifest_url(out_root, key)))
        shards[key] = ShardLook(key, name, states[key], listing.get(name), manifest)
    return OutRootLook(shards, sorted(listing), sorted(listed))


# ----------------------------------------------------------------------------- the ledger (S3)


def ledger_url(out_root: str) -> str:
    return fs.join(out_root, MANIFEST_DIR, LEDGER_NAME)


def _ledger_entries(out_root: str, seen: tuple[int, str], limit: int) -> dict[str, tuple[tuple[int, str], dict]]:
    """record name -> ((size, stamp) the record was listed with, its document), from the ledger
    (remembered by this process while the ledger's own listing is unchanged). A ledger that does
    not parse or is not this format gives nothing; nor does one listed or read larger than `limit`
    (with a warning line: it is not read further)."""
    url = ledger_url(out_root)
    with _cache_lock:
        cached = _ledger_cache.get(url)
    if cached is not None and cached[0] == seen:
        return cached[1]
    entries = _parse_ledger(_read_ledger(url, limit, listed_bytes=seen[0]))
    with _cache_lock:
        _ledger_cache[url] = (seen, entries)
    return entries


def _read_ledger(url: str, limit: int, listed_bytes: int = 0):
    """The ledger's document; None (with a warning line) where it is larger than `limit`, as listed
    (not read at all) or as read (replaced since: read no further than the limit)."""
    try:
        if listed_bytes <= limit:
            return fs.read_json(url, limit=limit, kind="a ledger of commit records")
    except fs.TooLarge:
        pass
    print(fs.redact(f"warning: {url} holds more than {limit:,} bytes, more than the ledger of the commit records "
                    "beside it can: ignored (it is a cache), the records are read instead and it is written again"),
          file=sys.stderr, flush=True)
    return None


def _parse_ledger(doc) -> dict[str, tuple[tuple[int, str], dict]]:
    entries: dict[str, tuple[tuple[int, str], dict]] = {}
    if isinstance(doc, dict) and doc.get("format") == LEDGER_FORMAT and isinstance(doc.get("records"), dict):
        for name, entry in doc["records"].items():
            try:
                size, stamp, record = entry
            except (TypeError, ValueError):
                continue
            if isinstance(size, int) and isinstance(stamp, str) and isinstance(record, dict):
                entries[name] = ((size, stamp), record)
    return entries


def _write_ledger(out_root: str, entries: dict[str, tuple[tuple[int, str], dict]]) -> None:
    doc = {"format": LEDGER_FORMAT,
           "records": {name: [seen[0], seen[1], record] for name, (seen, record) in sorted(entries.items())}}
    try:
        atomic.write_atomic(ledger_url(out_root), json.dumps(doc, separators=(",", ":")).encode())
    except Exception:  # noqa: BLE001 - a cache: read-only credentials only cost reads next time
        pass


def remember(out_root: str, shard_key: str, record: dict, seen: tuple[int, str] | None = None) -> None:
    """Add a just-written commit record to the out root's ledger (S3 only; see the module's
    docstring), so that the next cold look does not have to read it. `seen`: the record's (size,
    stamp) as its write gave them (atomic.write_stamped; None: looked at here). Best effort: an
    error, or another writer's ledger written in between, only means the record is read next time."""
    if not fs.is_remote(out_root):
        return
    url = state_url(out_root, shard_key)
    try:
        seen = seen or fs.stat(url)
        entries = _parse_ledger(_read_ledger(ledger_url(out_root), ledger_limit(MAX_RECORDS)))
    except (fs.StorageError, OSError):
        return
    _write_ledger(out_root, {**entries, fs.basename(url): (seen, record)})


def verdict(out_root: str, look: ShardLook, expected_fingerprint: str | None) -> str:
    """"fresh", "missing" or "stale" for one shard, from what its look found in the out root."""
    if look.state is None or look.tar is None:
        return "missing"
    if expected_fingerprint is None or look.state.get("fingerprint") != expected_fingerprint:
        return "stale"
    fresh = unchanged_on_storage(fs.join(out_root, look.name), look.state, look.tar, manifest=look.manifest)
    return "fresh" if fresh else "stale"


def shard_states(out_root: str, keys: list[str], names: list[str], expected: dict[str, str]) -> dict[str, str]:
    """Partition key -> "fresh", "missing" or "stale" for every shard (`verdict` for
    each, from two listings and one concurrent batch of reads)."""
    look = look_at_shards(out_root, keys, names)
    return {key: verdict(out_root, look.shards[key], expected.get(key)) for key in keys}


def forget() -> None:
    """Drop the commit records this process remembers (tests; a process that wants a cold look)."""
    with _cache_lock:
        _cache.clear()
        _ledger_cache.clear()
