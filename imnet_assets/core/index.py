"""The filtered index: one record per raw member, from one pass over each tar.

Each record says where the bytes are (tar, offset, size), what they are (sha256, and width,
height, format and mode read from the image header only), and whether the image is kept.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

from . import fs
from .encode import trial_decode
from .perceptual import image_hash
from .prefetch import depth_for
from .probe import probe_image
from .procpool import bounded_map, process_pool
from .rawtar import Damage, iter_tar, member_key, printable_name


class ImageRecord(NamedTuple):
    """One catalog `images` row, in its column order (a tuple: workers send 13M of them to the
    catalog writer, and a tuple pickles and loads several times faster than a dataclass)."""

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
    phash: int | None = None  # issue 17: 64-bit pHash of a kept image (core/perceptual.py)


FIELDS = list(ImageRecord._fields)


def scan_tar(url: str, mapped: bool = False, depth: int | None = None) -> list[ImageRecord]:
    """Index one raw tar: its wnid is the tar's stem; damage becomes excluded records.
    `mapped`: memory-map a local tar (pool workers only, see rawtar.iter_tar); `depth`: ranged
    requests kept in flight for a remote one (see prefetch)."""
    tar = fs.basename(url)
    wnid = tar[: -len(".tar")] if tar.endswith(".tar") else tar
    records: list[ImageRecord] = []
    # members are hashed and probed in place, not copied
    for item in iter_tar(url, views=True, mapped=mapped, depth=depth):
        member = printable_name(item.name)
        if isinstance(item, Damage):
            key = member_key(item.name)[0] if item.name else None
            records.append(
                ImageRecord(
                    key or f"{wnid}__damage_{item.offset}", wnid, tar, member, item.offset,
                    item.size, None, None, None, None, None, "excluded", printable_name(item.reason), False,
                )
            )
            continue
        digest = hashlib.sha256(item.data).hexdigest()
        key, bad_name = member_key(item.name)
        if key is None:
            records.append(
                ImageRecord(
                    f"{wnid}__member_{item.offset}", wnid, tar, member, item.offset, item.size, digest,
                    None, None, None, None, "excluded", bad_name, False,
                )
            )
            continue
        p = probe_image(item.data)
        status, reason = p.status, p.reason
        if p.needs_repair and p.kept:
            # Settled here, not at encode time: an image the encoder would refuse (less than 5% of
            # its rows decode, nothing decodes) leaves the plan, so shards balance exactly.
            refused = trial_decode(item.data)
            if refused is not None:
                status, reason = "excluded", refused
        records.append(
            ImageRecord(
                key, wnid, tar, member, item.offset, item.size, digest, p.width, p.height,
                p.format, p.mode, status, reason, p.needs_repair and status == "kept",
                image_hash(item.data) if status == "kept" else None,  # issue 17: eval matching
            )
        )
    return records


def scan_tars(urls: Iterable[str], workers: int, log: Callable[[str], None] = lambda _m: None,
              worker_scan: Callable[[str], list[ImageRecord]] | None = None,
              ) -> Iterator[tuple[str, list[ImageRecord]]]:
    """Scan tars in parallel; yields (url, records) as each tar finishes, in input order.

    With more than one worker, in processes whose forkserver preloads this module (see procpool),
    each reading its tars through a memory map (a fifth faster than reading them into buffers,
    measured by bench/scale.py). A read error under a map kills the worker (SIGBUS); the tars not
    yet done are then scanned here, read into buffers, so the error is recorded with its reason
    for its tar instead of ending the stage. (`worker_scan` is what a worker runs per tar.)
    Remote tars are read with ranged requests in flight ahead of each walk, so that all workers
    together keep prefetch.INDEX_REQUESTS_IN_FLIGHT requests going.
    """
    urls = list(urls)
    done = 0
    depth = depth_for(min(workers, len(urls)) if workers > 1 else 1)
    worker_scan = worker_scan or functools.partial(scan_tar, mapped=True, depth=depth)
    if workers > 1 and len(urls) > 1:
        try:
            n = min(workers, len(urls))
            with process_pool(n) as pool:
                for url, records in zip(urls, bounded_map(pool, worker_scan, urls, 2 * n)):
                    yield url, records
                    done += 1
        except BrokenProcessPool as e:
            log(f"a scan worker died ({e}); scanning the remaining {len(urls) - done} tars in this "
                f"process, without memory maps")
    for url in urls[done:]:
        yield url, scan_tar(url, depth=depth)
