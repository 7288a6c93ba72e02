"""raw_tars: the inventory of the synsets under the raw root, and the release fingerprint.

Two layouts are read: per-synset tars `<wnid>.tar` (as ImageNet distributes them, or unpacked here
from `winter21_whole.tar.gz`), or per-synset folders `<wnid>/` of extracted files, read in place
(storage/rawfolders.py). Each synset's source is one entry of `RawListing.tars` either way.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from imnet_assets.storage import atomic, fs, prefetch
from imnet_assets.storage.rawfolders import WNID_FOLDER, list_synset_folders

WNID_TAR = re.compile(r"^(n\d{8})\.tar$")
TEXT_FILES = ("words.txt", "gloss.txt")
WHOLE_RELEASE = "winter21_whole.tar.gz"
# Present while winter21_whole.tar.gz is being unpacked: a run killed mid-way leaves it, and the
# next run unpacks again instead of taking the tars committed so far for the whole release.
UNPACKING_MARK = f".{WHOLE_RELEASE}.unpacking"


class RawLayoutError(FileNotFoundError):
    """The raw root holds no release in a layout this project reads, or two layouts at once."""


ACCEPTED_LAYOUTS = ("per-synset tars <root>/n01440764.tar (as ImageNet distributes them), "
                    "per-synset folders <root>/n01440764/n01440764_10026.JPEG (extracted, read in place), "
                    f"or {WHOLE_RELEASE} alone (unpacked into per-synset tars)")


@dataclass(frozen=True)
class RawListing:
    tars: list[dict]  # one per synset source: name (<wnid>.tar or <wnid>/), wnid, url, size, mtime — by name
    texts: dict[str, dict]  # words.txt / gloss.txt entries present
    ignored: list[str]  # other files under the root, reported, not used
    layout: str = "tars"  # "tars" or "folders" (per-synset folders, storage/rawfolders.py)
    ignored_folders: list[str] = field(default_factory=list)  # folders not named like a wnid (or: tar layout)

    def no_synsets(self, raw_root: str) -> str:
        """Why this listing holds no synset to build from: what the root holds, the layouts accepted."""
        files, folders = len(self.ignored) + len(self.texts), len(self.ignored_folders)
        if not files and not folders:
            if gone := fs.missing_bucket(raw_root):
                return f"no raw release under IMNET_RAW_ROOT={raw_root}: {gone}"
            return (f"no raw release under IMNET_RAW_ROOT={raw_root}: it is empty or missing (accepted layouts: "
                    f"{ACCEPTED_LAYOUTS}; `imnet sample-raw {raw_root}` writes a small synthetic release there)")
        examples = ", ".join([*self.ignored, *self.texts, *(f + "/" for f in self.ignored_folders)][:5])
        return (f"no raw release under IMNET_RAW_ROOT={raw_root}: found {files} files and {folders} folders "
                f"({examples}{', ...' if files + folders > 5 else ''}), none named like n01440764.tar or "
                f"n01440764/. Accepted layouts: {ACCEPTED_LAYOUTS}. Point IMNET_RAW_ROOT at the folder that "
                "holds them")

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


def _to_unpack(entries: list[dict], synset_folders: list[str]) -> bool:
    """Whether the root holds `winter21_whole.tar.gz` still to unpack: no synset tar beside it, or
    an unpack's mark (it did not finish)."""
    names = {e["name"] for e in entries}
    return WHOLE_RELEASE in names and not synset_folders and (
        UNPACKING_MARK in names or not any(WNID_TAR.match(n) for n in names))


def list_raw(raw_root: str, unpack: bool = False, log: Callable[[str], None] = print,
             holding: Callable[[], contextlib.AbstractContextManager] | None = None) -> RawListing:
    """List the raw release. When the root holds only `winter21_whole.tar.gz`, unpack it first.

    Per-synset tars, or else per-synset folders (each listed whole: every file's size and stamp,
    storage/rawfolders.py); a root holding both is refused (RawLayoutError), as the labels would
    depend on which one is meant. `holding`: the unpack's lease (stages/raw_tars.py), held while
    the root is looked at again and unpacked: of two builds sharing a raw root, one unpacks it and
    the other, once it holds the lease, finds it unpacked (else each rewrote every tar, and the
    stamps one recorded were gone: its stages stale at once)."""
    entries, folders = fs.listdir_and_folders(raw_root)
    synset_folders = [f for f in folders if WNID_FOLDER.match(f)]
    if unpack and _to_unpack(entries, synset_folders):
        with holding() if holding is not None else contextlib.nullcontext():
            entries, folders = fs.listdir_and_folders(raw_root)  # as the last holder left it
            synset_folders = [f for f in folders if WNID_FOLDER.match(f)]
            if _to_unpack(entries, synset_folders):
                interrupted = any(e["name"] == UNPACKING_MARK for e in entries)
                for leftover in atomic.sweep_partials(raw_root):  # a killed unpack's partial tar
                    log(f"removed leftover of an interrupted unpack: {leftover}")
                again = " again (an earlier unpack did not finish)" if interrupted else ""
                log(f"unpacking {WHOLE_RELEASE} into {raw_root}{again} (one pass, per-synset tars)")
                atomic.write_atomic(fs.join(raw_root, UNPACKING_MARK), b"unpack in progress\n")
                unpack_whole_release(fs.join(raw_root, WHOLE_RELEASE), raw_root)
                fs.remove(fs.join(raw_root, UNPACKING_MARK))
                entries = fs.listdir(raw_root)
    tars = [dict(e, wnid=e["name"][: -len(".tar")]) for e in entries if WNID_TAR.match(e["name"])]
    texts = {e["name"]: e for e in entries if e["name"] in TEXT_FILES}
    # by name: `e not in tars` compared dicts against the whole list, 10 s at 19,167 tars
    used = {e["name"] for e in tars} | set(TEXT_FILES)
    ignored = [e["name"] for e in entries if e["name"] not in used]
    if tars and synset_folders:
        raise RawLayoutError(
            f"IMNET_RAW_ROOT={raw_root} holds both per-synset tars ({len(tars)}, e.g. {tars[0]['name']}) and "
            f"per-synset folders ({len(synset_folders)}, e.g. {synset_folders[0]}/): one layout per raw root. Move "
            "one of them aside (the folders are read in place, the tars as they are)")
    if synset_folders:
        others = [f for f in folders if f not in set(synset_folders)]
        return RawListing(list_synset_folders(raw_root, synset_folders), texts, ignored, "folders", others)
    return RawListing(tars, texts, ignored, "tars", folders)


def inventory(listing: RawListing) -> list[tuple]:
    """Rows (tar, wnid, size, mtime): one per synset source (`<wnid>.tar`, or a folder `<wnid>/`
    with the sum of its file sizes and the digest of its listing). No tar is read here: its member
    count comes from the one walk of its headers that filtered_index makes anyway
    (sql/raw_tars_replace.sql, and sql/index_record_scans.sql), so the catalog stages read the raw
    bytes once, not twice."""
    return [(t["name"], t["wnid"], t["size"], t["mtime"]) for t in listing.tars]


def unpack_whole_release(archive_url: str, raw_root: str) -> list[str]:
    """Unpack `winter21_whole.tar.gz` into `<raw_root>/<wnid>.tar` (+ words.txt, gloss.txt).

    Streams the archive once; each inner tar is committed atomically. Returns the names written.
    """
    written: list[str] = []
    try:
        with prefetch.open_read(archive_url) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tf:
            for info in tf:
                if not info.isreg():
                    continue
                base = posixpath.basename(info.name)
                if not (base.endswith(".tar") or base in ("words.txt", "gloss.txt")):
                    continue
                if info.name.startswith("/") or ".." in info.name.split("/"):
                    continue
                src = tf.extractfile(info)
                with atomic.atomic_open(fs.join(raw_root, base)) as out:
                    while chunk := src.read(8 << 20):
                        out.write(chunk)
                written.append(base)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        where = f"after {len(written)} files (last {written[-1]})" if written else "before its first file"
        raise ArchiveDamaged(
            f"{fs.redact(archive_url)} is damaged or cut short: {type(e).__name__}: {e}, {where}. Its size "
            "or checksum will differ from the published one: download it again (the next run unpacks "
            "it again from the start)") from None
    return written


class ArchiveDamaged(ValueError):
    """winter21_whole.tar.gz cannot be read to its end."""
