"""What a raw file's bytes say without any decoder: which of Pillow's plugins take them (their
signature checks, `pillow_plugins` and `takes`), and whether they end as their format ends."""

from __future__ import annotations

from PIL import Image

_plugins_loaded = False


def pillow_plugins() -> list[tuple[str, object, object]]:
    """(format, factory, signature check or None) of every Pillow plugin, in the order Image.open
    tries them, registered as it registers them (the common plugins first)."""
    global _plugins_loaded
    if not _plugins_loaded:
        Image.preinit()  # the common plugins first, like Image.open
        Image.init()
        _plugins_loaded = True
    return [(fmt, *Image.OPEN[fmt]) for fmt in tuple(Image.ID)]


def takes(accept, prefix: bytes) -> bool:
    """Whether a plugin's signature check takes bytes starting with ``prefix`` (their first 16): a
    check that answers with a string (Pillow's "not mine, but here is why") says no. One that raises
    propagates (decode.open_image lets it, as Image.open does; the guard's controls take it as no)."""
    accepted = accept(prefix)
    return bool(accepted) and not isinstance(accepted, str)

_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


# The formats whose end `looks_truncated` knows; a file of another (TIFF, BMP, WebP, ...) cut short
# shows it only when decoded.
END_MARKED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF"})


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
