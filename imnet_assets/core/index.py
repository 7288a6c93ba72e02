"""The filtered index: one record per raw member, from one pass over each tar.

Each record says where the bytes are (tar, offset, size), what they are (sha256, and width,
height, format and mode read from the image header only), and whether the image is kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass

from . import fs
from .probe import probe_image
from .procpool import process_pool
from .rawtar import Damage, iter_tar, member_key


@dataclass(frozen=True)
class ImageRecord:
    key: str
    wnid: str
    tar: str
    member: str
    offset: int
    size: int
    sha256: str | None
    width: int | None
    height: int | None
    format: str | None
    mode: str | None
    status: str  # kept | excluded
    reason: str | None
    needs_repair: bool

    def row(self) -> tuple:
        return astuple(self)


FIELDS = list(ImageRecord.__dataclass_fields__)


def scan_tar(url: str) -> list[ImageRecord]:
    """Index one raw tar: its wnid is the tar's stem; damage becomes excluded records."""
    tar = fs.basename(url)
    wnid = tar[: -len(".tar")] if tar.endswith(".tar") else tar
    records: list[ImageRecord] = []
    for item in iter_tar(url, views=True):  # members are hashed and probed in place, not copied
        if isinstance(item, Damage):
            key = member_key(item.name)[0] if item.name else None
            records.append(
                ImageRecord(
                    key or f"{wnid}__damage_{item.offset}", wnid, tar, item.name or "", item.offset,
                    item.size, None, None, None, None, None, "excluded", item.reason, False,
                )
            )
            continue
        digest = hashlib.sha256(item.data).hexdigest()
        key, bad_name = member_key(item.name)
        if key is None:
            records.append(
                ImageRecord(
                    f"{wnid}__member_{item.offset}", wnid, tar, item.name, item.offset, item.size, digest,
                    None, None, None, None, "excluded", bad_name, False,
                )
            )
            continue
        p = probe_image(item.data)
        records.append(
            ImageRecord(
                key, wnid, tar, item.name, item.offset, item.size, digest, p.width, p.height,
                p.format, p.mode, p.status, p.reason, p.needs_repair,
            )
        )
    return records


# Up to this many workers the scan runs in threads of this process, beyond it in processes.
# sha256 and the reads release the GIL and are ~70% of a tar's scan, so two threads keep two cores
# busy; a process pool would add its start-up to every scan (a forkserver, and each worker re-running
# the main script: seconds under the `dagster` and `imnet` console scripts) and pickle every record.
THREAD_WORKERS = 2


def scan_tars(urls: Iterable[str], workers: int) -> Iterator[tuple[str, list[ImageRecord]]]:
    """Scan tars in parallel; yields (url, records) as each tar finishes, in input order.

    With more than `THREAD_WORKERS` workers, in processes whose forkserver preloads this module
    (see procpool), so workers start with Pillow, fsspec and the scan code already imported.
    """
    urls = list(urls)
    if workers <= 1 or len(urls) <= 1:
        for url in urls:
            yield url, scan_tar(url)
        return
    workers = min(workers, len(urls))
    if workers <= THREAD_WORKERS:
        with ThreadPoolExecutor(workers, thread_name_prefix="scan") as pool:
            yield from zip(urls, pool.map(scan_tar, urls))
        return
    with process_pool(workers) as pool:
        yield from zip(urls, pool.map(scan_tar, urls, chunksize=1))
