"""raw_tars: the inventory of per-synset tars under the raw root, and the release fingerprint."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from . import fs
from .rawtar import WHOLE_RELEASE, unpack_whole_release

WNID_TAR = re.compile(r"^(n\d{8})\.tar$")
TEXT_FILES = ("words.txt", "gloss.txt")
# Present while winter21_whole.tar.gz is being unpacked: a run killed mid-way leaves it, and the
# next run unpacks again instead of taking the tars committed so far for the whole release.
UNPACKING_MARK = f".{WHOLE_RELEASE}.unpacking"


@dataclass(frozen=True)
class RawListing:
    tars: list[dict]  # name, url, size, mtime — sorted by name
    texts: dict[str, dict]  # words.txt / gloss.txt entries present
    ignored: list[str]  # other files under the root, reported, not used

    @property
    def tars_fingerprint(self) -> str:
        """The synset tars (names, sizes, modification times): what the inventory, the index and so
        the plan are built from."""
        return _digest(self._tar_entries())

    @property
    def fingerprint(self) -> str:
        """The tars and words.txt / gloss.txt: the synset manifest's input."""
        return _digest(self._tar_entries() + [(n, e["size"], e["mtime"]) for n, e in sorted(self.texts.items())])

    def _tar_entries(self) -> list[tuple]:
        return [(t["name"], t["size"], t["mtime"]) for t in self.tars]


def _digest(entries: list[tuple]) -> str:
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def list_raw(raw_root: str, unpack: bool = False, log: Callable[[str], None] = print) -> RawListing:
    """List the raw release. When the root holds only `winter21_whole.tar.gz`, unpack it first."""
    entries = fs.listdir(raw_root)
    names = {e["name"] for e in entries}
    interrupted = UNPACKING_MARK in names
    if unpack and WHOLE_RELEASE in names and (interrupted or not any(WNID_TAR.match(n) for n in names)):
        again = " again (an earlier unpack did not finish)" if interrupted else ""
        log(f"unpacking {WHOLE_RELEASE} into {raw_root}{again} (one pass, per-synset tars)")
        fs.write_atomic(fs.join(raw_root, UNPACKING_MARK), b"unpack in progress\n")
        unpack_whole_release(fs.join(raw_root, WHOLE_RELEASE), raw_root)
        fs.remove(fs.join(raw_root, UNPACKING_MARK))
        entries = fs.listdir(raw_root)
    tars = [e for e in entries if WNID_TAR.match(e["name"])]
    texts = {e["name"]: e for e in entries if e["name"] in TEXT_FILES}
    # by name: `e not in tars` compared dicts against the whole list, 10 s at 19,167 tars
    used = {e["name"] for e in tars} | set(TEXT_FILES)
    ignored = [e["name"] for e in entries if e["name"] not in used]
    return RawListing(tars, texts, ignored)


def inventory(listing: RawListing) -> list[tuple]:
    """Rows (tar, wnid, size, mtime). No tar is read here: its member count comes from the one
    walk of its headers that filtered_index makes anyway (sql/raw_tars_replace.sql, and
    sql/index_record_scans.sql), so the catalog stages read the raw bytes once, not twice."""
    return [(t["name"], t["name"][: -len(".tar")], t["size"], t["mtime"]) for t in listing.tars]
