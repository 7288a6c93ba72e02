"""Raw tars whose bytes changed since they were indexed, as shard runs found them.

A shard run reads each source at the (tar, offset, size) the index recorded and checks its sha256.
Bytes that are short or differ (a tar rewritten in place, even with the same size and mtime, which
the listing cannot see) are no property of the image: the run fails naming the tar and the member
(`SourceChanged`), commits nothing, and leaves a marker for the tar under the out root (shard runs
never write the catalog): `<out>/_manifests/_changed_sources/<tar>.json`, one small JSON document
per tar, written atomically. The index's input fingerprint holds the markers present
(stages/fingerprints.py), so the index is stale while one is there and `imnet status` names the tar; the
next `imnet build` scans every marked tar again, whatever its listing says, and removes the
markers it acted on once its rows are committed.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote

from imnet_assets.release.outroot import MANIFEST_DIR, RECORD_MAX_BYTES
from imnet_assets.storage import atomic, fs

MARK_FOLDER = "_changed_sources"  # under the out root's manifest folder (outroot.MANIFEST_DIR)


class SourceChanged(RuntimeError):
    """A source's bytes are not the ones indexed: the shard run fails naming the tar and member."""

    def __init__(self, message: str, tar: str, member: str, found: str):
        super().__init__(message)
        self.tar, self.member, self.found = tar, member, found

    def __reduce__(self):  # sent back from an encode worker: keep every field
        return (type(self), (str(self), self.tar, self.member, self.found))


@dataclass(frozen=True)
class Marker:
    tar: str
    doc: dict
    raw: bytes  # the marker's bytes as read: only these are removed once acted on

    def describe(self) -> str:
        d = self.doc
        return (f"raw tar {self.tar} changed since indexing: shard {d.get('shard', '?')} read "
                f"{d.get('member', '?')} at byte {d.get('offset', '?')}: {d.get('found', '?')}")


def folder(out_root: str) -> str:
    return fs.join(out_root, MANIFEST_DIR, MARK_FOLDER)


def marker_url(out_root: str, tar: str) -> str:
    # a synset folder of the extracted layout is named `<wnid>/`: quoted, so the marker stays one file
    return fs.join(folder(out_root), f"{quote(tar, safe='')}.json")


def mark(out_root: str, error: SourceChanged, offset: int, size: int, indexed_sha256: str, shard: str,
         run_id: str) -> str:
    """Leave the marker for `error`'s tar (replacing an earlier one); returns its URL."""
    url = marker_url(out_root, error.tar)
    doc = {"tar": error.tar, "member": error.member, "offset": offset, "size": size,
           "indexed_sha256": indexed_sha256, "found": error.found, "shard": shard, "run_id": run_id,
           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic.write_atomic(url, json.dumps(doc, sort_keys=True).encode())
    return url


def pending(out_root: str) -> dict[str, Marker]:
    """Tar name -> its marker, for every marker under the out root (one listing, then a read of
    each: they are few). A marker that cannot be parsed still counts, with what it says unknown."""
    entries = [e for e in fs.listdir(folder(out_root)) if e["name"].endswith(".json")]
    if not entries:
        return {}
    found = {}
    for url, data in fs.read_many([e["url"] for e in entries], limit=RECORD_MAX_BYTES,
                                     kind="a changed-source marker").items():
        if data is None:  # removed since the listing
            continue
        tar = unquote(fs.basename(url)[: -len(".json")])
        try:
            doc = json.loads(data)
        except ValueError:
            doc = {}
        found[tar] = Marker(tar, doc if isinstance(doc, dict) else {}, data)
    return found


def digest(markers: dict[str, Marker]) -> str:
    """What the markers add to the index's input fingerprint ("" when there is none)."""
    if not markers:
        return ""
    h = hashlib.sha256()
    for tar in sorted(markers):
        h.update(tar.encode() + b"\0" + hashlib.sha256(markers[tar].raw).digest())
    return h.hexdigest()


def clear(out_root: str, acted_on: dict[str, Marker]) -> list[str]:
    """Remove the markers acted on, each only while it still holds the bytes read then (a shard run
    that marked the tar again since keeps its marker: the next build scans the tar once more). A
    marker holds those bytes only if it is no longer than them: it is read no further."""
    removed = []
    for tar, marker in acted_on.items():
        url = marker_url(out_root, tar)
        try:
            now = fs.read_bytes(url, limit=len(marker.raw), kind="the marker acted on")
        except (FileNotFoundError, fs.TooLarge):  # gone, or another marker now: kept
            continue
        if now == marker.raw:
            fs.remove(url)
            removed.append(tar)
    return removed
