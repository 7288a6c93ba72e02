"""A file read through a wrapper that hashes it on the way (the raw tar walk's sha256 of each tar)."""

from __future__ import annotations

import hashlib


class HashingReader:
    """A binary file, read through this wrapper, hashed (sha256) on the way: the longest prefix
    read so far in order is hashed as it passes, so a sequential walk of a file (a tar read by
    tarfile or rawtar, which seek back a little at most) gets the file's sha256 from the same
    read. `hexdigest()` reads whatever that prefix does not cover yet (nothing, usually)."""

    def __init__(self, f):
        self._f = f
        self._pos = 0
        self._hashed = 0
        self._digest = hashlib.sha256()

    def _passed(self, start: int, data) -> None:
        end = start + len(data)
        if start <= self._hashed < end:
            self._digest.update(memoryview(data)[self._hashed - start :])
            self._hashed = end

    def read(self, n: int = -1) -> bytes:
        start = self._pos
        data = self._f.read(n)
        self._pos += len(data)
        self._passed(start, data)
        return data

    def readinto(self, buf) -> int:
        start = self._pos
        k = self._f.readinto(buf) or 0
        self._pos += k
        self._passed(start, memoryview(buf)[:k])
        return k

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = self._f.seek(offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def hexdigest(self) -> str:
        """The sha256 of the whole file."""
        self.seek(self._hashed)
        while self.read(8 << 20):
            pass
        return self._digest.hexdigest()
