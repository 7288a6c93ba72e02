"""Raw ImageNet tars: one sequential pass over the headers, yielding each member's data offset.

Nothing is ever extracted to disk: the index records (tar, offset, size) and the shard writer
range-reads exactly those bytes later (see `fs.RangeReader`).
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from . import fs

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


@dataclass(frozen=True)
class Member:
    """A regular file inside a raw tar, with its bytes."""

    name: str  # the member name as stored in the tar
    offset: int  # byte offset of the member's data in the tar
    size: int
    data: bytes


@dataclass(frozen=True)
class Damage:
    """Something in a tar that is not a readable regular file: recorded, never dropped silently."""

    name: str  # the member name, or "" when the damage is not a member (a broken tail)
    offset: int
    size: int
    reason: str


def member_key(name: str) -> tuple[str | None, str | None]:
    """The sample key for a member name, or (None, reason) when the name is unsafe.

    `n01440764_10026.JPEG` -> `n01440764_10026`. Names with folders keep only their last part;
    absolute names and names with `..` are refused. Characters webdataset treats specially
    (dots, spaces, slashes) become `_`.
    """
    if not name or name.startswith("/") or "\\" in name:
        return None, f"unsafe member name {name!r}: absolute or not POSIX"
    parts = name.split("/")
    if ".." in parts:
        return None, f"unsafe member name {name!r}: contains '..'"
    base = posixpath.basename(name)
    stem = base.rsplit(".", 1)[0] if "." in base else base
    key = _KEY_UNSAFE.sub("_", stem)
    if not key.strip("_"):
        return None, f"member name {name!r} gives no usable key"
    return key, None


def iter_tar(url: str) -> Iterator[Member | Damage]:
    """Every member of the tar at `url`, in order, with its data; damage is yielded, not raised."""
    total = fs.size(url)
    with fs.open_read(url) as f:
        yield from _iter_fileobj(f, total, fs.basename(url))


def _iter_fileobj(f, total: int, label: str) -> Iterator[Member | Damage]:
    try:
        tf = tarfile.open(fileobj=f, mode="r:")
    except tarfile.ReadError as e:
        yield Damage("", 0, total, f"not a readable tar ({label}): {e}")
        return
    end_of_members = 0
    while True:
        try:
            info = tf.next()
        except (tarfile.TarError, OSError, EOFError) as e:
            yield Damage("", tf.offset, total - tf.offset, f"broken tar header in {label} at byte {tf.offset}: {e}")
            return
        if info is None:
            break
        end_of_members = info.offset_data + ((info.size + 511) // 512) * 512
        if info.isdir():
            continue
        if not info.isreg():
            kind = "symlink" if info.issym() else "hard link" if info.islnk() else "special file"
            yield Damage(info.name, info.offset_data, info.size, f"not a regular file ({kind}) in {label}")
            continue
        f.seek(info.offset_data)
        data = f.read(info.size)
        if len(data) < info.size:
            yield Damage(
                info.name, info.offset_data, info.size,
                f"truncated raw tar {label}: member data cut at byte {info.offset_data + len(data)} "
                f"of {info.offset_data + info.size}",
            )
            return
        yield Member(info.name, info.offset_data, info.size, data)
    # tarfile stops quietly at a header cut short; anything but zero padding after the last
    # member means the tar's tail is broken.
    if end_of_members < total:
        f.seek(end_of_members)
        tail = f.read(min(total - end_of_members, 1 << 20))
        if tail.strip(b"\0"):
            yield Damage(
                "", end_of_members, total - end_of_members,
                f"truncated raw tar {label}: {total - end_of_members} unreadable bytes after byte {end_of_members}",
            )


WHOLE_RELEASE = "winter21_whole.tar.gz"


def unpack_whole_release(archive_url: str, raw_root: str) -> list[str]:
    """Unpack `winter21_whole.tar.gz` into `<raw_root>/<wnid>.tar` (+ words.txt, gloss.txt).

    Streams the archive once; each inner tar is committed atomically. Returns the names written.
    """
    written: list[str] = []
    with fs.open_read(archive_url) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tf:
        for info in tf:
            if not info.isreg():
                continue
            base = posixpath.basename(info.name)
            if not (base.endswith(".tar") or base in ("words.txt", "gloss.txt")):
                continue
            if info.name.startswith("/") or ".." in info.name.split("/"):
                continue
            src = tf.extractfile(info)
            with fs.atomic_open(fs.join(raw_root, base)) as out:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
            written.append(base)
    return written
