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


def iter_tar(url: str, what: str = "raw tar") -> Iterator[Member | Damage]:
    """Every member of the tar at `url`, in order, with its data; damage is yielded, not raised.

    Damage reasons read "<what> <tar name>: ..." (what: "raw tar", or "shard" when verifying).
    """
    total = fs.size(url)
    with fs.open_read(url) as f:
        yield from _iter_fileobj(f, total, fs.basename(url), what)


def _nonzero(f, start: int, length: int) -> bool:
    """Whether any byte in [start, start + length) is not NUL."""
    f.seek(start)
    while length > 0:
        chunk = f.read(min(length, 1 << 20))
        if not chunk:
            return False
        if chunk.strip(b"\0"):
            return True
        length -= len(chunk)
    return False


def _iter_fileobj(f, total: int, label: str, what: str = "raw tar") -> Iterator[Member | Damage]:
    # ignore_zeros: tarfile steps over a damaged header block by block to the next valid one
    # (instead of stopping there), so members after a damaged spot are still found; every
    # stretch it skipped that is not zero padding is reported as damage below.
    try:
        tf = tarfile.open(fileobj=f, mode="r:", ignore_zeros=True)
    except tarfile.ReadError as e:
        yield Damage("", 0, total, f"not a readable tar ({what} {label}): {e}")
        return
    expected = 0  # where the next header should start
    while True:
        try:
            info = tf.next()
        except (tarfile.TarError, OSError, EOFError) as e:
            yield Damage("", tf.offset, max(total - tf.offset, 0),
                         f"truncated or damaged {what} {label}: broken header at byte {tf.offset}: {e}")
            return
        if info is None:
            break
        if info.offset > expected and _nonzero(f, expected, info.offset - expected):
            yield Damage(
                "", expected, info.offset - expected,
                f"damaged {what} {label}: {info.offset - expected} unreadable bytes skipped at byte "
                f"{expected} (a damaged header; the member there is lost)",
            )
        expected = info.offset_data + ((info.size + 511) // 512) * 512
        if info.isdir() and info.size == 0:
            continue  # a folder entry holds no file
        if not info.isreg() or info.isdir() or info.issparse():
            kind = ("symlink" if info.issym() else "hard link" if info.islnk() else
                    "sparse file" if info.issparse() else "directory with data" if info.isdir() else
                    "special file")
            yield Damage(info.name, info.offset_data, info.size, f"not a regular file ({kind}) in {what} {label}")
            continue
        f.seek(info.offset_data)
        data = f.read(info.size)
        if len(data) < info.size:
            yield Damage(
                info.name, info.offset_data, info.size,
                f"truncated {what} {label}: member data cut at byte {info.offset_data + len(data)} "
                f"of {info.offset_data + info.size}",
            )
            return
        yield Member(info.name, info.offset_data, info.size, data)
    # tarfile stops quietly at a header cut short; anything but zero padding after the last
    # member means the tar's tail is broken, and a tar that ends right after a member (no
    # end-of-archive blocks) was cut at a member boundary: members after it may be lost.
    if expected < total:
        if _nonzero(f, expected, total - expected):
            cause = "not a tar" if expected == 0 else "a header cut short or damaged"
            yield Damage(
                "", expected, total - expected,
                f"truncated or damaged {what} {label}: {total - expected} unreadable bytes from "
                f"byte {expected} ({cause})",
            )
    elif expected > 0:
        yield Damage(
            "", total, 0,
            f"truncated {what} {label}: ends at byte {total} without the end-of-archive blocks "
            f"(cut at a member boundary: members after it, if any, are lost)",
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
