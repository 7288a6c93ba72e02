"""A stored WebP as the shard check sees it: its size read from the RIFF header in microseconds, and
the check of its size and decode that release/verify.py applies to every `<key>.webp`
(image/jpeg_output.py does the same for `<key>.jpg`)."""

from __future__ import annotations

import io


def riff_webp_size(webp: bytes) -> tuple[int, int] | None:
    """(width, height) of a still WebP read from its RIFF container, whose chunks must tile the
    file exactly (a truncated or padded file does not) and hold one VP8 or VP8L bitstream; None
    when the bytes are not laid out that way (then Pillow's reader judges them). Pillow opens a
    WebP through libwebp's demuxer: 0.17 ms an image, twice per image in a shard run (after the
    encode, in the read-back), where this takes microseconds."""
    n = len(webp)
    if n < 30 or webp[:4] != b"RIFF" or webp[8:12] != b"WEBP" or int.from_bytes(webp[4:8], "little") + 8 != n:
        return None
    pos, canvas, frame = 12, None, None
    while pos < n:
        if pos + 8 > n:
            return None
        fourcc, length = webp[pos:pos + 4], int.from_bytes(webp[pos + 4:pos + 8], "little")
        body = pos + 8
        if body + length > n or (pos == 12 and fourcc not in (b"VP8X", b"VP8 ", b"VP8L")):
            return None
        if fourcc == b"VP8X" and pos == 12 and length >= 10:
            if webp[body] & 0x02:  # animation: not what the encoder writes
                return None
            canvas = (1 + int.from_bytes(webp[body + 4:body + 7], "little"),
                      1 + int.from_bytes(webp[body + 7:body + 10], "little"))
        elif fourcc == b"VP8 " and frame is None and length >= 10 and webp[body + 3:body + 6] == b"\x9d\x01\x2a":
            frame = (int.from_bytes(webp[body + 6:body + 8], "little") & 0x3FFF,
                     int.from_bytes(webp[body + 8:body + 10], "little") & 0x3FFF)
        elif fourcc == b"VP8L" and frame is None and length >= 5 and webp[body] == 0x2F:
            bits = int.from_bytes(webp[body + 1:body + 5], "little")
            frame = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        elif fourcc in (b"VP8 ", b"VP8L", b"VP8X", b"ANIM", b"ANMF", b"ALPH"):
            return None  # a second bitstream, an animation, or a header this does not know
        pos = body + length + (length & 1)
    if pos != n or frame is None or (canvas is not None and canvas != frame):
        return None
    return frame


def webp_problem(webp: bytes, size: tuple[int, int], decode: bool) -> str:
    """Why WebP bytes are not a WebP of `size` ("" when they are): the header's format and size,
    and, when `decode`, a full decode of the pixels. The encode workers run it on what they just
    encoded, `check_sample` on what it reads back."""
    from PIL import Image

    if not decode and riff_webp_size(webp) == tuple(size):
        return ""  # anything else (another size, another layout) is worded by Pillow below
    try:
        with Image.open(io.BytesIO(webp)) as im:
            if im.format != "WEBP" or im.size != tuple(size):
                return f"webp header says {im.format} {im.size[0]}x{im.size[1]}"
            if decode:
                im.load()
    except Exception as e:  # noqa: BLE001 - any decoder error is this sample's problem
        return f"webp does not decode: {type(e).__name__}: {e}"
    return ""
