"""A remote file read forward through many ranged requests in flight at once.

Object storage answers each request in 20-50 ms whatever its size, so one tar read as one stream
(one request at a time, even with a large read-ahead) leaves the link idle most of the time, and a
scan of 19,167 tars becomes a queue of waits. `PrefetchedFile` keeps `depth` ranged GETs of
`chunk` bytes each in flight ahead of the reader, in threads (the requests wait on the network,
not the GIL), and serves reads and seeks from the chunks that came back: the raw bytes are still
read exactly once, in order. Each chunk is exactly the bytes asked for (fs.read_range); an object
that ends before the size it was listed with raises StorageError naming it, so a walk never records
damage for bytes that did not arrive. The index gives each scan worker a depth so that all of them together
keep at least INDEX_REQUESTS_IN_FLIGHT requests going (`depth_for`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from imnet_assets.storage import fs

CHUNK = 4 << 20
INDEX_REQUESTS_IN_FLIGHT = 64


def depth_for(workers: int, total: int = INDEX_REQUESTS_IN_FLIGHT, cap: int = 32) -> int:
    """Requests each of `workers` readers keeps in flight so that together they keep `total`."""
    return max(2, min(cap, -(-total // max(workers, 1))))


class PrefetchedFile:
    """A read-only, seekable file over `url` (`size` bytes) that fetches ahead in parallel.

    Reads walk forward; a seek backwards within the chunks kept, or anywhere at all, is served too
    (the tarfile fallback of the index seeks back to headers), by fetching what is missing.
    At most `depth` chunks are in flight and about `depth + keep` are held in memory.
    """

    def __init__(self, url: str, size: int, chunk: int = CHUNK, depth: int = 8, keep: int = 2):
        self._url, self._size, self._chunk, self._depth, self._keep = url, size, chunk, depth, keep
        self._pos = 0
        self._chunks: OrderedDict[int, Future] = OrderedDict()  # chunk index -> its bytes, in order
        self._pool = ThreadPoolExecutor(depth, thread_name_prefix="prefetch")
        self._lock = threading.Lock()
        self._in_flight = 0
        self.max_in_flight = 0  # the most requests that were waiting at once (bench and tests)
        self.requests = 0

    # ------------------------------------------------------------------ file protocol

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        parts = []
        while self._pos < end:
            index, within = divmod(self._pos, self._chunk)
            data = self._get(index)
            take = data[within : within + (end - self._pos)]
            if not take:
                break  # asked past the end
            parts.append(take)
            self._pos += len(take)
        return b"".join(parts)

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        memoryview(buf)[: len(data)] = data
        return len(data)

    def close(self) -> None:
        for f in self._chunks.values():
            f.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._chunks.clear()

    def __enter__(self) -> PrefetchedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ chunks

    def _fetch(self, index: int) -> bytes:
        with self._lock:
            self._in_flight += 1
            self.requests += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            start = index * self._chunk
            want = min(self._size, start + self._chunk) - start
            data = fs.read_range(self._url, start, want)  # exact, or fewer where the object ends
            if len(data) != want:
                # The object ends before its listed size: it changed since it was listed. Raised,
                # so that the walk never takes the missing bytes for a damaged tar.
                raise fs.StorageError(
                    f"{self._url} ends at byte {start + len(data)}, before the {self._size} bytes it was listed with: "
                    "it changed since it was listed; run the build again to list and index it anew")
            return data
        finally:
            with self._lock:
                self._in_flight -= 1

    def _get(self, index: int) -> bytes:
        last = (self._size - 1) // self._chunk
        for i in range(index, min(last, index + self._depth - 1) + 1):  # keep `depth` ahead
            if i not in self._chunks:
                self._chunks[i] = self._pool.submit(self._fetch, i)
        # Drop chunks behind the reader beyond the few kept for short seeks back.
        for i in [i for i in self._chunks if i < index - self._keep]:
            self._chunks.pop(i).cancel()
        return self._chunks[index].result()


def open_read(url: str, block_size: int = 8 << 20):
    """A seekable binary reader of a whole file; on object storage it reads ahead in large blocks
    (for sequential scans), each an exact ranged read (`fs.read_range`: s3fs's own reader took a
    body cut short for the file's end)."""
    if fs.is_remote(url):
        return PrefetchedFile(url, fs.size(url), chunk=block_size, depth=2)
    return open(fs.filesystem(url)[1], "rb", buffering=block_size)
