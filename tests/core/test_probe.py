from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageFile

from imnet_assets.image import probe as probe_mod
from imnet_assets.image.decode import MAX_FULL_DECODE_PIXELS, MIN_SIDE, ImageRejected, open_image, plan_decode
from imnet_assets.image.probe import Probe, looks_truncated, probe_image


def test_constants_shared_with_encode():
    assert probe_mod.MIN_SIDE == MIN_SIDE == 32
    assert probe_mod.MAX_FULL_DECODE_PIXELS == MAX_FULL_DECODE_PIXELS


@pytest.mark.parametrize(
    "fmt,mode,save_mode,kw",
    [
        ("JPEG", "RGB", "RGB", {"quality": 85}),
        ("JPEG", "L", "L", {}),
        ("JPEG", "CMYK", "CMYK", {}),
        ("PNG", "RGBA", "RGBA", {}),
        ("PNG", "P", "P", {}),
        ("PNG", "I;16", "I;16", {}),
        ("GIF", "P", "P", {}),
        ("BMP", "RGB", "RGB", {}),
        ("WEBP", "RGB", "RGB", {}),
    ],
)
def test_header_fields(imgs, fmt, mode, save_mode, kw):
    src = imgs.smooth_rgb(123, 77)
    if save_mode == "I;16":
        src = src.convert("L").point(lambda v: v * 256).convert("I;16")
    elif save_mode != "RGB":
        src = src.convert(save_mode)
    p = probe_image(imgs.to_bytes(src, fmt, **kw))
    assert p == Probe(123, 77, fmt, mode, "kept", None, False)
    assert p.kept


def test_format_comes_from_bytes_not_name(imgs):
    # ImageNet has PNG and GIF bytes named .JPEG; the probe only sees bytes
    png = imgs.to_bytes(imgs.smooth_rgb(64, 48), "PNG")
    gif = imgs.to_bytes(imgs.smooth_rgb(64, 48).convert("P"), "GIF")
    assert probe_image(png).format == "PNG"
    assert probe_image(gif).format == "GIF"


@pytest.mark.parametrize("size", [(20, 300), (300, 31), (31, 31), (1, 1)])
def test_too_small_excluded(imgs, size):
    p = probe_image(imgs.to_bytes(Image.new("RGB", size, "red"), "PNG"))
    assert p.status == "excluded"
    assert p.reason == f"too small: {size[0]}x{size[1]} (min side 32)"
    assert (p.width, p.height) == size
    assert p.format == "PNG" and not p.needs_repair


def test_min_side_boundary_kept(imgs):
    p = probe_image(imgs.to_bytes(Image.new("RGB", (32, 1000), "red"), "JPEG"))
    assert p.status == "kept" and p.reason is None


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (
            b"this is definitely not an image, just some text\n" * 10,
            "not an image: cannot identify image file",
        ),
        (b"\x00" * 1000, "not an image: cannot identify image file"),
        (b"<html><body>404 Not Found</body></html>", "not an image: cannot identify image file"),
    ],
)
def test_empty_and_garbage_excluded(data, reason):
    p = probe_image(data)
    assert p == Probe(None, None, None, None, "excluded", reason, False)


def test_random_bytes_never_raise():
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 16, 100, 5000):
        for _ in range(20):
            p = probe_image(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            assert p.status in ("kept", "excluded")
            if p.status == "excluded":
                assert p.reason


def test_mangled_headers_never_raise(imgs):
    # every prefix and some byte flips of real files: still a Probe, never an exception
    files = [
        imgs.to_bytes(imgs.smooth_rgb(40, 40), "JPEG"),
        imgs.to_bytes(imgs.smooth_rgb(40, 40), "PNG"),
        imgs.to_bytes(imgs.smooth_rgb(40, 40).convert("P"), "GIF"),
    ]
    rng = np.random.default_rng(2)
    for data in files:
        for cut in range(0, min(len(data), 400), 3):
            assert isinstance(probe_image(data[:cut]), Probe)
        for _ in range(50):
            b = bytearray(data)
            b[int(rng.integers(0, 60))] = int(rng.integers(0, 256))
            assert isinstance(probe_image(bytes(b)), Probe)


def test_truncated_jpeg_kept_and_flagged(imgs):
    data = imgs.to_bytes(imgs.smooth_rgb(400, 300), "JPEG", quality=90)
    p = probe_image(data[: len(data) * 6 // 10])
    assert p == Probe(400, 300, "JPEG", "RGB", "kept", None, True)
    assert not probe_image(data).needs_repair
    # zero padding after EOI is not truncation
    assert not probe_image(data + b"\x00" * 100).needs_repair
    # only the EOI marker missing
    assert probe_image(data[:-2]).needs_repair


def test_truncated_png_and_gif_flagged(imgs):
    png = imgs.to_bytes(imgs.smooth_rgb(200, 100), "PNG")
    gif = imgs.to_bytes(imgs.smooth_rgb(200, 100).convert("P"), "GIF")
    assert not probe_image(png).needs_repair
    assert probe_image(png[:-12]).needs_repair  # IEND chunk missing
    assert probe_image(png[: len(png) // 2]).needs_repair
    assert probe_image(png[: len(png) // 2]).status == "kept"
    assert not probe_image(gif).needs_repair
    assert probe_image(gif[:-1]).needs_repair  # trailer missing
    assert probe_image(gif[: len(gif) // 2]).needs_repair


def test_looks_truncated_unit():
    assert not looks_truncated(b"\xff\xd8...\xff\xd9", "JPEG")
    assert looks_truncated(b"\xff\xd8...", "MPO")
    assert not looks_truncated(b"\xff\xd8...\xff\xd9\x00\x00", "JPEG")
    assert not looks_truncated(b"anything", "BMP")


def test_huge_jpeg_probed_from_header(huge_jpeg):
    saved = Image.MAX_IMAGE_PIXELS
    p = probe_image(huge_jpeg)
    assert p == Probe(14000, 14000, "JPEG", "L", "kept", None, False)
    # the global decompression-bomb limit is untouched: plain Image.open still refuses it
    assert Image.MAX_IMAGE_PIXELS == saved
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(huge_jpeg))


def test_huge_non_draftable_excluded(imgs):
    # a PNG header claiming 14000x14000: cannot be decoded in bounded memory -> excluded, not decoded
    data = imgs.png_header(14000, 14000) + imgs.png_chunk(b"IDAT", b"x") + imgs.png_chunk(b"IEND", b"")
    p = probe_image(data)
    assert p.status == "excluded"
    assert p.reason.startswith("too large to decode: 14000x14000 PNG")
    assert (p.width, p.height, p.format) == (14000, 14000, "PNG")
    # just under the limit is kept (the probe never decodes)
    side = int(MAX_FULL_DECODE_PIXELS**0.5)
    ok = imgs.png_header(side, side) + imgs.png_chunk(b"IDAT", b"x") + imgs.png_chunk(b"IEND", b"")
    assert probe_image(ok).status == "kept"


def test_unsupported_mode_excluded_by_shared_rule():
    # "La" is the one mode Pillow cannot convert to RGB; no file format stores it, so check the rule
    # the probe shares with the encoder (plan_decode) directly
    img = Image.new("La", (64, 64))
    with pytest.raises(ImageRejected, match="unsupported mode La"):
        plan_decode(img)


def test_probe_does_not_touch_global_flags(imgs):
    data = imgs.to_bytes(imgs.smooth_rgb(100, 100), "JPEG")
    probe_image(data[:300])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_panorama_beyond_webp_limit_excluded(imgs):
    p = probe_image(imgs.to_bytes(Image.new("L", (20000, 40), 90), "PNG"))
    assert p.status == "excluded" and p.reason.startswith("too large for WebP: 20000x40 PNG")


def test_cut_header_reason(imgs):
    data = imgs.to_bytes(imgs.smooth_rgb(300, 200), "JPEG", quality=90, exif=Image.Exif().tobytes())
    p = probe_image(data[:100])
    assert p.status == "excluded" and p.reason.startswith(("unreadable header", "not an image"))


def _progressive(width: int, height: int, mode: str = "RGB", subsampling: int = 2, sampling=None) -> bytes:
    """A small progressive JPEG whose frame header claims ``width`` x ``height`` (and, optionally,
    other sampling factors: one byte per component, h << 4 | v)."""
    buf = io.BytesIO()
    Image.new(mode, (64, 48)).save(buf, "JPEG", progressive=True, subsampling=subsampling)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc2")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    for i, hv in enumerate(sampling or ()):
        data[sof + 11 + 3 * i] = hv
    return bytes(data)


@pytest.mark.parametrize(
    "args,excluded",
    [
        ((16000, 16000), True),  # Pillow decides (more pixels than the fast path answers for)
        ((65535, 65535), True),
        ((12001, 12000), True),
        ((12000, 12000), False),  # exactly the limit at 4:2:0
        ((9000, 9000, "RGB", 0), True),  # 4:4:4, answered by the JPEG marker walk
        ((8400, 8400, "RGB", 0), False),
        ((7000, 8000, "CMYK", 0), True),
        ((6000, 8000, "CMYK", 0), False),
        ((12000, 12000, "L"), False),
        ((9000, 9000, "RGB", 0, [0x11, 0x00, 0x11]), True),  # a sampling factor libjpeg refuses
        ((9000, 9000, "RGB", 0, [0x55, 0x11, 0x11]), False),
        ((9000, 9000, "RGB", 0, [0x22, 0x22, 0x22]), True),
        ((8000, 8000, "RGB", 0, [0x41, 0x14, 0x22]), False),
    ],
)
def test_progressive_too_large_excluded_by_shared_rule(args, excluded):
    data = _progressive(*args)
    p = probe_image(data)
    assert p == probe_image(data, fast=False) == probe_image(memoryview(data))  # the marker walk agrees
    assert (p.width, p.height, p.format) == (args[0], args[1], "JPEG")
    if args[0] * args[1] <= MAX_FULL_DECODE_PIXELS:
        assert probe_mod._probe_jpeg(data) is not None  # the walk answered
    assert p.kept is not excluded
    if excluded:
        with pytest.raises(ImageRejected) as exc:
            plan_decode(open_image(data))
        assert p.reason == exc.value.reason  # the encoder's own rule and reason
        assert p.reason.startswith(f"too large to decode: {args[0]}x{args[1]} progressive JPEG needs ~")
        assert p.reason.endswith(" GB of coefficient memory (max 0.43 GB)")


def test_baseline_jpeg_has_no_coefficient_limit(imgs):
    # A baseline JPEG is decoded a row of blocks at a time: the huge flat one stays kept.
    data = imgs.flat_grey_jpeg(16384, 12000)
    assert probe_image(data) == probe_image(data, fast=False)
    assert probe_image(data).kept


@pytest.mark.parametrize("first", ["PngImagePlugin", "WebPImagePlugin", "TiffImagePlugin", "BmpImagePlugin"])
def test_the_jpeg_header_read_survives_a_plugin_imported_before_pillows_own_order(first):
    """A module that imports one of Pillow's plugins before anything opens an image puts it ahead of
    JPEG in Pillow's order; a plugin that cannot take FF D8 FF there leaves the JPEG header read on
    (it is off, and Pillow reads every header, only when one that could take it comes first). In a
    fresh interpreter, as a test module or a user's script would import them."""
    import subprocess
    import sys

    code = (f"from PIL import {first}\n"
            "from imnet_assets.image import probe\n"
            "from PIL import Image\n"
            "assert probe._jpeg_is_first(), list(Image.ID)[:8]\n"
            "print(list(Image.ID).index('JPEG') > 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"  # the plugin did come first
