"""The filtered index: one record per raw member, from one pass over each tar.

Each record says where the bytes are (tar, offset, size), what they are (sha256, and width,
height, format and mode read from the image header only), and whether the image is kept.

A member or file of more bytes than perceptual.MAX_DECODED_BYTES (a 2 GB video or archive packed
into a synset tar or left in a synset folder) is never held whole by a scan worker: its sha256 is
taken as it is read, in bounded pieces (rawtar's `hash_over`, rawfolders.Streamed), and it is
excluded, "too large: N bytes, ..." (perceptual.too_many_bytes), with no codec run on it. The eval
set has the same limit (stages/eval_pool.py): over it, neither side is decoded, both are matched by
sha256 only.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from typing import NamedTuple

from imnet_assets.image.decode import trial_decode
from imnet_assets.image.formats import END_MARKED_FORMATS
from imnet_assets.image.guard import MachineryFault
from imnet_assets.image.perceptual import MAX_DECODED_BYTES, image_hash, too_many_bytes
from imnet_assets.image.probe import Probe, probe_image
from imnet_assets.runtime.procpool import preload
from imnet_assets.stages.staged_encodes import StagedCodec, Stager
from imnet_assets.storage import fs
from imnet_assets.storage.member_names import member_key, printable_name
from imnet_assets.storage.rawfolders import FolderChanged, Streamed, is_folder_source, list_files, read_files
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


class Watch:
    """Where a walk is, told to the process that runs it: `reading(n)` before the n-th member's bytes
    are read (from a memory map, the network, a disk), `decoding(n)` before they go through the codecs
    (probe, trial decode, pHash, staged encodes: a private copy by then, never the map), `idle()` at
    the end. `crashed(n)`: the exclusion reason of a member that crashed the process decoding it
    (its codecs are not run again). This one tells no one (a scan in the caller's own process);
    stages/scan_pool.py's marks the worker pool's slot, so a worker's death is blamed on the
    right member and phase."""

    def reading(self, n: int) -> None:
        pass

    def decoding(self, n: int) -> None:
        pass

    def idle(self) -> None:
        pass

    def crashed(self, n: int) -> str | None:
        return None


NO_WATCH = Watch()


def scan_tar(url: str, mapped: bool = False, depth: int | None = None, size: int | None = None,
             data: bytes | None = None, codecs: tuple[StagedCodec, ...] = (), watch: Watch = NO_WATCH) -> ScannedTar:
    """Index one raw tar: its wnid is the tar's stem; damage becomes excluded records.
    `mapped`: memory-map a local tar (pool workers only, see rawtar.iter_tar); `depth`: ranged
    requests kept in flight for a remote one (see prefetch); `size`: its listed size; `data`: its
    bytes, already read; `codecs`: encode each kept image for these as it is read, and commit them
    (stages/staged_encodes.py); `watch`: told which member is read or decoded (see Watch)."""
    if is_folder_source(url):  # a synset folder of the extracted layout (`<wnid>/`)
        return scan_folder(url, depth=depth, size=size, codecs=codecs, watch=watch)
    tar = fs.basename(url)
    wnid = tar[: -len(".tar")] if tar.endswith(".tar") else tar
    counted = ByteCount()
    records = ScannedTar(counted=counted)
    with _stager(codecs, tar) as stager:
        walk = iter_tar(url, views=True, mapped=mapped, depth=depth, size=size, data=data, counted=counted,
                        max_data=MAX_DECODED_BYTES, hash_over=True)
        for n in itertools.count():
            watch.reading(n)
            item = next(walk, None)
            if item is None:
                break
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
            if item.data is None:  # over MAX_DECODED_BYTES: hashed as the walk read it, never held
                records.append(too_large_record(wnid, tar, item.name, item.offset, item.size, item.sha256))
                continue
            # One copy, read here: the decoders never touch the walk's memory map (a read error
            # under it is the storage's fault, met while reading), and the pHash and staged
            # encodes take it as it is (they would each copy a view).
            member_bytes = bytes(item.data)
            watch.decoding(n)
            records.append(member_record(wnid, tar, item.name, item.offset, member_bytes, watch.crashed(n)))
            _stage(stager, records[-1], member_bytes)
        watch.idle()
    if stager is not None:
        records.staged = stager.rows
    return records


def _stager(codecs: tuple[StagedCodec, ...], tar: str):
    return Stager(codecs, tar) if codecs else contextlib.nullcontext()


def _stage(stager: Stager | None, record: ImageRecord, data) -> None:
    if stager is not None and record.status == "kept":
        stager.add(record.key, record.sha256, data)


def _row_key(wnid: str, name: str, offset: int) -> tuple[str, str | None]:
    """The images row's key for a raw file named `name`, and why its name excludes it (None: a good
    name). A hostile name's row is keyed by where it is (`offset`), and its reason comes first, before
    any other (too large, crashed, what decoding says)."""
    key, bad_name = member_key(name)
    return (key, None) if key is not None else (f"{wnid}__member_{offset}", bad_name)


def too_large_record(wnid: str, tar: str, name: str, offset: int, size: int, sha256: str | None) -> ImageRecord:
    """The images row of a raw file over MAX_DECODED_BYTES (see member_record): excluded, too large,
    with the sha256 streamed as it was read; nothing decoded (a hostile name's reason first: _row_key)."""
    key, bad_name = _row_key(wnid, name, offset)
    return ImageRecord(key, wnid, tar, printable_name(name), offset, size, sha256,
                       None, None, None, None, "excluded", bad_name or too_many_bytes(size), False)


def member_record(wnid: str, tar: str, name: str, offset: int, data, crashed: str | None = None) -> ImageRecord:
    """The images row of one raw file's bytes: a tar's member (`offset`: of its data in the tar)
    or a synset folder's file (storage/rawfolders.py; `offset`: its number in the folder).
    `crashed`: why it is excluded without being decoded again (it crashed the scan's decoding
    process, its control passed: stages/scan_pool.py; a hostile name's reason first: _row_key)."""
    member = printable_name(name)
    digest = hashlib.sha256(data).hexdigest()
    key, bad_name = _row_key(wnid, name, offset)
    if bad_name is not None or crashed is not None:
        return ImageRecord(key, wnid, tar, member, offset, len(data), digest, None, None, None, None,
                           "excluded", bad_name or crashed, False)
    try:
        p, status, reason, phash = probe_and_hash(data)
    except MachineryFault as e:  # a known-good image fails too: the stage fails, nothing recorded
        raise MachineryFault(f"{e} (met on {tar} member {member})") from e
    return ImageRecord(
        key, wnid, tar, member, offset, len(data), digest, p.width, p.height,
        p.format, p.mode, status, reason, p.needs_repair and status == "kept", phash,
    )


def probe_and_hash(data: bytes) -> tuple[Probe, str, str | None, int | None]:
    """What the index's codecs say of one image: its probe, status and reason, and its pHash when
    kept (the work a scan worker's `decoding` phase does, and its crash control: scan_pool.py)."""
    p = probe_image(data)
    status, reason = p.status, p.reason
    if p.kept and (p.needs_repair or p.format not in END_MARKED_FORMATS):
        # Settled here, not at encode time: an image the encoder would refuse (less than 5% of
        # its rows decode, nothing decodes) leaves the plan, so shards balance exactly. A file of a
        # format with no end marker (TIFF, BMP, ...: rare in ImageNet) is decoded to know whether it is cut.
        refused = trial_decode(data)
        if refused is not None:
            status, reason = "excluded", refused
    phash = image_hash(data) if status == "kept" else None  # issue 17: eval matching
    return p, status, reason, phash


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


def scan_folder(url: str, depth: int | None = None, size: int | None = None, codecs: tuple[StagedCodec, ...] = (),
                watch: Watch = NO_WATCH):
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
        files = read_files(url, entries, depth, max_bytes=MAX_DECODED_BYTES)
        for number in itertools.count():
            watch.reading(number)
            got = next(files, None)
            if got is None:
                break
            entry, data = got
            if entry.problem is not None:
                key = member_key(entry.path)[0] or f"{wnid}__member_{number}"
                records.append(ImageRecord(key, wnid, tar, printable_name(entry.path), number, 0, None, None, None,
                                           None, None, "excluded", f"{entry.problem} in raw folder {tar}", False))
                continue
            read = data.size if isinstance(data, Streamed) else None if data is None else len(data)
            if read != entry.size:
                got = "gone" if read is None else f"{read} bytes"
                raise FolderChanged(f"raw folder {tar}: {printable_name(entry.path)} is {got}, listed with "
                                    f"{entry.size} bytes: it changed while the index read it; run `imnet build` again")
            records.counted.structure += read
            if isinstance(data, Streamed):  # over MAX_DECODED_BYTES: hashed in pieces, never held
                records.append(too_large_record(wnid, tar, entry.path, number, read, data.sha256))
                continue
            watch.decoding(number)
            records.append(member_record(wnid, tar, entry.path, number, data, watch.crashed(number)))
            _stage(stager, records[-1], data)
        watch.idle()
    if stager is not None:
        records.staged = stager.rows
    return records
