"""What a raw file's bytes say of their format without any decoder: the family its first bytes
name (the signature every decoder of it checks first) and whether it ends as that format ends."""

from __future__ import annotations

# (family, signatures): Pillow's format names; WebP is RIFF....WEBP (checked apart)
_SIGNATURES = (
    ("JPEG", (b"\xff\xd8\xff",)),
    ("PNG", (b"\x89PNG\r\n\x1a\n",)),
    ("GIF", (b"GIF87a", b"GIF89a")),
    ("BMP", (b"BM",)),
    ("TIFF", (b"II*\x00", b"MM\x00*")),
)
FAMILIES = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")


def family(data: bytes | memoryview) -> str | None:
    """The format family the first bytes name (one of FAMILIES), or None."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for name, signatures in _SIGNATURES:
        if head.startswith(signatures):
            return name
    return None


_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def looks_truncated(data: bytes | memoryview, fmt: str | None) -> bool:
    """Whether the file lacks its end marker (trailing zero padding allowed):
    JPEG/MPO without EOI (FF D9), PNG without an IEND chunk, GIF without the trailer (0x3B)."""
    if fmt in ("JPEG", "MPO"):
        return not _ends_with(data, b"\xff\xd9")
    if fmt == "PNG":
        # IEND is the last chunk; tolerate junk after it by looking at the tail only.
        return bytes(data[-4096:]).find(_PNG_IEND) < 0
    if fmt == "GIF":
        return not _ends_with(data, b"\x3b")
    return False


def _ends_with(data: bytes | memoryview, marker: bytes) -> bool:
    """``data.rstrip(b"\\0").endswith(marker)``, looking at the last bytes only when that settles it."""
    tail = bytes(data[-64:]).rstrip(b"\x00")
    if len(tail) < len(marker) < len(data):  # the zero padding is long: look at all of it
        tail = bytes(data).rstrip(b"\x00")
    return tail.endswith(marker)
