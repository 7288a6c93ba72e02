"""The extracted layout of the raw release, read in place: a folder per synset,
`<raw root>/<wnid>/<wnid>_<n>.JPEG` (how most copies of ImageNet are kept), locally or under an
`s3://` prefix.

A synset folder is one source, as `<wnid>.tar` is in the tar layout, and gives the same rows for
the same files (so the same shards, byte for byte):
- its name in the catalog (`raw_tars.tar`, `images.tar`, plan slices) is `<wnid>/`; the trailing
  slash is what tells a folder source from a tar everywhere (`is_folder_source`);
- an `images` row's `member` is the file's path inside the folder (as `member_names.printable_name`
  writes names), `offset` the file's number in the folder's listing order (its bytes are the whole
  file, from byte 0), `size` and `sha256` the file's;
- listing order: the files directly in the folder first, then those in subfolders, each by name
  (so of two files with the same key the one in the folder itself stays, index_duplicates.sql);
- keys, labels and hostile names follow the tar layout's rules (`member_names.member_key` on the path).
  Anything that is not a regular file (a link to a folder, a broken link, a FIFO) is a recorded
  exclusion, never opened. Links to files are followed.
- `raw_tars.size` is the sum of the folder's file sizes and `raw_tars.mtime` a digest of its
  listing (every file's path, size and mtime in ns, or ETag on S3): a file added, removed or
  changed makes the index stale for that synset only.

At the real size (13M files in 19,167 folders) the folders are listed in parallel
(LISTING_THREADS: `os.scandir` locally; one recursive listing per prefix on S3, about one request
per folder), and each scan worker reads a folder's files ahead of its hashing and probing: in
threads locally, many whole-object GETs in flight on S3 (`fs.read_many`, one GET each).
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from imnet_assets.storage import fs
from imnet_assets.storage.member_names import raw_name
from imnet_assets.storage.pieces import sha256_in_pieces

WNID_FOLDER = re.compile(r"^n\d{8}$")
LISTING_THREADS = 32  # synset folders listed at once (per process, see list_synset_folders)
READ_THREADS = 8  # local files a scan worker reads at once, ahead of its walk
READ_AHEAD = 32  # local files read ahead of the walk (bounded memory: ~4 MB for ImageNet's files)
REMOTE_BATCH = 32  # S3 objects a scan worker fetches at once (whole-object GETs), the next batch ahead


class FolderChanged(OSError):
    """A synset folder's files are not what its listing said (one gone, or of another size) while
    the index read them: nothing is recorded for the folder; the stage fails naming it."""


class FileEntry(NamedTuple):
    path: str  # inside the synset folder, "/"-separated (surrogate escapes for non-UTF-8 bytes)
    size: int
    stamp: str  # mtime in ns, or the ETag on S3
    problem: str | None = None  # not a regular file: what it is


class Streamed(NamedTuple):
    """A file over read_files' `max_bytes`, read in pieces (storage/pieces.py) and never held whole: how
    many bytes it had when read, and their sha256."""

    size: int
    sha256: str


def is_folder_source(tar: str) -> bool:
    """Whether a catalog source name (or a source URL) is a synset folder (`<wnid>/`), not a tar."""
    return tar.endswith("/")


def folder_url(raw_root: str, wnid: str) -> str:
    return fs.join(raw_root, wnid) + "/"


def _order(entry: FileEntry) -> tuple:
    return entry.path.count("/"), entry.path


# ----------------------------------------------------------------------------- listing


def list_files(url: str) -> list[FileEntry]:
    """Every file under the synset folder at `url` (subfolders included), in listing order."""
    entries = _find_remote(url) if fs.is_remote(url) else list(_walk_local(url.rstrip("/"), ""))
    return sorted(entries, key=_order)


def _walk_local(top: str, prefix: str) -> Iterator[FileEntry]:
    with os.scandir(top) as it:
        found = list(it)
    for e in found:
        path = prefix + e.name
        try:
            if e.is_dir(follow_symlinks=False):
                yield from _walk_local(e.path, path + "/")
            elif e.is_file():  # a link to a file is followed
                st = e.stat()
                yield FileEntry(path, st.st_size, str(st.st_mtime_ns))
            else:
                yield FileEntry(path, 0, "", f"not a regular file ({_kind(e)})")
        except FileNotFoundError:  # gone since the folder was listed: not there
            continue


def _kind(entry: os.DirEntry) -> str:
    """What an entry that is neither a regular file (or a link to one) nor a folder is."""
    try:
        mode = entry.stat().st_mode  # what a link points at
    except OSError:  # nothing there, or a loop of links
        return "broken link"
    what = ("folder" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else
            "socket" if stat.S_ISSOCK(mode) else "device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else
            "special file")
    return f"link to a {what}" if entry.is_symlink() else what


def _find_remote(url: str) -> list[FileEntry]:
    return [FileEntry(e["path"], e["size"], e["stamp"]) for e in fs.find_files(url)]


def summary(url: str, wnid: str, entries: list[FileEntry]) -> dict:
    """A synset folder as the raw listing holds a source (`inventory.RawListing.tars`): `size` the
    sum of its file sizes, `mtime` the digest of its listing."""
    text = "".join(f"{e.path}\0{e.size}\0{e.stamp}\0{e.problem or ''}\n" for e in entries)
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
    return {"name": f"{wnid}/", "wnid": wnid, "url": url, "size": sum(e.size for e in entries if e.problem is None),
            "mtime": f"listing-sha256:{digest}", "files": len(entries)}


def list_synset_folders(raw_root: str, wnids: list[str]) -> list[dict]:
    """The listing entries of these synset folders (see `summary`), in the order given.

    Listing is mostly CPU once the file system answers (~5 us a file here: a stat, and Python
    around it; on S3 the parsing of each page of 1,000 keys), so 19,167 folders of 13M files are
    listed by processes (PROCESS_FOLDERS or more folders: up to one per CPU, FOLDERS_PER_TASK at a
    time), each with LISTING_THREADS threads that wait on the disk or the network together."""
    if len(wnids) < PROCESS_FOLDERS:
        return _list_in_threads(raw_root, wnids)
    from imnet_assets.runtime.procpool import process_pool

    tasks = [wnids[i : i + FOLDERS_PER_TASK] for i in range(0, len(wnids), FOLDERS_PER_TASK)]
    out: list[dict] = []
    with process_pool(max(1, min(len(tasks), os.cpu_count() or 1))) as pool:
        for part in pool.map(_list_in_threads, [raw_root] * len(tasks), tasks):
            out.extend(part)
    return out


PROCESS_FOLDERS = 256
FOLDERS_PER_TASK = 64


def _list_in_threads(raw_root: str, wnids: list[str]) -> list[dict]:
    def one(wnid: str) -> dict:
        url = folder_url(raw_root, wnid)
        return summary(url, wnid, list_files(url))

    if len(wnids) <= 1:
        return [one(w) for w in wnids]
    with ThreadPoolExecutor(min(LISTING_THREADS, len(wnids)), thread_name_prefix="list-folders") as pool:
        return list(pool.map(one, wnids))


# ----------------------------------------------------------------------------- the index


def read_files(url: str, entries: list[FileEntry], depth: int | None,
               max_bytes: int | None = None) -> Iterator[tuple[FileEntry, bytes | Streamed | None]]:
    """(entry, its whole bytes or None when gone) in order; no bytes for entries with a problem.
    A file listed with more than `max_bytes` is never held whole: Streamed (its size as read and its
    sha256), read ahead of the walk as the others are."""
    def big(e: FileEntry) -> bool:
        return max_bytes is not None and e.size > max_bytes

    if fs.is_remote(url):
        # Files are ~110 KB, a tar's prefetch chunk 4 MB: each worker keeps more requests in
        # flight than a tar's `depth` (REMOTE_BATCH at least), and fetches the next batch while
        # the one before is hashed and probed.
        batch = max(depth or 0, REMOTE_BATCH)
        parts = [entries[i : i + batch] for i in range(0, len(entries), batch)]

        def fetch(part: list[FileEntry]) -> tuple[dict, dict]:
            urls = {e: file_url(url, e.path) for e in part if e.problem is None}
            data: dict = fs.read_many([u for e, u in urls.items() if not big(e)], batch=batch)
            data.update({u: _stream_remote(u, e.size) for e, u in urls.items() if big(e)})
            return urls, data

        with ThreadPoolExecutor(1, thread_name_prefix="read-files") as pool:
            ahead = pool.submit(fetch, parts[0]) if parts else None
            for k, part in enumerate(parts):
                urls, data = ahead.result()
                ahead = pool.submit(fetch, parts[k + 1]) if k + 1 < len(parts) else None
                for e in part:
                    yield e, data[urls[e]] if e in urls else b""
        return
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="read-files") as pool:
        window: collections.deque = collections.deque()
        try:
            for e in entries:
                path = file_url(url, e.path)
                read = None if e.problem is not None else \
                    pool.submit(_stream_local, path) if big(e) else pool.submit(_read_local, path, e.size)
                window.append((e, read))
                if len(window) >= READ_AHEAD:
                    e0, f0 = window.popleft()
                    yield e0, f0.result() if f0 is not None else b""
            while window:
                e0, f0 = window.popleft()
                yield e0, f0.result() if f0 is not None else b""
        finally:
            for _e, f in window:
                if f is not None:
                    f.cancel()


def _read_local(path: str, listed: int) -> bytes | None:
    """The file's bytes, up to one past its `listed` size (one grown since it was listed, a video being
    copied in, is never held whole: the caller sees another size), or None when it is gone."""
    try:
        with open(path, "rb") as f:
            return f.read(listed + 1)
    except FileNotFoundError:
        return None


def _stream_local(path: str) -> Streamed | None:
    """The file read to its end in pieces: Streamed, or None when it is gone."""
    try:
        with open(path, "rb", buffering=0) as f:
            return Streamed(*sha256_in_pieces(lambda _at, want: f.read(want)))
    except FileNotFoundError:
        return None


def _stream_remote(url: str, listed: int) -> Streamed | None:
    """The object read in exact ranged pieces (fs.read_range) to one byte past its `listed` size, so
    that one now shorter or longer reads as another size: Streamed, or None when it is gone."""
    try:
        return Streamed(*sha256_in_pieces(lambda at, want: fs.read_range(url, at, want), listed))
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------- reading a source


def file_url(folder: str, path: str) -> str:
    """The URL of the file at `path` (listing form: "/"-separated) inside the folder at `folder`."""
    return fs.join(folder.rstrip("/"), *path.split("/"))


def source_location(raw_root: str, tar: str, member: str, offset: int) -> tuple[str, int]:
    """Where an images row's bytes are: (URL, byte offset in it). A tar member is at its offset in
    the tar; a folder's file is the whole file (its row's `offset` is its number in the folder)."""
    if not is_folder_source(tar):
        return fs.join(raw_root, tar), offset
    return file_url(fs.join(raw_root, tar.rstrip("/")), raw_name(member)), 0


def describe_source(raw_root: str, tar: str, member: str | None, offset: int) -> tuple[str, str]:
    """Two lines for `imnet lineage`: where the bytes are, and how they are found there."""
    if not is_folder_source(tar):
        return (f"{fs.join(raw_root, tar)} member {member or '(none: tar damage)'}", f"offset {offset}")
    return (f"{fs.join(raw_root, tar)}{member}  (a file of the synset folder {tar})",
            f"file {offset} of the folder's listing, read whole")
