"""Every shard's state at once, from two listings and one concurrent batch of small reads.

`shard.shard_state` looks at one shard with three sequential requests (its commit record, whether
the tar is there, the tar's size and stamp): at 1,024 shards and 20 ms a request that is a minute,
longer than Dagster gives a schedule tick. Here the out root and its `_manifests/` folder are
listed once each (one request per 1,000 entries on S3), and the commit records the listing shows
are read concurrently (fs.read_many). A commit record already read by this process is read again
only when the listing shows it changed (another size or stamp): the daemon's code server, which
evaluates every tick, then needs the two listings and nothing else while no shard changes.
The verdicts are `shard.shard_state`'s, decided by the same `unchanged_on_storage`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from . import fs
from .shard import MANIFEST_DIR, state_url, unchanged_on_storage

_STATE_SUFFIX = ".state.json"
_cache: dict[str, tuple[tuple[int, str], dict | None]] = {}  # state url -> ((size, stamp), document)
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class ShardLook:
    """What the out root holds for one shard: its commit record (None: none, or unreadable) and
    its tar's (size, stamp) from the listing (None: no tar)."""

    key: str
    name: str
    state: dict | None
    tar: tuple[int, str] | None


@dataclass(frozen=True)
class OutRootLook:
    shards: dict[str, ShardLook]
    names: list[str]  # every file name directly under the out root (strays included)


def look_at_shards(out_root: str, keys: list[str], names: list[str]) -> OutRootLook:
    """Each shard's commit record and tar as the out root holds them now (`keys[i]`'s tar is
    named `names[i]`)."""
    listing = {e["name"]: (e["size"], e["stamp"]) for e in fs.listdir(out_root)}
    records = {e["name"]: (e["size"], e["stamp"]) for e in fs.listdir(fs.join(out_root, MANIFEST_DIR))
               if e["name"].endswith(_STATE_SUFFIX)}
    urls = {key: state_url(out_root, key) for key in keys}
    states: dict[str, dict | None] = {}
    to_read = []
    with _cache_lock:
        for key, url in urls.items():
            seen = records.get(f"{key}{_STATE_SUFFIX}")
            if seen is None:
                states[key] = None
                continue
            cached = _cache.get(url)
            if cached is not None and cached[0] == seen:
                states[key] = cached[1]
            else:
                to_read.append(url)
    if to_read:
        docs = fs.read_json_many(to_read)
        by_url = {url: key for key, url in urls.items()}
        with _cache_lock:
            for url, doc in docs.items():
                doc = doc if isinstance(doc, dict) else None
                states[by_url[url]] = doc
                seen = records[fs.basename(url)]
                if doc is not None:  # an unreadable record (a torn write) is read again next time
                    _cache[url] = (seen, doc)
                else:
                    _cache.pop(url, None)
    shards = {key: ShardLook(key, name, states[key], listing.get(name)) for key, name in zip(keys, names)}
    return OutRootLook(shards, sorted(listing))


def verdict(out_root: str, look: ShardLook, expected_fingerprint: str | None) -> str:
    """"fresh", "missing" or "stale", as `shard.shard_state` says for the same files."""
    if look.state is None or look.tar is None:
        return "missing"
    if expected_fingerprint is None or look.state.get("fingerprint") != expected_fingerprint:
        return "stale"
    return "fresh" if unchanged_on_storage(fs.join(out_root, look.name), look.state, look.tar) else "stale"


def shard_states(out_root: str, keys: list[str], names: list[str], expected: dict[str, str]) -> dict[str, str]:
    """Partition key -> "fresh", "missing" or "stale" for every shard (`shard.shard_state` for
    each, in two listings and one concurrent batch of reads)."""
    look = look_at_shards(out_root, keys, names)
    return {key: verdict(out_root, look.shards[key], expected.get(key)) for key in keys}


def forget() -> None:
    """Drop the commit records this process remembers (tests; a process that wants a cold look)."""
    with _cache_lock:
        _cache.clear()
