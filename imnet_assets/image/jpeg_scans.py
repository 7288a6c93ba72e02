"""The JPEG marker walk: where a JPEG's scans start and end, and whether its scan script completes
every coefficient. Bytes only, no decoding; the decoder (image/decode.py) asks it whether a JPEG that
decoded without error ran out of data."""

from __future__ import annotations

import re
from typing import NamedTuple

# The first marker after entropy-coded data (fill bytes included): 0xFF followed by anything but a
# stuffed zero or a restart marker.
_ECS_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOS_OR_EOI = re.compile(rb"\xff[\xd9\xda]")
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_ALL_COEFFICIENTS = (1 << 64) - 1


def jpeg_scan_bytes(data: bytes) -> int:
    """Bytes of entropy-coded data after the first SOS header of a JPEG (trailing zero padding and EOI
    not counted); -1 when no SOS segment is found.  Walks the marker segments, so SOS markers inside
    APP segments (EXIF thumbnails) are skipped."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return -1
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            scan = data[pos + 2 + length :].rstrip(b"\x00")
            if scan.endswith(b"\xff\xd9"):
                scan = scan[:-2]
            return len(scan)
        pos += 2 + length
    return -1


class JpegScans(NamedTuple):
    sof: int  # the frame's marker (0xC0 baseline ... 0xC2 progressive, 0xC9.. arithmetic coding)
    components: bytes  # the frame's component ids
    scans: list[bytes]  # each scan's SOS header, without its length field
    starts: list[int]  # offset where each scan's entropy-coded data starts


def jpeg_scans(data: bytes) -> JpegScans | None:
    """The frame and the scans before the first EOI of a JPEG; None when the marker segments up to
    the first SOS cannot be walked, or there is no frame.

    Inside entropy-coded data a 0xFF byte is only ever followed by 0x00 or a restart marker, and the
    table segments between scans cannot hold FF DA or FF D9 (0xFF is no Huffman symbol), so after the
    first SOS the others and the EOI are found by one regex search (C speed, ~60 us for 100 kB)."""
    pos, n = 2, len(data)
    sof, components = 0, b""
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = data[pos + 2] << 8 | data[pos + 3]
        if marker in _SOF_MARKERS and length >= 8:
            segment = data[pos + 4 : pos + 2 + length]
            sof, components = marker, segment[6::3][: segment[5]]
        if marker == 0xDA:
            break
        if marker in (0xD8, 0xD9) or length < 2:
            return None
        pos += 2 + length
    scans, starts = [], []
    for found in _SOS_OR_EOI.finditer(data, pos):
        at = found.start()
        if data[at + 1] == 0xD9:
            break
        length = data[at + 2] << 8 | data[at + 3] if at + 4 <= n else 0
        scans.append(data[at + 4 : at + 2 + length])
        starts.append(min(at + 2 + length, n))
    if not components:
        return None
    return JpegScans(sof, components, scans, starts)


def scan_data_end(data: bytes, start: int) -> int:
    """Where the entropy-coded data starting at ``start`` ends: at the first marker (or fill bytes
    before one) that follows it, else at the end of ``data``."""
    found = _ECS_END.search(data, start)
    if found is None:
        return len(data)
    end = found.start()
    while end > start and data[end - 1] == 0xFF:
        end -= 1
    return end


def scan_script_complete(components: bytes, scans: list[bytes], progressive: bool) -> bool:
    """Whether the scans bring every coefficient of every component to full precision (a progressive
    scan with Al = 0), or, for a sequential JPEG, include every component."""
    done = dict.fromkeys(components, 0)
    for sos in scans:
        ns = sos[0] if sos else 0
        if len(sos) < 2 * ns + 4:
            continue  # cut short: its scan has no data
        ss, se, al = sos[2 * ns + 1], sos[2 * ns + 2], sos[2 * ns + 3] & 15
        if not progressive:
            bits = _ALL_COEFFICIENTS
        elif al == 0 and ss <= se:
            bits = ((1 << (se + 1)) - 1) ^ ((1 << ss) - 1)
        else:
            continue
        for c in sos[1 : 2 * ns + 1 : 2]:
            if c in done:
                done[c] |= bits
    return all(v & _ALL_COEFFICIENTS == _ALL_COEFFICIENTS for v in done.values())
