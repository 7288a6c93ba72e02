"""The filtered index: one record per raw member, from one pass over each tar.

Each record says where the bytes are (tar, offset, size), what they are (sha256, and width,
height, format and mode read from the image header only), and whether the image is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

from imnet_assets.image.decode import trial_decode
from imnet_assets.image.guard import MachineryFault
from imnet_assets.image.perceptual import image_hash
from imnet_assets.image.probe import probe_image
from imnet_assets.runtime.procpool import bounded_map, preload, process_pool
from imnet_assets.stages.staged_encodes import StagedCodec, Stager
from imnet_assets.storage import fs
from imnet_assets.storage.member_names import member_key, printable_name
from imnet_assets.storage.prefetch import CHUNK, depth_for
from imnet_assets.storage.rawfolders import FolderChanged, is_folder_source, list_files, read_files
from imnet_assets.storage.rawtar import ByteCount, Damage, iter_tar

preload(__name__)  # the forkserver imports this module once for all workers


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
    phash: int | None = None  # issue 17: 64-bit pHash of a kept image (image/perceptual.py)


FIELDS = list(ImageRecord._fields)


class ScannedTar(list):
    """One tar's ImageRecords, in the order of its walk, with `counted`: the bytes the walk read
    and accounted for (rawtar.ByteCount). Its total is held to the tar's listed size, a count the
    walk does not make itself (check_accounted; sql/audit_conservation.sql)."""

    def __init__(self, records=(), counted: ByteCount | None = None):
        super().__init__(records)
        self.counted = counted if counted is not None else ByteCount()
        self.staged: list[tuple] = []  # its staged encodes' catalog rows (staged_encodes.Stager)


class ReadShort(OSError):
    """A raw tar's walk read fewer (or more) bytes than its listing says: a read that came back
    short, or a tar changed while it was read. Nothing is recorded for it: damage is recorded only
    from bytes read completely."""


def check_accounted(tar: str, scanned: ScannedTar, listed: int) -> None:
    """Raise ReadShort unless the walk of `tar` accounted for exactly its `listed` size."""
    c = scanned.counted
    if c.total != listed:
        raise ReadShort(
            f"raw tar {tar}: the index read {c.total} of its {listed} listed bytes ({c.structure} of headers, "
            f"data, padding and end of archive, {c.damaged} of damage): a read came back short, or the tar "
            "changed while it was read. Nothing was recorded for it: run `imnet build` again")


def scan_tar(url: str, mapped: bool = False, depth: int | None = None, size: int | None = None,
             data: bytes | None = None, codecs: tuple[StagedCodec, ...] = ()) -> ScannedTar:
    """Index one raw tar: its wnid is the tar's stem; damage becomes excluded records.
    `mapped`: memory-map a local tar (pool workers only, see rawtar.iter_tar); `depth`: ranged
    requests kept in flight for a remote one (see prefetch); `size`: its listed size; `data`: its
    bytes, already read; `codecs`: encode each kept image for these as it is read, and commit them
    (stages/staged_encodes.py)."""
    if is_folder_source(url):  # a synset folder of the extracted layout (`<wnid>/`)
        return scan_folder(url, depth=depth, size=size, codecs=codecs)
    tar = fs.basename(url)
    wnid = tar[: -len(".tar")] if tar.endswith(".tar") else tar
    counted = ByteCount()
    records = ScannedTar(counted=counted)
    # members are hashed and probed in place, not copied
    with _stager(codecs, tar) as stager:
        for item in iter_tar(url, views=True, mapped=mapped, depth=depth, size=size, data=data, counted=counted):
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
            records.append(member_record(wnid, tar, item.name, item.offset, item.data))
            _stage(stager, records[-1], item.data)
    if stager is not None:
        records.staged = stager.rows
    return records


def _stager(codecs: tuple[StagedCodec, ...], tar: str):
    return Stager(codecs, tar) if codecs else contextlib.nullcontext()


def _stage(stager: Stager | None, record: ImageRecord, data) -> None:
    if stager is not None and record.status == "kept":
        stager.add(record.key, record.sha256, data)


def member_record(wnid: str, tar: str, name: str, offset: int, data) -> ImageRecord:
    """The images row of one raw file's bytes: a tar's member (`offset`: of its data in the tar)
    or a synset folder's file (storage/rawfolders.py; `offset`: its number in the folder)."""
    member = printable_name(name)
    digest = hashlib.sha256(data).hexdigest()
    key, bad_name = member_key(name)
    if key is None:
        return ImageRecord(f"{wnid}__member_{offset}", wnid, tar, member, offset, len(data), digest,
                           None, None, None, None, "excluded", bad_name, False)
    try:
        p = probe_image(data)
        status, reason = p.status, p.reason
        if p.needs_repair and p.kept:
            # Settled here, not at encode time: an image the encoder would refuse (less than 5% of
            # its rows decode, nothing decodes) leaves the plan, so shards balance exactly.
            refused = trial_decode(data)
            if refused is not None:
                status, reason = "excluded", refused
        phash = image_hash(data) if status == "kept" else None  # issue 17: eval matching
    except MachineryFault as e:  # a known-good image fails too: the stage fails, nothing recorded
        raise MachineryFault(f"{e} (met on {tar} member {member})") from e
    return ImageRecord(
        key, wnid, tar, member, offset, len(data), digest, p.width, p.height,
        p.format, p.mode, status, reason, p.needs_repair and status == "kept", phash,
    )


def read_listed(url: str, size: int) -> bytes:
    """The whole of a remote tar of the listed `size`: one ranged read, exact (fs.read_range
    retries a cut or reset transfer). A tar now shorter than listed changed since the listing: a
    StorageError naming it (the stage fails and is run again), never damage recorded for bytes
    that were not read."""
    data = fs.read_range(url, 0, size)
    if len(data) != size:
        raise fs.StorageError(f"raw tar {url} is {len(data)} bytes, not the {size} it was listed with: it changed "
                              "since it was listed; run the build again to list and index it anew")
    return data


def scan_folder(url: str, depth: int | None = None, size: int | None = None, codecs: tuple[StagedCodec, ...] = ()):
    """Index one synset folder: ImageRecords (index.member_record, as for a tar's members) in
    listing order. `size`: the folder's size in the raw listing; when the files now add up to
    another size (or one is gone, or not its listed size, while read), the folder changed since it
    was listed: FolderChanged, nothing recorded. `depth`: whole-file GETs in flight on S3.
    Returns an index.ScannedTar whose count is the bytes of the files read whole (a folder has no
    headers, padding or damage: its listed size is the sum of its files' sizes)."""
    wnid = fs.basename(url.rstrip("/"))
    tar = f"{wnid}/"
    entries = list_files(url)
    listed = sum(e.size for e in entries if e.problem is None)
    if size is not None and listed != size:
        raise FolderChanged(f"raw folder {tar} holds {listed} bytes of files now, {size} when it was listed: it "
                            "changed while the index ran; run `imnet build` again")
    records = ScannedTar()
    with _stager(codecs, tar) as stager:
        for number, (entry, data) in enumerate(read_files(url, entries, depth)):
            if entry.problem is not None:
                key = member_key(entry.path)[0] or f"{wnid}__member_{number}"
                records.append(ImageRecord(key, wnid, tar, printable_name(entry.path), number, 0, None, None, None,
                                           None, None, "excluded", f"{entry.problem} in raw folder {tar}", False))
                continue
            if data is None or len(data) != entry.size:
                got = "gone" if data is None else f"{len(data)} bytes"
                raise FolderChanged(f"raw folder {tar}: {printable_name(entry.path)} is {got}, listed with "
                                    f"{entry.size} bytes: it changed while the index read it; run `imnet build` again")
            records.counted.structure += len(data)
            records.append(member_record(wnid, tar, entry.path, number, data))
            _stage(stager, records[-1], data)
    if stager is not None:
        records.staged = stager.rows
    return records


def scan_small_tars(tars: list[tuple[str, int]], codecs: tuple[StagedCodec, ...] = ()) -> list[ScannedTar]:
    """Index small remote tars ((url, size) each): all fetched at once (one exact ranged GET each,
    in flight together), then walked in turn."""
    with ThreadPoolExecutor(len(tars), thread_name_prefix="small-tars") as pool:
        data = list(pool.map(lambda t: read_listed(*t), tars))
    return [scan_tar(url, data=d, codecs=codecs) for (url, _size), d in zip(tars, data)]


def _tasks(urls: list[str], sizes: dict[str, int], depth: int) -> list[tuple[str, list]]:
    """The scan's units of work, in input order: ("small", up to `depth` consecutive small remote
    tars, fetched together) or ("one", [one tar])."""
    tasks: list[tuple[str, list]] = []
    for url in urls:
        size = sizes.get(url)
        small = size is not None and size <= SMALL_TAR and fs.is_remote(url) and not is_folder_source(url)
        if small and tasks and tasks[-1][0] == "small" and len(tasks[-1][1]) < depth:
            tasks[-1][1].append((url, size))
        else:
            tasks.append(("small" if small else "one", [(url, size)]))
    return tasks


SMALL_TAR = CHUNK  # remote tars up to one prefetch chunk are fetched whole, many at once


def _run_task(task: tuple[str, list], depth: int, worker_scan: Callable[[str], ScannedTar] | None,
              mapped: bool, codecs: tuple[StagedCodec, ...] = ()) -> list[ScannedTar]:
    kind, tars = task
    if worker_scan is not None:
        return [worker_scan(url) for url, _ in tars]
    if kind == "small":
        return scan_small_tars(tars, codecs)
    url, size = tars[0]  # a "one" task
    return [scan_tar(url, mapped=mapped, depth=depth, size=size, codecs=codecs)]


def scan_tars(urls: Iterable[str], workers: int, log: Callable[[str], None] = lambda _m: None,
              worker_scan: Callable[[str], ScannedTar] | None = None,
              sizes: dict[str, int] | None = None,
              codecs: tuple[StagedCodec, ...] = ()) -> Iterator[tuple[str, ScannedTar]]:
    """Scan tars in parallel; yields (url, records) as each tar finishes, in input order.

    With more than one worker, in processes whose forkserver preloads this module (see procpool),
    each reading its tars through a memory map (a fifth faster than reading them into buffers,
    measured by bench/scale.py). A read error under a map kills the worker (SIGBUS); the tars not
    yet done are then scanned here, read into buffers, so a read that fails again raises an error
    naming its tar (the stage fails and is run again: a failed read is never recorded as damage).
    (`worker_scan` is what a worker runs per tar.)
    Remote tars are read so that all workers together keep prefetch.INDEX_REQUESTS_IN_FLIGHT
    requests going: a large one with ranged requests in flight ahead of its walk, small ones
    (`sizes`, from the listing: at most SMALL_TAR) fetched whole, up to that many together
    (`scan_small_tars`). A listed size also spares the request that would ask for it.
    `codecs`: each kept image is encoded for these as it is read (stages/staged_encodes.py); not
    in the tars scanned here after a worker died (an encoder crash would end this process): the
    shard runs read and encode those images from their sources.
    """
    urls = list(urls)
    sizes = sizes or {}
    done = 0
    depth = depth_for(min(workers, len(urls)) if workers > 1 else 1)
    tasks = _tasks(urls, sizes, depth)
    if workers > 1 and len(urls) > 1:
        try:
            n = min(workers, len(tasks))
            with process_pool(n) as pool:
                mapped = bounded_map(pool, _run_task, tasks, 2 * n, depth, worker_scan, True, codecs)
                for task, results in zip(tasks, mapped):
                    for (url, _size), records in zip(task[1], results):
                        yield url, records
                        done += 1
        except BrokenProcessPool as e:
            log(f"a scan worker died ({e}); scanning the remaining {len(urls) - done} tars in this "
                f"process, without memory maps{' or staged encodes' if codecs else ''}")
            codecs = ()
    for task in _tasks(urls[done:], sizes, depth):
        for (url, _size), records in zip(task[1], _run_task(task, depth, None, False, codecs)):
            yield url, records
