"""Tars stored compressed (gzip, bzip2, xz), told by their first bytes whatever their name: an eval
set given as ILSVRC2012_img_val.tar.gz, or a gzip file named .tar (stages/eval_pool.py).

A compressed tar cannot be range-read, so its members are read in one forward pass: the compressed
bytes from storage (prefetch.open_read: large reads ahead), decompressed as they come, walked by
tarfile's stream mode, one member in memory at a time (the 6.4 GB of ILSVRC2012_img_val.tar never
are), and a member larger than the caller's `max_data` never: it is hashed (sha256) as it streams
past and yielded as `Streamed`, without its data (an eval set's 2 GB video inside a .tar.gz). Its members and damage are those of storage/rawtar.py's walk, as a plain tar's are, offsets
counted in the decompressed data:

- a damaged header: tarfile (ignore_zeros) steps over it block by block to the next header, and the
  stretch it stepped over, unless all zeros, is damage (`_Recent` keeps the last bytes read to tell);
  so is a GNU long name or pax header whose size claims more than rawtar.MAX_HEADER_DATA (the plain
  tar's rule, `_BoundedHeaders`): never gathered whole;
- a tail that is not zeros, a tar without its end-of-archive blocks, a member cut short, a header
  tarfile cannot parse on from, compressed data that is corrupt or cut (the decompressor's error):
  damage, and the members after it are lost;
- a read of the storage that fails: raised naming the tar, never damage (SPEC "Failure behaviour").
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from imnet_assets.storage import fs, prefetch
from imnet_assets.storage.rawtar import HeaderReads, Member
from imnet_assets.storage.tar_damage import (
    Damage,
    damaged_header,
    no_end_blocks,
    non_regular,
    unreadable_tail,
)

# The first bytes of each compressed format (gzip: RFC 1952; bzip2's "BZh"; xz's stream header).
MAGIC = {"gzip": b"\x1f\x8b", "bzip2": b"BZh", "xz": b"\xfd7zXZ\x00"}
HEAD = max(len(m) for m in MAGIC.values())  # bytes `compression` needs
_OPEN = {"gzip": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), "bzip2": bz2.BZ2File, "xz": lzma.LZMAFile}
# What a decompressor or tarfile raises on bad data (a failed read of the storage is told apart: _Source)
_DATA_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, tarfile.TarError)
_BLOCK = 512
_KEEP = 4 << 20  # decompressed bytes kept behind the walk (tarfile reads 10 kB ahead; a pax header, more)
_STREAMED_READ = 8 << 20  # bytes per read of a Streamed member


@dataclass
class Streamed:
    """A member over `max_data` bytes (iter_compressed_tar): its sha256, taken as it streamed past, not its data."""

    name: str
    offset: int  # byte offset of the member's data in the decompressed tar
    size: int
    sha256: str


def compression(head: bytes) -> str | None:
    """The compressed format whose magic bytes ``head`` (a file's first HEAD bytes) starts with, or None."""
    return next((kind for kind, magic in MAGIC.items() if head.startswith(magic)), None)


class _Source:
    """The compressed bytes from storage; remembers a failed read, so that it is raised as what it
    is (the storage's), never taken for damaged data: an object that ends before or runs past its
    listed `size` changed since it was listed (a StorageError, as a plain tar's read says it)."""

    mode = "rb"

    def __init__(self, f, url: str, size: int | None):
        self._f, self._url, self._size = f, url, size
        self.read_bytes = 0
        self.failed: BaseException | None = None

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._f.read(n)
            self.read_bytes += len(data)
            if self._size is not None and (self.read_bytes > self._size or (not data and self.read_bytes < self._size)):
                raise fs.StorageError(fs.redact(
                    f"{self._url} gave {'more than' if data else 'only'} {self.read_bytes} bytes, not the {self._size} "
                    "it was listed with: it changed since it was listed; run the build again"))
            return data
        except BaseException as e:
            self.failed = e
            raise


class _Recent:
    """The decompressed stream, read forward (by tarfile), keeping its last bytes (at least _KEEP):
    whether a stretch the walk stepped over held anything but zeros (`nonzero`)."""

    def __init__(self, f):
        self._f = f
        self.pos = 0  # bytes read so far
        self._buf = bytearray()
        self._start = 0  # the offset of _buf[0]
        self._nonzero_end = 0  # the end of the last byte not zero among those dropped from _buf

    def read(self, n: int = -1) -> bytes:
        # read1: what is decompressed so far, not n bytes (a read of n that meets corrupt data raises, and
        # the bytes before it would be lost with it)
        data = self._f.read1(n)
        self._buf += data
        self.pos += len(data)
        if len(self._buf) > 2 * _KEEP:
            cut = len(self._buf) - _KEEP
            kept = len(bytes(self._buf[:cut]).rstrip(b"\0"))
            if kept:
                self._nonzero_end = self._start + kept
            del self._buf[:cut]
            self._start += cut
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def nonzero(self, start: int, end: int) -> bool:
        """Whether a byte in [start, end) of what was read is not zero (`end` within the kept bytes)."""
        if end <= start:
            return False
        if start < self._start and self._nonzero_end > start:
            return True
        lo, hi = max(start - self._start, 0), max(end - self._start, 0)
        return bool(bytes(self._buf[lo:hi]).strip(b"\0"))


def iter_compressed_tar(url: str, kind: str, what: str = "eval tar", size: int | None = None,
                        max_data: int | None = None) -> Iterator[Member | Streamed | Damage]:
    """Every member of the `kind`-compressed (`compression`) tar at `url`, in order, with its data
    (one over `max_data` bytes: Streamed, its sha256 only); damage is yielded, not raised (see the
    module's docstring). `size`: its listed size (another raises StorageError)."""
    label = fs.basename(url)
    with prefetch.open_read(url) as raw:
        source = _Source(raw, url, size)
        stream = _Recent(_OPEN[kind](source))
        try:
            yield from _walk(stream, label, f"{kind}-compressed {what}", max_data)
        except _DATA_ERRORS as e:
            if isinstance(source.failed, fs.StorageError):
                raise source.failed from None
            if source.failed is not None:
                raise fs.StorageError(fs.redact(f"cannot read {what} {url}: {type(source.failed).__name__}: "
                                                f"{source.failed} (never recorded as damage: build again)")) from e
            yield Damage("", stream.pos, 0, f"damaged {kind}-compressed {what} {label}: its data cannot be read on "
                                            f"from byte {stream.pos} of the tar ({type(e).__name__}: {e}); the "
                                            "members after it are lost")


class _BoundedHeaders(tarfile.TarInfo):
    """A TarInfo whose headers are read through rawtar.HeaderReads: a GNU long name or pax header whose
    size field claims more than rawtar.MAX_HEADER_DATA is an invalid header, stepped over (ignore_zeros)
    and counted as damage (`_walk`), as in a plain tar; never its claimed size read into memory at once
    (tarfile's stream would gather all it says, up to the rest of the tar). Members' data is read as before."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        stream = tf.fileobj
        if isinstance(stream, HeaderReads):  # a pax header's member, read within the outer call
            return super().fromtarfile(tf)
        tf.fileobj = HeaderReads(stream)
        try:
            return super().fromtarfile(tf)
        finally:
            tf.fileobj = stream


def _walk(stream: _Recent, label: str, what: str, max_data: int | None) -> Iterator[Member | Streamed | Damage]:
    tf = tarfile.open(fileobj=stream, mode="r|", ignore_zeros=True, tarinfo=_BoundedHeaders)
    expected = 0  # where the last member's data blocks ended
    done = tf.firstmember is None  # no member at all (a stream read to its end cannot be asked again)
    while not done:
        try:
            info = tf.next()
            tf.members.clear()  # one member at a time in memory, not a list of them all
        except tarfile.TarError as e:  # a header it cannot parse on from (a broken pax or long-name header)
            yield Damage("", tf.offset, 0, f"truncated or damaged {what} {label}: broken header at byte {tf.offset}: "
                                           f"{e}; the members after it are lost")
            return
        if info is None:
            break
        if stream.nonzero(expected, info.offset):
            yield damaged_header(expected, info.offset, label, what)
        expected = tf.offset  # the next header's offset: this member's data blocks end there
        if info.isdir() and info.size == 0:
            continue  # a folder entry holds no file
        if (kind := non_regular(info)) is not None:
            yield Damage(info.name, info.offset_data, info.size, f"not a regular file ({kind}) in {what} {label}")
            continue
        member: Member | Streamed | None = None
        try:
            if max_data is not None and info.size > max_data:
                member = _streamed(info, tf.extractfile(info))
            else:
                data = tf.extractfile(info).read()
                member = Member(info.name, info.offset_data, len(data), data)
        except tarfile.ReadError:  # tarfile's word for data that ends before the member does
            pass
        if member is None or member.size < info.size:  # (a member's size: the bytes there were)
            yield Damage(info.name, info.offset_data, info.size, f"truncated {what} {label}: member data cut short "
                                                                 f"(it ends at byte {info.offset_data + info.size})")
            return
        yield member
    stream.drain()
    end = stream.pos
    if stream.nonzero(expected, end):
        yield unreadable_tail(expected, end, label, what)
    elif end == expected > 0:
        yield no_end_blocks(end, label, what)


def _streamed(info: tarfile.TarInfo, f) -> Streamed:
    """The member's sha256, its data read in bounded pieces (its `size`: the bytes there were)."""
    digest, got = hashlib.sha256(), 0
    while piece := f.read(_STREAMED_READ):
        digest.update(piece)
        got += len(piece)
    return Streamed(info.name, info.offset_data, got, digest.hexdigest())
