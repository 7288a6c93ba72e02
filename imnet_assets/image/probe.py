"""Header-only probe of one raw file, run at index time over every raw member.

Cheap by construction: Pillow parses the header (``open_image``), nothing is decoded, and the
truncation check only looks at the last bytes.  The exclusion rules are shared with ``encode`` (via
``plan_decode``) so the index and the encoder agree on what is kept.

Most raw files are plain JPEGs, and Pillow's header parse was a quarter of the index scan, so
``_jpeg_header`` walks the JPEG markers itself first.  It answers only when it is certain Pillow
would open the file to exactly that size and mode without error (same markers, same checks, no
EXIF to parse, no MPO); for anything else it steps aside and Pillow decides, so the probe gives
the same answer for every input either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError

from imnet_assets.image.decode import (
    MAX_FULL_DECODE_PIXELS,
    MAX_SHORT,
    MIN_SIDE,
    ImageRejected,
    describe_error,
    open_image,
    plan_decode,
)
from imnet_assets.image.faults import hit
from imnet_assets.image.formats import looks_truncated
from imnet_assets.image.guard import settle

__all__ = ["MAX_FULL_DECODE_PIXELS", "MIN_SIDE", "Probe", "probe_image", "looks_truncated"]

KEPT = "kept"
EXCLUDED = "excluded"


@dataclass(frozen=True)
class Probe:
    width: int | None
    height: int | None
    format: str | None
    mode: str | None
    status: str  # "kept" or "excluded"
    reason: str | None  # why excluded; None when kept
    needs_repair: bool  # kept, but the data looks truncated; repaired at encode time

    @property
    def kept(self) -> bool:
        return self.status == KEPT


def _excluded(reason: str, width=None, height=None, fmt=None, mode=None) -> Probe:
    return Probe(width, height, fmt, mode, EXCLUDED, reason, False)


def probe_image(data: bytes | memoryview, fast: bool = True) -> Probe:
    """Probe one raw file.  Never raises for any input bytes; raises guard.MachineryFault when a
    header that failed to read fails on a known-good image too (guard.settle). MemoryError
    propagates: memory is no property of the image, so never its exclusion (the index's scan
    worker exits, and the image is probed again in a fresh one: stages/scan_pool.py).

    ``fast=False`` skips the JPEG marker walk and always asks Pillow (the tests compare the two).
    """
    if fast:
        try:
            probe = _probe_jpeg(data)
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - never trust the shortcut over Pillow
            probe = None
        if probe is not None:
            return probe
    data = bytes(data)
    try:
        return _probe(data)
    except ImageRejected as r:  # a header Pillow could not read (or no plugin took)
        reason, error = r.reason, r.error
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - the image's, once the control passes
        reason, error = f"probe failed: {describe_error(e)}", e
    if error is not None:
        settle("probing the header", error, data, _probes, MAX_SHORT)
    return _excluded(reason)


def _probes(data: bytes) -> str | None:
    """None when ``_probe`` keeps these bytes, else why not (guard.settle's attempt)."""
    try:
        probe = _probe(data)
    except ImageRejected as r:
        return r.reason
    return probe.reason


class _Header(NamedTuple):
    """What ``plan_decode`` reads from an opened image, for a JPEG read by ``_jpeg_header``: its
    size, mode, format, and for ``coefficient_bytes`` the frame's components as Pillow's ``layer``
    and ``layers`` hold them (``(id, h, v, table)`` per component triple, the declared count) and
    whether it is progressive (Pillow's ``info``)."""

    size: tuple[int, int]
    mode: str
    format: str = "JPEG"
    layer: tuple[tuple[int, int, int, int], ...] = ()
    layers: int = 0
    progressive: bool = False

    @property
    def info(self) -> dict[str, int]:
        return {"progressive": 1} if self.progressive else {}


def _probe_jpeg(data: bytes | memoryview) -> Probe | None:
    """The probe of a JPEG whose header ``_jpeg_header`` reads with certainty, else None."""
    hit("probe", data)  # the index's test hook (image/faults.py)
    # The walk indexes bytes faster than a memoryview, and a usual header ends within its first
    # kilobytes; a walk that needs more of the file than that returns None and is done again on
    # all of it. (A header found in the head is the header of the file: nothing past it was read.)
    header = _jpeg_header(bytes(data[:_HEAD]))
    if header is None and len(data) > _HEAD:
        header = _jpeg_header(data)
    if header is None:
        return None
    width, height = header.size
    if width * height > MAX_FULL_DECODE_PIXELS:
        return None  # then the size to decode depends on Pillow's draft: let Pillow say
    try:
        # No draft here: at or below the limit, drafting cannot change any rule's outcome.
        plan_decode(header, MAX_SHORT)
    except ImageRejected as r:
        return _excluded(r.reason, width, height, header.format, header.mode)
    return Probe(width, height, header.format, header.mode, KEPT, None, looks_truncated(data, header.format))


# Markers whose segment Pillow's JPEG parser reads by its length and then skips (DHT, DAC, DNL,
# DRI, EXP, SOS), or reads as below; any other marker (other SOFs, RSTn, JPGn, a second SOI,
# unknown ones) leaves the file to Pillow.
_SKIPPED = frozenset({0xC4, 0xCC, 0xDC, 0xDD, 0xDF, 0xDA})
_SOF2 = 0xC2
_SOF = frozenset({0xC0, 0xC1, _SOF2})  # baseline, extended sequential, progressive
_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
_DQT, _SOS, _COM, _APP0, _APP1, _APP2, _APP13, _APP14 = 0xDB, 0xDA, 0xFE, 0xE0, 0xE1, 0xE2, 0xED, 0xEE


_HEAD = 4096


def _jpeg_header(data: bytes | memoryview) -> _Header | None:
    """Size and mode of a JPEG, exactly as ``JpegImagePlugin`` reads them up to the start of scan,
    or None whenever Pillow could do anything else with these bytes (raise, skip junk, read EXIF
    for the dpi, turn it into an MPO, try another plugin).  Never raises on its own input."""
    if not _jpeg_is_first():
        return None
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8 or data[2] != 0xFF:
        return None
    pos = 2  # Pillow reads its first marker from the third byte on
    size = mode = None
    layer: tuple[tuple[int, int, int, int], ...] = ()
    layers, progressive = 0, False
    dpi = exif = False
    while True:
        if pos + 1 >= n:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1  # fill byte
            continue
        if pos + 4 > n:
            return None
        length = data[pos + 2] << 8 | data[pos + 3]
        start, end = pos + 4, pos + 2 + length
        if length < 2 or end > n:
            return None  # Pillow reads no segment, or a truncated one
        if marker in _SOF:
            if size is not None or length < 8 or (length - 8) % 3 or data[start] != 8:
                return None  # a second frame, a cut component list, or not 8-bit
            size = data[start + 3] << 8 | data[start + 4], data[start + 1] << 8 | data[start + 2]
            mode = _MODES.get(data[start + 5])
            if mode is None:
                return None
            layer = tuple(
                (data[i], data[i + 1] >> 4, data[i + 1] & 15, data[i + 2]) for i in range(start + 6, end, 3)
            )
            layers, progressive = data[start + 5], marker == _SOF2
        elif 0xE0 <= marker <= 0xEF:
            app = _app_segment(marker, bytes(data[start : min(end, start + 16)]), length - 2)
            if app is None:
                return None
            dpi, exif = dpi or app == "dpi", exif or app == "exif"
        elif marker == _DQT:
            if not _valid_dqt(data, start, end):
                return None
        elif marker != _COM and marker not in _SKIPPED:
            return None
        if marker == _SOS:
            break
        pos = end
        if pos >= n or data[pos] != 0xFF:
            return None  # junk between segments: Pillow skips it byte by byte
    if size is None or mode is None or not (size[0] and size[1]) or (exif and not dpi):
        return None  # no frame or an empty one (another plugin is tried), or EXIF to read
    return _Header(size, mode, "JPEG", layer, layers, progressive)


def _app_segment(marker: int, head: bytes, length: int) -> str | None:
    """What an APPn segment means to Pillow: "dpi" (JFIF with a density unit), "exif", "" (stored,
    nothing else), or None when Pillow could fail on it or do more with it.  ``head``: its first
    16 bytes; ``length``: its length without the length field."""
    if marker == _APP0 and head.startswith(b"JFIF"):
        if length < 7:
            return None  # the version field is cut: Pillow raises
        return "dpi" if length >= 12 and head[7] in (1, 2) else ""
    if marker == _APP1 and head.startswith(b"Exif\0\0"):
        return "exif"
    if marker == _APP2 and head.startswith(b"ICC_PROFILE\0"):
        return "" if length >= 14 else None  # Pillow reads the fragment count at byte 13
    if marker == _APP2 and head.startswith(b"MPF\0"):
        return None  # maybe an MPO
    if marker == _APP13 and head.startswith(b"Photoshop 3.0\0"):
        return None  # its resource parse can raise
    if marker == _APP14 and head.startswith(b"Adobe"):
        return "" if length >= 7 else None
    return ""


def _valid_dqt(data: bytes | memoryview, start: int, end: int) -> bool:
    """Whether every quantization table of the segment is complete (else Pillow raises)."""
    while start < end:
        start += 65 if data[start] < 16 else 129
    return start <= end


_jpeg_first: bool | None = None


def _jpeg_is_first() -> bool:
    """Whether JPEG is the first plugin that accepts FF D8 FF: only plugins whose signature check
    wants other first bytes (_BEFORE_JPEG) may come before it in Pillow's order (a module that imports
    PngImagePlugin before Pillow's own preinit puts PNG first). Plugins registered later go after it,
    so checking once after ``Image.preinit`` (which registers JPEG) is enough."""
    global _jpeg_first
    if _jpeg_first is None:
        Image.preinit()
        ids = list(Image.ID)
        _jpeg_first = "JPEG" in ids and set(ids[: ids.index("JPEG")]) <= _BEFORE_JPEG
    return _jpeg_first


# Plugins that cannot accept bytes starting FF D8 FF: BMP ("BM"), DIB (a small header size as the
# first 4 bytes), GIF ("GIF8"), PNG (89 "PNG"), WebP ("RIFF"), TIFF ("II*" / "MM*").
_BEFORE_JPEG = frozenset({"BMP", "DIB", "GIF", "PNG", "WEBP", "TIFF"})


def _probe(data: bytes) -> Probe:
    hit("probe", data)
    if not data:
        return _excluded("empty file")
    try:
        img = open_image(data)
    except UnidentifiedImageError as e:  # also what a plugin broken for every input reads as (guard.py)
        raise ImageRejected("not an image: cannot identify image file", e) from e
    except Image.DecompressionBombError as e:  # a few plugins check sizes while parsing headers
        return _excluded(f"too large to decode: {describe_error(e)}")
    except Exception as e:  # a plugin recognised the format but its header is cut or corrupt
        raise ImageRejected(f"unreadable header: {describe_error(e)}", e) from e
    with img:
        width, height = img.size
        fmt, mode = img.format, img.mode
        try:
            plan_decode(img, MAX_SHORT)  # size/mode/format rules; a JPEG draft is header-only
        except ImageRejected as r:
            return _excluded(r.reason, width, height, fmt, mode)
    return Probe(width, height, fmt, mode, KEPT, None, looks_truncated(data, fmt))
