"""Raw ImageNet tars: one sequential pass over the headers, yielding each member's data offset.

Nothing is ever extracted to disk: the index records (tar, offset, size) and the shard writer
range-reads exactly those bytes later (see `fs.RangeReader`).
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from imnet_assets.storage import fs, prefetch
from imnet_assets.storage.prefetch import PrefetchedFile
from imnet_assets.storage.tar_damage import (
    Damage,
    damaged_header,
    no_end_blocks,
    non_regular,
    unreadable_tail,
)
from imnet_assets.storage.tar_window import Window, pieces, window


@dataclass(frozen=True)
class Member:
    """A regular file inside a raw tar, with its bytes."""

    name: str  # the member name as stored in the tar
    offset: int  # byte offset of the member's data in the tar
    size: int
    # a read-only memoryview only when asked for (`iter_tar(views=True)`); None for a member over `max_data`
    data: bytes | memoryview | None
    # that of a member over `max_data` with `hash_over` (iter_tar): taken in bounded pieces as the walk read it
    sha256: str | None = None


@dataclass
class ByteCount:
    """The bytes of a tar that its walk read and accounted for, each byte once: `structure`
    (headers, pax and GNU long-name headers included, member data, padding, zero blocks, the end
    of the archive) and `damaged` (bytes inside the damage it yielded). Only bytes actually read
    count, never sizes a header declares: a tar read whole adds up to its size on storage, a read
    that came back short does not (the index's conservation check, sql/audit_conservation.sql)."""

    structure: int = 0
    damaged: int = 0

    @property
    def total(self) -> int:
        return self.structure + self.damaged


def iter_tar(url: str, what: str = "raw tar", *, views: bool = False, mapped: bool = False,
             digest: list[str] | None = None, depth: int | None = None, size: int | None = None,
             data: bytes | None = None, counted: ByteCount | None = None,
             max_data: int | None = None, hash_over: bool = False) -> Iterator[Member | Damage]:
    """Every member of the tar at `url`, in order, with its data; damage is yielded, not raised.

    Damage reasons read "<what> <tar name>: ..." (what: "raw tar", or "shard" when verifying).
    With `views`, each member's data is a read-only memoryview into the chunk it was read with
    instead of a copy (the index scan hashes and probes it in place; see `tar_window.Window`).
    With `mapped`, a local tar is memory-mapped (`tar_window.MappedWindow`: faster; a read error kills the
    process): for pool workers only. A failed read is raised naming the tar, never damage.
    `digest`: a list to which the whole file's sha256 is appended once the walk is done, taken
    from the same read (not with `mapped`).
    `depth`: for a remote tar, keep this many ranged requests in flight ahead of the walk
    (`prefetch.PrefetchedFile`) instead of reading it as one stream.
    `size`: the tar's size as a listing gave it (no request to ask for it); `data`: the whole tar,
    already read (a small remote tar fetched with others at once, see scan_pool.scan_tars).
    `counted`: adds up the bytes the walk read, as structure or as damage (see ByteCount).
    `max_data`: a member of more bytes is not held (its data None; an eval tar's 2 GB video, which
    only its offset is needed of): stepped over, or read in bounded pieces where tarfile's walk must
    see that it is all there. With `hash_over`, such a member's data is read in bounded pieces
    (tar_window.PIECE bytes; a memory map's by `os.pread`, so its pages never count in the process's memory)
    and hashed as it passes: its Member has `sha256`, and only the bytes read are counted (a raw
    tar's 2 GB video, which the index records excluded with its digest: stages/index.py).
    Damage's bytes (a member cut short by the tar's end, or a damaged size field that claims more
    than there is) are counted in pieces too: never the rest of a tar held at once.
    """
    if data is not None:
        total, opened = len(data), io.BytesIO(data)
    else:
        total = fs.size(url) if size is None else size
        opened = PrefetchedFile(url, total, depth=depth) if depth and fs.is_remote(url) else prefetch.open_read(url)
    with opened as f:
        if digest is None:
            yield from _iter_fileobj(f, total, fs.basename(url), what, views, mapped, counted, max_data, hash_over)
            return
        hashing = fs.HashingReader(f)
        yield from _iter_fileobj(hashing, total, fs.basename(url), what, views, counted=counted, max_data=max_data,
                                 hash_over=hash_over)
        digest.append(hashing.hexdigest())


def _iter_fileobj(f, total: int, label: str, what: str = "raw tar", views: bool = False,
                  mapped: bool = False, counted: ByteCount | None = None,
                  max_data: int | None = None, hash_over: bool = False) -> Iterator[Member | Damage]:
    # Plain headers (the whole of a real ImageNet tar) are read by `_fast_walk` from large
    # sequential chunks; at the first header it does not fully understand (pax, links, bad
    # checksums, ...) it stops, and tarfile carries on from exactly there. Each counts the bytes
    # it reads into `counted`, the fast walk up to where tarfile takes over.
    counted = ByteCount() if counted is None else counted
    resume = yield from _fast_walk(f, total, label, what, views, mapped, counted, max_data, hash_over)
    if resume is not None:
        yield from _tarfile_walk(f, total, label, what, *resume, counted=counted, max_data=max_data,
                                 hash_over=hash_over)


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_OCTAL = re.compile(rb" *[0-7]* *")
_PLAIN_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.GNUTYPE_LONGNAME)


def _blocks(size: int) -> int:
    return (size + _BLOCK - 1) // _BLOCK * _BLOCK


def _byte_sum(block: bytes) -> int:
    """``sum(block)`` of one 512-byte header, five times faster: Adler-32's low half is one plus
    the byte sum modulo 65521, and a 256-byte half sums to at most 65280, so it is exact."""
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


def _nts(field: bytes) -> str:
    """A NUL-terminated header string, decoded the way tarfile decodes member names."""
    return field.split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")


def _octal(field: bytes) -> int | None:
    """A plain octal number field (optionally space padded, NUL terminated), else None.

    Stricter than tarfile (no base-256, no other whitespace): whatever passes here tarfile reads
    as the same number, and anything else is left to tarfile.
    """
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if digits.translate(None, b"01234567"):
        return None  # not octal digits, or spaces inside the number
    return int(digits, 8) if digits else 0


# Number fields besides size and checksum, as one key: within a tar they rarely change, so
# checking each new combination once is enough (bounded: a hostile tar cannot grow it forever).
_plain_fields: set[bytes] = set()


def _plain_numbers(block: bytes) -> bool:
    """Whether every number field tarfile parses (mode, uid, gid, size, mtime, devmajor,
    devminor) is plain octal: one it cannot parse makes the whole header invalid."""
    if _octal(block[124:136]) is None:
        return False
    key = block[100:124] + block[136:148] + block[329:345]
    if key in _plain_fields:
        return True
    if any(_octal(key[a : a + 8]) is None for a in (0, 8, 16, 36, 44)) or _octal(key[24:36]) is None:
        return False
    if len(_plain_fields) < 1024:
        _plain_fields.add(key)
    return True


def _plain_header(block: bytes) -> tuple[bytes, str, int] | None:
    """(type, name, size) of a header tarfile would read without any surprise, else None.

    Plain: the unsigned checksum matches, every number field is plain octal, and the type is a
    regular file, a folder or a GNU long name. Names are built as `TarInfo.frombuf` builds them
    (a V7 folder is a regular type with a trailing slash; a non-empty ustar prefix is prepended).
    """
    kind = block[156:157]
    if kind not in _PLAIN_TYPES or len(block) != _BLOCK:  # a short block: a short read, or the tar's end
        return None
    checksum = _octal(block[148:156])
    if checksum is None or checksum != 256 + _byte_sum(block) - sum(block[148:156]) or not _plain_numbers(block):
        return None
    name = _nts(block[0:100])
    if kind == tarfile.AREGTYPE and name.endswith("/"):
        kind = tarfile.DIRTYPE
    if kind == tarfile.DIRTYPE:
        name = name.rstrip("/")
    if block[345] and kind not in tarfile.GNU_TYPES:  # a ustar prefix
        name = _nts(block[345:500]) + "/" + name
    return kind, name, _octal(block[124:136])


def _fast_walk(f, total: int, label: str, what: str, views: bool, mapped: bool = False,
               counted: ByteCount | None = None, max_data: int | None = None, hash_over: bool = False):
    """Read plain headers and their members from large chunks, exactly as tarfile would.

    A generator that yields what `_iter_fileobj` yields and returns None when the whole tar is
    done, or `(start, expected)` when tarfile must read on from the header at `start` (`expected`:
    where the last member's data blocks ended). (0, 0) means from the beginning: before the first
    plain header, tarfile's own rules for the start of a file apply.
    `counted` gets the bytes read up to `expected` (tarfile's walk counts on from there).
    """
    counted = ByteCount() if counted is None else counted
    win = window(f, total, mapped)
    pos = expected = 0  # the next header; the end of the last member's data blocks
    parsed = False  # whether a plain header was read (a resumed tarfile skips the first member)
    while total - pos >= _BLOCK:
        block = win.read(pos, pos + _BLOCK)
        if block == _ZERO_BLOCK:
            pos += _BLOCK  # end-of-archive or padding blocks; tarfile (ignore_zeros) steps over them
            continue
        start = pos
        header = _plain_header(block)
        if header is not None and header[0] == tarfile.GNUTYPE_LONGNAME:
            header, pos = _long_name(win, total, pos, header[2])
        if header is None or (header[0] == tarfile.DIRTYPE and header[2]):
            return (start, expected) if parsed else (0, 0)
        parsed = True
        kind, name, size = header
        data_at = pos + _BLOCK
        # the zero blocks since the last member and this member's header blocks, each read whole
        counted.structure += data_at - expected
        if kind == tarfile.DIRTYPE:
            pos = expected = data_at  # a folder entry holds no file
            continue
        end, pos = data_at + size, data_at + _blocks(size)
        expected = pos
        if end > total:
            counted.damaged += pieces(win, data_at, total)
            yield Damage(name, data_at, size, f"truncated {what} {label}: member data cut at byte {total} of {end}")
            return None
        digest = None
        if max_data is not None and size > max_data:  # not held: hashed in pieces, or stepped over
            data = None
            if hash_over:
                digest = hashlib.sha256()
                counted.structure += pieces(win, data_at, end, digest) + len(win.view(end, min(pos, total)))
            else:  # its data and padding are there (end <= total)
                counted.structure += min(pos, total) - data_at
        else:
            data = win.view(data_at, end) if views else win.read(data_at, end)
            counted.structure += len(data) + len(win.view(end, min(pos, total)))  # its data and padding, as read
        yield Member(name, data_at, size, data, digest and digest.hexdigest())
        if pos > total:  # the data is all there but its padding is cut
            yield Damage("", pos, 0, f"truncated or damaged {what} {label}: broken header at byte {pos}: "
                                     "unexpected end of data")
            return None
    if pos == 0:
        return (0, 0)  # shorter than one block: tarfile says why it is not a tar
    yield from _tail(f, total, expected, label, what, counted)
    return None


def plain_members(data: bytes) -> list[tuple[str, bytes]] | None:
    """(name, data) of every member of a tar held in memory, exactly as `tarfile.open(mode="r:")`
    reads them, when it holds only plain regular-file headers (`_plain_header`, no pax, GNU or
    folder entries) up to its end or to a zero block; None for anything else (then tarfile
    decides). The shard check reads its chunks this way: 10 us a member where tarfile takes 45."""
    spans = plain_member_spans(data)
    return None if spans is None else [(name, data[at:at + size]) for name, at, size in spans]


def plain_member_spans(data) -> list[tuple[str, int, int]] | None:
    """`plain_members` as (name, offset of its data, size): nothing copied."""
    members: list[tuple[str, int, int]] = []
    pos, total = 0, len(data)
    while pos < total:
        block = bytes(data[pos:pos + _BLOCK])
        if block == _ZERO_BLOCK and members:
            return members  # tarfile stops at the end-of-archive block
        header = _plain_header(block)
        if header is None or header[0] not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            return None
        _kind, name, size = header
        start = pos + _BLOCK
        pos = start + _blocks(size)
        if pos > total:
            return None  # cut: tarfile says how
        members.append((name, start, size))
    return members or None


# The most bytes of data a GNU long name or pax header may have (a name of PATH_MAX, a pax record's
# extended attributes: a few KB, as any tar writer makes them). One whose size field claims more (damaged,
# or a hostile tar) is a damaged header, stepped over: never its claimed size read or allocated at once
# (tarfile's read of it allocates what the field says, up to 8 GB).
MAX_HEADER_DATA = 1 << 20


class HeaderReads:
    """A tar file as tarfile reads it: header blocks and the data of long names and pax headers (the
    walk reads members' data itself, from the file). A read of more than MAX_HEADER_DATA is an invalid
    header: tarfile (ignore_zeros) steps over its block, and `_skipped` counts the stretch as damage.
    The one rule for plain and compressed tars (compressed_tar: the stream while a header is read)."""

    def __init__(self, f):
        self._f = f

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > MAX_HEADER_DATA:
            raise tarfile.InvalidHeaderError(f"header data of {n} bytes, over {MAX_HEADER_DATA}")
        return self._f.read(n)

    def seek(self, *args) -> int:
        return self._f.seek(*args)

    def tell(self) -> int:
        return self._f.tell()


def _long_name(win: Window, total: int, pos: int, size: int) -> tuple[tuple[bytes, str, int] | None, int]:
    """The header after a GNU long name at `pos`, named by it, and where that header is.

    None unless the name's blocks and a plain, non-long-name header after them are all there.
    """
    after = pos + _BLOCK + _blocks(size)
    if total - after < _BLOCK or size > MAX_HEADER_DATA:  # tarfile's walk tells the damage
        return None, pos
    # the name first: the window reads forward (a view behind its chunk's start is not there)
    raw_name = win.read(pos + _BLOCK, after)
    header = _plain_header(win.read(after, after + _BLOCK))
    if header is None or header[0] == tarfile.GNUTYPE_LONGNAME or len(raw_name) != after - pos - _BLOCK:
        return None, pos
    kind, _short, size = header
    name = _nts(raw_name)
    if kind == tarfile.DIRTYPE:
        name = name.removesuffix("/")
    return (kind, name, size), after


def _tail(f, total: int, expected: int, label: str, what: str,
          counted: ByteCount | None = None) -> Iterator[Damage]:
    # tarfile stops quietly at a header cut short; anything but zero padding after the last
    # member means the tar's tail is broken, and a tar that ends right after a member (no
    # end-of-archive blocks) was cut at a member boundary: members after it may be lost.
    counted = ByteCount() if counted is None else counted
    if expected < total:
        nonzero, read = _read_range(f, expected, total - expected)
        if not nonzero:
            counted.structure += read  # the end of the archive (zero blocks), as far as it was read
            return
        counted.damaged += read
        yield unreadable_tail(expected, total, label, what)
    elif expected > 0:
        yield no_end_blocks(total, label, what)


def _read_range(f, start: int, length: int, digest=None) -> tuple[bool, int]:
    """(whether any byte in [start, start + length) is not NUL, how many of them were read): the
    whole range is read, so that the count says how much of it is there; `digest` gets them."""
    f.seek(start)
    nonzero, read = False, 0
    while length > read:
        chunk = f.read(min(length - read, 1 << 20))
        if not chunk:
            break
        if digest is not None:
            digest.update(chunk)
        nonzero = nonzero or bool(chunk.strip(b"\0"))
        read += len(chunk)
    return nonzero, read


def _tarfile_walk(f, total: int, label: str, what: str, start: int = 0, expected: int = 0,
                  counted: ByteCount | None = None, max_data: int | None = None,
                  hash_over: bool = False) -> Iterator[Member | Damage]:
    """The tar read with tarfile from the header at `start` on (see `_fast_walk`); `counted` gets
    the bytes from `expected` on."""
    # ignore_zeros: tarfile steps over a damaged header block by block to the next valid one
    # (instead of stopping there), so members after a damaged spot are still found; every
    # stretch it skipped that is not zero padding is reported as damage below.
    counted = ByteCount() if counted is None else counted
    f.seek(0)
    try:
        tf = tarfile.open(fileobj=HeaderReads(f), mode="r:", ignore_zeros=True)
    except tarfile.ReadError as e:
        counted.damaged += _read_range(f, 0, total)[1]
        yield Damage("", 0, total, f"not a readable tar ({what} {label}): {e}")
        return
    if start:
        tf.next()  # the first member, already read by the fast walk
        tf.offset = start
    while True:
        try:
            info = tf.next()
        except OSError as e:  # the read failed (tarfile raises none for bytes): never damage (SPEC)
            said = f"cannot read {what} {label} at byte {tf.offset}: {e} (never recorded as damage: build again)"
            raise (fs.StorageError(said) if isinstance(e, fs.StorageError) else OSError(e.errno, said)) from e
        except (tarfile.TarError, EOFError) as e:
            yield from _skipped(f, expected, tf.offset, label, what, counted)
            counted.damaged += _read_range(f, tf.offset, total - tf.offset)[1]
            yield Damage("", tf.offset, max(total - tf.offset, 0),
                         f"truncated or damaged {what} {label}: broken header at byte {tf.offset}: {e}")
            return
        if info is None:
            break
        yield from _skipped(f, expected, info.offset, label, what, counted)
        counted.structure += info.offset_data - info.offset  # its headers (pax, GNU long names), parsed whole
        # where its data blocks end (a sparse member's `size` is the size it unpacks to, not what is stored)
        expected = tf.offset if info.issparse() else info.offset_data + _blocks(info.size)
        if info.isdir() and info.size == 0:
            continue  # a folder entry holds no file
        if (kind := non_regular(info)) is not None:
            counted.structure += _read_range(f, info.offset_data, expected - info.offset_data)[1]
            yield Damage(info.name, info.offset_data, info.size, f"not a regular file ({kind}) in {what} {label}")
            continue
        data: bytes | None = None
        digest = None
        if max_data is not None and info.size > max_data:  # read in pieces: to see it is all there (and hashed)
            digest = hashlib.sha256() if hash_over else None
            got = _read_range(f, info.offset_data, info.size, digest)[1]
        else:
            f.seek(info.offset_data)
            data = f.read(info.size)
            got = len(data)
        if got < info.size:
            counted.damaged += got
            yield Damage(
                info.name, info.offset_data, info.size,
                f"truncated {what} {label}: member data cut at byte {info.offset_data + got} "
                f"of {info.offset_data + info.size}",
            )
            return
        counted.structure += got + len(f.read(expected - info.offset_data - info.size))  # + padding
        yield Member(info.name, info.offset_data, info.size, data, digest and digest.hexdigest())
    yield from _tail(f, total, expected, label, what, counted)


def _skipped(f, expected: int, at: int, label: str, what: str, counted: ByteCount) -> Iterator[Damage]:
    """The stretch [expected, at) that tarfile stepped over to reach the header at `at`: zero
    padding, or damage (a damaged header; the member there is lost)."""
    if at <= expected:
        return
    nonzero, read = _read_range(f, expected, at - expected)
    if not nonzero:
        counted.structure += read
        return
    counted.damaged += read
    yield damaged_header(expected, at, label, what)
