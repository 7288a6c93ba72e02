"""Header-only probe of one raw file, run at index time over every raw member.

Cheap by construction: Pillow parses the header (``open_image``), nothing is decoded, and the
truncation check only looks at the last bytes.  The exclusion rules are shared with ``encode`` (via
``plan_decode``) so the index and the encoder agree on what is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from .encode import (
    MAX_FULL_DECODE_PIXELS,
    MAX_SHORT,
    MIN_SIDE,
    ImageRejected,
    describe_error,
    open_image,
    plan_decode,
)

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


_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def looks_truncated(data: bytes, fmt: str | None) -> bool:
    """Whether the file lacks its end marker (trailing zero padding allowed):
    JPEG/MPO without EOI (FF D9), PNG without an IEND chunk, GIF without the trailer (0x3B)."""
    if fmt in ("JPEG", "MPO"):
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if fmt == "PNG":
        # IEND is the last chunk; tolerate junk after it by looking at the tail only.
        return data.rfind(_PNG_IEND, max(0, len(data) - 4096)) < 0
    if fmt == "GIF":
        return not data.rstrip(b"\x00").endswith(b"\x3b")
    return False


def _excluded(reason: str, width=None, height=None, fmt=None, mode=None) -> Probe:
    return Probe(width, height, fmt, mode, EXCLUDED, reason, False)


def probe_image(data: bytes) -> Probe:
    """Probe one raw file.  Never raises for any input bytes."""
    try:
        return _probe(data)
    except Exception as e:  # includes MemoryError from a pathological header
        return _excluded(f"probe failed: {describe_error(e)}")


def _probe(data: bytes) -> Probe:
    if not data:
        return _excluded("empty file")
    try:
        img = open_image(data)
    except UnidentifiedImageError:
        return _excluded("not an image: cannot identify image file")
    except Image.DecompressionBombError as e:  # a few plugins check sizes while parsing headers
        return _excluded(f"too large to decode: {describe_error(e)}")
    except Exception as e:  # a plugin recognised the format but its header is cut or corrupt
        return _excluded(f"unreadable header: {describe_error(e)}")
    with img:
        width, height = img.size
        fmt, mode = img.format, img.mode
        try:
            plan_decode(img, MAX_SHORT)  # size/mode/format rules; a JPEG draft is header-only
        except ImageRejected as r:
            return _excluded(r.reason, width, height, fmt, mode)
    return Probe(width, height, fmt, mode, KEPT, None, looks_truncated(data, fmt))
