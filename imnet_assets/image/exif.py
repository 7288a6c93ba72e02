"""The metadata rules of SPEC.md "Output": only colour-space EXIF tags are carried (a TIFF IFD walk by
hand: Pillow rewrites EXIF it parses), and an ICC profile only when it describes RGB."""

from __future__ import annotations

import struct

ICC_RGB = b"RGB "
# Decoded modes whose pixels are RGB values (a JPEG's YCbCr decodes to "RGB"; a palette holds RGB)
RGB_SOURCE_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "P", "PA"})

# Colour-space EXIF tags kept (everything else, including Orientation, GPS, maker notes, is dropped).
_KEEP_IFD0 = frozenset({0x013E, 0x013F, 0x0211, 0x0212, 0x0213})  # WhitePoint, PrimaryChromaticities,
# YCbCrCoefficients, YCbCrSubSampling, YCbCrPositioning
_KEEP_EXIF = frozenset({0xA001, 0xA500})  # ColorSpace, Gamma
_KEEP_INTEROP = frozenset({0x0001})  # InteroperabilityIndex
_EXIF_IFD = 0x8769
_INTEROP_IFD = 0xA005
# TIFF field type -> bytes per value
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_MAX_ENTRIES = 1024

Entry = tuple[int, int, bytes]  # (type, count, raw value bytes in the source byte order)


def _read_ifd(tiff: bytes, bo: str, offset: int) -> dict[int, Entry]:
    entries: dict[int, Entry] = {}
    if offset < 8 or offset + 2 > len(tiff):
        return entries
    (n,) = struct.unpack_from(bo + "H", tiff, offset)
    n = min(n, _MAX_ENTRIES, (len(tiff) - offset - 2) // 12)
    for i in range(n):
        pos = offset + 2 + 12 * i
        tag, typ, count = struct.unpack_from(bo + "HHI", tiff, pos)
        size = _TYPE_SIZES.get(typ)
        if size is None:
            continue
        total = size * count
        if total <= 4:
            value = tiff[pos + 8 : pos + 8 + total]
        else:
            (voff,) = struct.unpack_from(bo + "I", tiff, pos + 8)
            value = tiff[voff : voff + total]
        if len(value) == total:
            entries[tag] = (typ, count, value)
    return entries


def _pointer(entries: dict[int, Entry], tag: int, bo: str) -> int | None:
    entry = entries.get(tag)
    if entry is None or entry[0] not in (4, 13) or entry[1] != 1:
        return None
    return struct.unpack(bo + "I", entry[2])[0]


def _ifd_size(entries: dict[int, Entry]) -> int:
    data = sum(len(v) + (len(v) & 1) for _, _, v in entries.values() if len(v) > 4)
    return 2 + 12 * len(entries) + 4 + data


def _write_ifd(entries: dict[int, Entry], start: int, bo: str) -> bytes:
    head = [struct.pack(bo + "H", len(entries))]
    data = bytearray()
    data_start = start + 2 + 12 * len(entries) + 4
    for tag in sorted(entries):
        typ, count, value = entries[tag]
        if len(value) <= 4:
            field = value.ljust(4, b"\0")
        else:
            field = struct.pack(bo + "I", data_start + len(data))
            data += value
            if len(value) & 1:
                data += b"\0"
        head.append(struct.pack(bo + "HHI", tag, typ, count) + field)
    head.append(struct.pack(bo + "I", 0))
    return b"".join(head) + bytes(data)


def filter_exif(raw: bytes | None) -> bytes | None:
    """Keep only the colour-space EXIF tags (values byte for byte, source byte order).

    ``raw`` is the source's EXIF block (with or without the ``Exif\\0\\0`` prefix).  Returns a TIFF
    structure (IFD0 [+ Exif IFD [+ Interop IFD]]) or ``None`` when nothing is kept or the block cannot
    be parsed.  Only the three IFDs involved are read; maker notes, GPS, thumbnails are never parsed.
    """
    if not raw:
        return None
    try:
        return _filter_exif(bytes(raw))
    except (struct.error, ValueError, IndexError, OverflowError):
        return None


def _filter_exif(tiff: bytes) -> bytes | None:
    if tiff.startswith(b"Exif\x00\x00"):
        tiff = tiff[6:]
    if tiff[:2] == b"II":
        bo = "<"
    elif tiff[:2] == b"MM":
        bo = ">"
    else:
        return None
    magic, ifd0_off = struct.unpack_from(bo + "HI", tiff, 2)
    if magic != 42:
        return None
    ifd0 = _read_ifd(tiff, bo, ifd0_off)
    keep0 = {t: e for t, e in ifd0.items() if t in _KEEP_IFD0}
    keep_exif: dict[int, Entry] = {}
    keep_interop: dict[int, Entry] = {}
    exif_off = _pointer(ifd0, _EXIF_IFD, bo)
    if exif_off is not None and exif_off != ifd0_off:
        exif = _read_ifd(tiff, bo, exif_off)
        keep_exif = {t: e for t, e in exif.items() if t in _KEEP_EXIF}
        interop_off = _pointer(exif, _INTEROP_IFD, bo)
        if interop_off is not None and interop_off not in (ifd0_off, exif_off):
            interop = _read_ifd(tiff, bo, interop_off)
            keep_interop = {t: e for t, e in interop.items() if t in _KEEP_INTEROP}
    if not (keep0 or keep_exif or keep_interop):
        return None

    def ptr(offset: int) -> Entry:
        return (4, 1, struct.pack(bo + "I", offset))

    # Layout: header | IFD0 | Exif IFD | Interop IFD.  Pointer entries are inline, so sizes are known
    # before the offsets are filled in.
    if keep_interop:
        keep_exif[_INTEROP_IFD] = ptr(0)
    if keep_exif:
        keep0[_EXIF_IFD] = ptr(0)
    off0 = 8
    off_exif = off0 + _ifd_size(keep0)
    off_interop = off_exif + (_ifd_size(keep_exif) if keep_exif else 0)
    if keep_interop:
        keep_exif[_INTEROP_IFD] = ptr(off_interop)
    if keep_exif:
        keep0[_EXIF_IFD] = ptr(off_exif)
    header = tiff[:2] + struct.pack(bo + "HI", 42, off0)
    parts = [header, _write_ifd(keep0, off0, bo)]
    if keep_exif:
        parts.append(_write_ifd(keep_exif, off_exif, bo))
    if keep_interop:
        parts.append(_write_ifd(keep_interop, off_interop, bo))
    return b"".join(parts)


def rgb_icc_profile(icc: bytes | None, mode: str) -> bytes | None:
    """The ICC profile to carry: only an RGB source's (decoded `mode` RGB, with alpha or a palette)
    and only a profile whose colour space (header bytes 16:20) is RGB. CMYK/grey sources and their
    profiles describe pixels that convert("RGB") has already converted naively: a profile claiming
    RGB on a CMYK or grey image (mislabelled files exist) would mislabel the stored pixels."""
    if mode in RGB_SOURCE_MODES and icc and len(icc) >= 128 and icc[16:20] == ICC_RGB:
        return bytes(icc)
    return None
