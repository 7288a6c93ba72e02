"""A stored JPEG (a release with `codec = "jpeg"`, issue 25) as the shard check sees it: its frame
read from the header in microseconds, and the check of its size, mode and decode that
`release/verify.py` applies to every `<key>.jpg`, as `webp_problem` does to every `<key>.webp`."""

from __future__ import annotations

import io


def jpeg_frame_size(jpeg: bytes) -> tuple[int, int] | None:
    """(width, height) of a 3-component JPEG from its frame header, when its marker segments up to
    the first scan walk cleanly and the file ends with EOI (a cut file does not); None otherwise
    (then Pillow's reader judges the bytes). Microseconds, against ~0.1 ms for Pillow's open."""
    n = len(jpeg)
    if n < 4 or jpeg[:2] != b"\xff\xd8" or jpeg[-2:] != b"\xff\xd9":
        return None
    pos, frame = 2, None
    while pos + 4 <= n:
        if jpeg[pos] != 0xFF:
            return None
        marker = jpeg[pos + 1]
        length = int.from_bytes(jpeg[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > n:
            return None
        if marker in (0xC0, 0xC1, 0xC2):  # baseline, extended, progressive Huffman frames
            body = jpeg[pos + 4:pos + 2 + length]
            if frame is not None or len(body) < 6 or body[5] != 3:
                return None
            frame = (int.from_bytes(body[3:5], "big"), int.from_bytes(body[1:3], "big"))
        elif marker == 0xDA:
            return frame
        elif not (0xE0 <= marker <= 0xEF or marker in (0xDB, 0xC4, 0xDD, 0xFE)):
            return None  # another frame type, or a marker the encoder does not write before its scan
        pos += 2 + length
    return None


def jpeg_problem(jpeg: bytes, size: tuple[int, int], decode: bool) -> str:
    """Why JPEG bytes are not an RGB JPEG of `size` ("" when they are): the frame header's size,
    and, when `decode`, a full decode of the pixels (libjpeg only warns about damaged entropy-coded
    data, so the bytes themselves are vouched for by their sha256, as a WebP's are)."""
    from PIL import Image

    if not decode and jpeg_frame_size(jpeg) == tuple(size):
        return ""
    try:
        with Image.open(io.BytesIO(jpeg)) as im:
            if im.format != "JPEG" or im.size != tuple(size) or im.mode != "RGB":
                return f"jpg header says {im.format} {im.mode} {im.size[0]}x{im.size[1]}"
            if decode:
                im.load()
    except Exception as e:  # noqa: BLE001 - any decoder error is this sample's problem
        return f"jpg does not decode: {type(e).__name__}: {e}"
    if jpeg_frame_size(jpeg) is None:
        return "jpg is not one complete frame (SOI, tables, one 3-component frame, scans, EOI)"
    return ""
