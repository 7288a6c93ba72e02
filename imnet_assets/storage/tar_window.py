"""What a raw tar's walk (storage/rawtar.py) reads through: a local tar's memory map, or large
chunks read forward from any file (a local one, or a remote one's prefetched reads), with byte ranges
served from memory; and `pieces`, for data the walk must not hold whole (a member over its
`max_data`, damage running to the tar's end), read and counted (and hashed) PIECE bytes at a time.
"""

from __future__ import annotations

import mmap
import os

from imnet_assets.storage.pieces import PIECE  # bytes per read of a member over `max_data`, of damage

CHUNK = 16 << 20  # bytes per sequential read of the fast walk


def window(f, total: int, mapped: bool) -> Window | MappedWindow:
    """A memory map of a local file when `mapped`, chunked reads otherwise and for anything that
    cannot be mapped (fsspec files)."""
    if mapped:
        try:
            return MappedWindow(f.fileno(), total)
        except (AttributeError, OSError, ValueError):  # no descriptor (fsspec), empty or shrunk file
            pass
    return Window(f)


class MappedWindow:
    """A local tar mapped into memory: headers and members are read straight from the page cache,
    with no copy into a buffer (a fifth of a tar's scan time), and the kernel reads ahead of the
    walk by itself. A view keeps the mapping alive for as long as it is held.

    The price: a read error (a bad sector) or a tar cut short in place while it is scanned ends the
    process with SIGBUS. So only pool workers map tars; `scan_pool.scan_tars` scans the tar again
    without a map in a fresh worker (cut short: short of its listing; a failing read: an error)."""

    def __init__(self, fd: int, total: int):
        self._map = mmap.mmap(fd, total, access=mmap.ACCESS_READ)
        self._fd = fd
        if hasattr(mmap, "MADV_SEQUENTIAL"):
            self._map.madvise(mmap.MADV_SEQUENTIAL)
        self._data = memoryview(self._map)

    def view(self, start: int, end: int) -> memoryview:
        return self._data[start:end]

    def read(self, start: int, end: int) -> bytes:
        return self._map[start:end]

    def piece(self, start: int, end: int) -> bytes:
        """Bytes [start, end) read, not mapped: a mapped page counts in the process's memory (its RSS)
        for as long as the map lives, so data not to be held (`pieces`) is read past the map."""
        return os.pread(self._fd, end - start, start)


class Window:
    """A file read forward in large chunks, with byte ranges served from memory.

    Chunk buffers are reused (within a tar and across tars: allocating and zeroing 16 MB per
    chunk costs more than the copy from the page cache), but only once no view handed out by
    `view` still points into them (`_unshared`), so a view keeps its bytes for as long as it is held.
    """

    def __init__(self, f):
        self._f = f
        self._chunk = CHUNK
        self._data = memoryview(b"")  # the current chunk
        self._buf = bytearray()
        self._start = self._end = 0  # file offsets of the current chunk (the file is at _end)
        try:
            self._fd: int | None = f.fileno()
        except (AttributeError, OSError, ValueError):  # fsspec files have no descriptor
            self._fd = None

    def view(self, start: int, end: int) -> memoryview:
        """Read-only view of bytes [start, end); `end` must not be past the end of the file."""
        if end > self._end:
            self._fill(start, end)
        return self._data[start - self._start : end - self._start]

    def read(self, start: int, end: int) -> bytes:
        return bytes(self.view(start, end))

    def piece(self, start: int, end: int) -> memoryview:
        """`view` of at most PIECE bytes (`pieces`: the chunk buffer is reused once it is let go)."""
        return self.view(start, end)

    def _fill(self, start: int, end: int) -> None:
        keep = self._data[start - self._start :] if start < self._end else self._data[:0]
        size = max(self._chunk, end - start)
        buf = _take_buffer(size)
        mv = memoryview(buf)
        mv[: len(keep)] = keep
        n = len(keep)
        if start > self._end:
            self._f.seek(start)
        while n < size and (k := self._f.readinto(mv[n:size])):
            n += k
        _give_buffer(self._buf)
        self._buf = buf
        self._data = mv[:n].toreadonly()
        self._start, self._end = start, start + n
        if self._fd is not None:  # let the disk read the next chunk while this one is hashed
            os.posix_fadvise(self._fd, self._end, self._chunk, os.POSIX_FADV_WILLNEED)


# Chunk buffers no longer read from; a few are kept for the next chunk or tar.
_spare_buffers: list[bytearray] = []


def _take_buffer(size: int) -> bytearray:
    try:
        buf = _spare_buffers.pop()
    except IndexError:
        return bytearray(size)
    return buf if len(buf) >= size and _unshared(buf) else bytearray(size)


def _give_buffer(buf: bytearray) -> None:
    if len(buf) == CHUNK and len(_spare_buffers) < 2:
        _spare_buffers.append(buf)


def _unshared(buf: bytearray) -> bool:
    """Whether no memoryview points into `buf` (resizing a bytearray with live views fails)."""
    try:
        buf.append(buf.pop())
    except BufferError:
        return False
    return True


def pieces(win: Window | MappedWindow, start: int, end: int, digest=None) -> int:
    """How many of the bytes [start, end) are there, read in PIECE pieces (into `digest` when given),
    none of them held past its piece: a short piece (the file ends) ends the count."""
    got = 0
    for at in range(start, end, PIECE):
        piece = win.piece(at, min(end, at + PIECE))
        if digest is not None:
            digest.update(piece)
        got += len(piece)
        if at + len(piece) < min(end, at + PIECE):
            break
    return got
