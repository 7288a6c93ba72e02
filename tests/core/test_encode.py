from __future__ import annotations

import io
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from imnet_assets.core.encode import (
    MAX_FULL_DECODE_PIXELS,
    RESAMPLE,
    Encoded,
    EncodeSettings,
    ImageRejected,
    _to_rgb_resized,
    bare_chain,
    encode_image,
    filter_exif,
    open_image,
    target_size,
)

S = EncodeSettings()
REPO = Path(__file__).resolve().parents[2]


def reference(data: bytes, max_short: int = 768) -> Image.Image:
    """The naive reference: full decode, convert("RGB"), default resize."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    target = target_size(*img.size, max_short)
    return img.resize(target) if target != img.size else img


def webp_chunks(webp: bytes) -> list[bytes]:
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP"
    pos, kinds = 12, []
    while pos + 8 <= len(webp):
        kind = webp[pos : pos + 4]
        size = int.from_bytes(webp[pos + 4 : pos + 8], "little")
        kinds.append(kind)
        pos += 8 + size + (size & 1)
    return kinds


# ---------------------------------------------------------------------------------------------- sizing


@pytest.mark.parametrize(
    "size,expected",
    [
        ((768, 768), (768, 768)),
        ((768, 5000), (768, 5000)),  # short side exactly 768: unchanged
        ((500, 375), (500, 375)),
        ((31, 5000), (31, 5000)),
        ((800, 600), (800, 600)),
        ((1024, 800), (983, 768)),  # 1024*768/800 = 983.04
        ((800, 1024), (768, 983)),
        ((1600, 1200), (1024, 768)),
        ((1000, 1000), (768, 768)),
        ((769, 1000), (768, 999)),  # 998.7 -> 999
        ((3000, 1001), (2302, 768)),  # 2301.698 -> 2302
        ((1537, 1536), (768, 768)),  # 768.5 -> 768: Python round(), as SPEC writes it
        ((14000, 14000), (768, 768)),
    ],
)
def test_target_size(size, expected):
    assert target_size(*size) == expected
    assert target_size(*size, 768) == expected


def test_target_size_other_max_short():
    assert target_size(800, 600, 512) == (683, 512)
    assert target_size(600, 800, 600) == (600, 800)


def test_settings_validated():
    with pytest.raises(ValueError):
        EncodeSettings(quality=101)
    with pytest.raises(ValueError):
        EncodeSettings(method=7)


# --------------------------------------------------------------------------------- large JPEG + draft


def test_large_jpeg_downsized_close_to_reference(imgs):
    data = imgs.to_bytes(imgs.smooth_rgb(2000, 1500), "JPEG", quality=92)
    enc = encode_image(data, S)
    assert (enc.width, enc.height) == (1024, 768)
    assert (enc.orig_width, enc.orig_height) == (2000, 1500)
    assert enc.repaired is False
    out = imgs.decode(enc.webp)
    assert out.format == "WEBP" and out.mode == "RGB" and out.size == (1024, 768)
    assert imgs.mean_abs_diff(out, reference(data)) < 6


def test_draft_is_used_for_jpeg(imgs, monkeypatch):
    # draft must be asked for the target size so libjpeg decodes at reduced scale
    calls = []
    orig = Image.Image.resize

    def spy(self, size, *a, **kw):
        calls.append((self.size, size, kw.get("box")))
        return orig(self, size, *a, **kw)

    monkeypatch.setattr(Image.Image, "resize", spy)
    data = imgs.to_bytes(imgs.smooth_rgb(3200, 2400), "JPEG", quality=80)
    enc = encode_image(data, S)
    assert (enc.width, enc.height) == (1024, 768)
    (decoded, target, box) = calls[-1]
    assert decoded == (1600, 1200)  # 1/2 DCT scale: >= target, < 2x target
    assert target == (1024, 768)
    assert box == (0, 0, 1600.0, 1200.0)


def test_short_side_exactly_768_for_odd_sizes(imgs):
    data = imgs.to_bytes(imgs.smooth_rgb(1001, 2999), "JPEG", quality=80)
    enc = encode_image(data, S)
    assert (enc.width, enc.height) == (768, round(2999 * 768 / 1001))
    assert imgs.decode(enc.webp).size == (enc.width, enc.height)


def test_small_image_not_resized(imgs):
    src = imgs.smooth_rgb(500, 375)
    data = imgs.to_bytes(src, "JPEG", quality=95)
    enc = encode_image(data, S)
    assert (enc.width, enc.height, enc.orig_width, enc.orig_height) == (500, 375, 500, 375)
    assert imgs.mean_abs_diff(imgs.decode(enc.webp), reference(data)) < 4


def test_non_jpeg_large_resized(imgs):
    data = imgs.to_bytes(imgs.smooth_rgb(1200, 900), "PNG")
    enc = encode_image(data, S)
    assert (enc.width, enc.height) == (1024, 768)
    assert imgs.mean_abs_diff(imgs.decode(enc.webp), reference(data)) < 4


# ---------------------------------------------------------------------------------------------- colour


def test_cmyk_jpeg(imgs):
    rgb = imgs.smooth_rgb(300, 200)
    cmyk = Image.merge("CMYK", [*rgb.split(), rgb.convert("L").point(lambda v: v // 3)])
    data = imgs.to_bytes(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    enc = encode_image(data, S)
    out = imgs.decode(enc.webp)
    assert out.mode == "RGB" and out.size == (300, 200)
    assert imgs.mean_abs_diff(out, reference(data)) < 6


def test_large_cmyk_jpeg_downsized(imgs):
    rgb = imgs.smooth_rgb(1600, 1000)
    data = imgs.to_bytes(rgb.convert("CMYK"), "JPEG", quality=90)
    enc = encode_image(data, S)
    assert (enc.width, enc.height) == (1229, 768)
    assert imgs.mean_abs_diff(imgs.decode(enc.webp), reference(data)) < 6


def test_greyscale_l(imgs):
    data = imgs.to_bytes(imgs.smooth_rgb(300, 200).convert("L"), "JPEG", quality=95)
    out = imgs.decode(encode_image(data, S).webp)
    assert out.mode == "RGB"
    arr = np.asarray(out, dtype=np.int16)
    assert np.abs(arr[..., 0] - arr[..., 1]).mean() < 2 and np.abs(arr[..., 1] - arr[..., 2]).mean() < 2
    assert imgs.mean_abs_diff(out, reference(data)) < 4


def test_grey_resize_first_is_bit_identical(imgs):
    # the encoder resizes single-channel images before expanding to RGB; same pixels as the naive chain
    grey = imgs.smooth_rgb(1000, 900).convert("L")
    target = target_size(*grey.size)
    fast = _to_rgb_resized(grey.copy(), target, None)
    naive = grey.convert("RGB").resize(target, RESAMPLE)
    assert fast.mode == "RGB"
    assert fast.tobytes() == naive.tobytes()
    one = grey.convert("1")
    assert (
        _to_rgb_resized(one.copy(), target, None).tobytes()
        == one.convert("RGB").resize(target, RESAMPLE).tobytes()
    )
    la = Image.merge("LA", [grey, grey.point(lambda v: 255 - v)])
    assert (
        _to_rgb_resized(la.copy(), target, None).tobytes()
        == la.convert("RGB").resize(target, RESAMPLE).tobytes()
    )


def test_palette_with_transparency_png_and_gif(imgs):
    p = imgs.palette(imgs.smooth_rgb(120, 80))
    png = imgs.to_bytes(p, "PNG", transparency=bytes([0] * 10 + [128] * 246))  # tRNS bytes
    gif = imgs.to_bytes(p, "GIF", transparency=3)
    for data in (png, gif):
        src = Image.open(io.BytesIO(data))
        assert src.mode == "P" and "transparency" in src.info
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no Pillow palette-transparency warning either
            enc = encode_image(data, S)
        out = imgs.decode(enc.webp)
        assert out.mode == "RGB" and out.size == (120, 80)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = reference(data)
        assert imgs.mean_abs_diff(out, ref) < 6


def test_rgba_png_drops_alpha_without_compositing(imgs):
    rgb = imgs.smooth_rgb(200, 150)
    alpha = Image.linear_gradient("L").resize((200, 150))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    data = imgs.to_bytes(rgba, "PNG")
    out = imgs.decode(encode_image(data, S).webp)
    assert out.mode == "RGB"  # no alpha in the WebP
    assert imgs.mean_abs_diff(out, rgb) < 4  # colour channels as stored, even where alpha is 0
    webp = encode_image(data, S).webp
    assert b"ALPH" not in webp_chunks(webp)


def test_rgba_large_resized_without_premultiplication(imgs):
    rgb = imgs.smooth_rgb(1000, 800)
    rgba = rgb.copy()
    rgba.putalpha(0)  # fully transparent: premultiplied resizing would make it black
    data = imgs.to_bytes(rgba, "PNG", compress_level=1)
    out = imgs.decode(encode_image(data, S).webp)
    assert out.size == (960, 768)
    assert imgs.mean_abs_diff(out, rgb.resize((960, 768))) < 4


def test_one_bit(imgs):
    bw = imgs.smooth_rgb(160, 120).convert("1")
    data = imgs.to_bytes(bw, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "1"
    out = imgs.decode(encode_image(data, S).webp)
    assert imgs.mean_abs_diff(out, bw.convert("RGB")) < 25  # lossy WebP of hard black/white dither
    assert abs(np.asarray(out).mean() - np.asarray(bw.convert("RGB")).mean()) < 3


def test_i16_png_scaled_to_8_bit(imgs):
    grey = imgs.smooth_rgb(256, 64).convert("L")
    i16 = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)  # 16-bit data: v*257
    data = imgs.to_bytes(i16, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = imgs.decode(encode_image(data, S).webp)
    # v*257 / 257 = v: the 8-bit original, not the all-white plain convert("RGB") gives
    assert imgs.mean_abs_diff(out, grey.convert("RGB")) < 3
    assert np.asarray(out).mean() < 200


def test_i16_big_endian_tiff(imgs):
    grey = imgs.smooth_rgb(64, 48).convert("L")
    i16b = Image.frombytes("I;16B", grey.size, (np.asarray(grey).astype(">u2") * 257).tobytes())
    data = imgs.to_bytes(i16b, "TIFF")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = imgs.decode(encode_image(data, S).webp)
    assert imgs.mean_abs_diff(out, grey.convert("RGB")) < 3


@pytest.mark.parametrize("mode", ["I", "F"])
def test_exotic_modes_never_crash(imgs, mode):
    grey = imgs.smooth_rgb(64, 64).convert("L")
    img = grey.convert(mode)
    if mode == "F":
        img = img.point(lambda v: v / 255)  # float in [0, 1]
    data = imgs.to_bytes(img, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    out = imgs.decode(encode_image(data, S).webp)
    assert imgs.mean_abs_diff(out, grey.convert("RGB")) < 4


def test_png_and_gif_bytes(imgs):
    src = imgs.smooth_rgb(200, 150)
    for fmt, img in (("PNG", src), ("GIF", imgs.palette(src)), ("BMP", src), ("WEBP", src), ("TIFF", src)):
        data = imgs.to_bytes(img, fmt)
        enc = encode_image(data, S)
        out = imgs.decode(enc.webp)
        assert out.size == (200, 150) and out.mode == "RGB", fmt
        assert imgs.mean_abs_diff(out, reference(data)) < 6, fmt


def test_multiframe_gif_uses_first_frame(imgs):
    red = Image.new("RGB", (64, 64), (255, 0, 0)).convert("P")
    blue = Image.new("RGB", (64, 64), (0, 0, 255)).convert("P")
    data = imgs.to_bytes(red, "GIF", save_all=True, append_images=[blue], duration=100)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    r, g, b = np.asarray(imgs.decode(encode_image(data, S).webp)).reshape(-1, 3).mean(0)
    assert r > 240 and g < 15 and b < 15


# -------------------------------------------------------------------------------------------- metadata


def _exif_source(imgs, size=(300, 200), endian="<"):
    ex = Image.Exif()
    ex.endian = endian
    ex[0x0112] = 6  # Orientation: rotate 90 CW to display
    ex[0x010F] = "Canon"  # Make
    ex[0x0213] = 1  # YCbCrPositioning
    ex[0x013E] = (0.3127, 0.329)  # WhitePoint
    ex[0x8825] = {1: "N", 2: (52.0, 31.0, 12.5)}  # GPS
    ex[0x8769] = {
        0xA001: 1,  # ColorSpace sRGB
        0x9003: "2020:01:01 00:00:00",
        0xA005: {1: "R98", 2: b"0100"},  # Interop: index kept, version dropped
    }
    src = imgs.smooth_rgb(*size)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    return src, imgs.to_bytes(src, "JPEG", quality=95, exif=ex.tobytes(), xmp=xmp)


@pytest.mark.parametrize("endian", ["<", ">"])
def test_exif_filtered(imgs, endian):
    src, data = _exif_source(imgs, endian=endian)
    assert b"x:xmpmeta" in data and b"Canon" in data
    enc = encode_image(data, S)
    out = imgs.decode(enc.webp)
    # pixels not rotated: stored orientation and size
    assert out.size == (300, 200) == (enc.width, enc.height)
    assert imgs.mean_abs_diff(out, src) < 5
    exif = out.getexif()
    assert exif.get(0x0112) is None  # Orientation dropped
    assert exif.get(0x010F) is None  # Make dropped
    assert exif.get(0x8825) is None and exif.get_ifd(0x8825) == {}  # no GPS IFD
    assert exif[0x0213] == 1
    assert exif[0x013E] == (0.3127, 0.329)
    assert exif.get_ifd(0x8769) == {0xA001: 1, 0xA005: exif.get_ifd(0x8769)[0xA005]}
    assert exif.get_ifd(0xA005) == {1: "R98"}
    assert b"EXIF" in webp_chunks(enc.webp)
    assert exif.endian == endian  # byte order of the source kept


def test_xmp_and_iptc_removed(imgs):
    _, data = _exif_source(imgs)
    # add an IPTC (Photoshop APP13) segment after SOI
    iptc = b"Photoshop 3.0\x008BIM\x04\x04\x00\x00\x00\x00\x00\x0c\x1c\x02\x05\x00\x07caption"
    data = data[:2] + b"\xff\xed" + (len(iptc) + 2).to_bytes(2, "big") + iptc + data[2:]
    assert Image.open(io.BytesIO(data)).info.get("photoshop")
    webp = encode_image(data, S).webp
    assert b"XMP " not in webp_chunks(webp)
    for needle in (b"x:xmpmeta", b"xmpmeta", b"8BIM", b"Photoshop", b"caption", b"Canon"):
        assert needle not in webp


def test_no_kept_exif_means_no_exif_chunk(imgs):
    ex = Image.Exif()
    ex[0x0112] = 3
    ex[0x010F] = "Nikon"
    ex[0x8825] = {1: "S"}
    data = imgs.to_bytes(imgs.smooth_rgb(100, 80), "JPEG", exif=ex.tobytes())
    webp = encode_image(data, S).webp
    assert webp_chunks(webp) == [b"VP8 "]  # simple lossy WebP: no EXIF/ICCP/XMP, no alpha
    assert "exif" not in imgs.decode(webp).info


def test_filter_exif_robust():
    assert filter_exif(None) is None
    assert filter_exif(b"") is None
    assert filter_exif(b"Exif\x00\x00garbage") is None
    assert filter_exif(b"II*\x00\xff\xff\xff\xff") is None  # IFD0 offset past the end
    # an IFD claiming 65535 entries in a few bytes
    assert filter_exif(b"II*\x00\x08\x00\x00\x00\xff\xff" + b"\x00" * 20) is None
    rng = np.random.default_rng(3)
    for _ in range(200):
        blob = b"II*\x00\x08\x00\x00\x00" + rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
        result = filter_exif(blob)
        assert result is None or result[:4] == b"II*\x00"


def test_rgb_icc_profile_carried_byte_for_byte(imgs):
    icc = imgs.srgb_icc()
    assert icc[16:20] == b"RGB "
    for fmt in ("JPEG", "PNG"):
        data = imgs.to_bytes(imgs.smooth_rgb(120, 90), fmt, icc_profile=icc)
        webp = encode_image(data, S).webp
        assert imgs.decode(webp).info.get("icc_profile") == icc, fmt
        assert b"ICCP" in webp_chunks(webp)


def test_cmyk_and_grey_icc_profiles_dropped(imgs):
    cmyk_icc = imgs.icc_with_colour_space(b"CMYK")
    data = imgs.to_bytes(imgs.smooth_rgb(120, 90).convert("CMYK"), "JPEG", icc_profile=cmyk_icc)
    assert Image.open(io.BytesIO(data)).info["icc_profile"] == cmyk_icc
    webp = encode_image(data, S).webp
    assert "icc_profile" not in imgs.decode(webp).info and b"ICCP" not in webp_chunks(webp)

    grey_icc = imgs.icc_with_colour_space(b"GRAY")
    data = imgs.to_bytes(imgs.smooth_rgb(120, 90).convert("L"), "JPEG", icc_profile=grey_icc)
    webp = encode_image(data, S).webp
    assert "icc_profile" not in imgs.decode(webp).info


# ------------------------------------------------------------------------------------- bad / truncated


def test_truncated_jpeg_repaired(imgs):
    src = imgs.smooth_rgb(400, 300)
    data = imgs.to_bytes(src, "JPEG", quality=90)
    cut = data[: len(data) * 6 // 10]
    with pytest.raises(OSError):  # really truncated for a plain Pillow load
        Image.open(io.BytesIO(cut)).load()
    enc = encode_image(cut, S)
    assert enc.repaired is True
    assert (enc.width, enc.height, enc.orig_width, enc.orig_height) == (400, 300, 400, 300)
    out = imgs.decode(enc.webp)
    # the part before the cut is decoded: the top rows match the source
    top = (0, 0, 400, 100)
    assert imgs.mean_abs_diff(out.crop(top), src.crop(top)) < 5
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # flag restored
    assert encode_image(data, S).repaired is False


def test_truncated_large_jpeg_repaired_and_resized(imgs):
    data = imgs.to_bytes(imgs.smooth_rgb(1600, 1200), "JPEG", quality=85)
    enc = encode_image(data[: len(data) // 2], S)
    assert enc.repaired and (enc.width, enc.height) == (1024, 768)
    assert imgs.decode(enc.webp).size == (1024, 768)


def test_truncated_png_and_gif_repaired(imgs):
    src = imgs.smooth_rgb(300, 200)
    png = imgs.to_bytes(src, "PNG")
    gif = imgs.to_bytes(src.convert("P"), "GIF")
    for data in (png[: len(png) * 2 // 3], gif[: len(gif) * 2 // 3]):
        enc = encode_image(data, S)
        assert enc.repaired and (enc.width, enc.height) == (300, 200)
    # a missing PNG IEND or GIF trailer alone decodes fine: nothing to repair
    assert encode_image(png[:-12], S).repaired is False
    assert encode_image(gif[:-1], S).repaired is False


def _jpeg_header_only(imgs) -> bytes:
    data = imgs.to_bytes(imgs.smooth_rgb(200, 100), "JPEG")
    sos = data.index(b"\xff\xda")
    return data[: sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")]


def test_valid_header_without_decodable_data_rejected(imgs):
    # JPEG header (through SOS) with no scan data at all
    with pytest.raises(ImageRejected, match="undecodable"):
        encode_image(_jpeg_header_only(imgs), S)
    # PNG with a valid IHDR and an IDAT that is not zlib data
    png = imgs.png_header(100, 100) + imgs.png_chunk(b"IDAT", b"garbage!" * 50) + imgs.png_chunk(b"IEND", b"")
    with pytest.raises(ImageRejected, match="undecodable"):
        encode_image(png, S)
    # PNG with no IDAT
    png = imgs.png_header(100, 100) + imgs.png_chunk(b"IEND", b"")
    with pytest.raises(ImageRejected):
        encode_image(png, S)


def test_truncated_progressive_jpeg_repaired(imgs):
    # a progressive JPEG cut after its first scans still yields the coarse image
    src = imgs.smooth_rgb(300, 200)
    data = imgs.to_bytes(src, "JPEG", progressive=True)
    enc = encode_image(data[: len(data) // 3], S)
    assert enc.repaired and (enc.width, enc.height) == (300, 200)
    assert imgs.mean_abs_diff(imgs.decode(enc.webp), src) < 8


def test_jpeg_cut_inside_header_rejected(imgs):
    data = imgs.to_bytes(imgs.smooth_rgb(300, 200), "JPEG", quality=90)
    with pytest.raises(ImageRejected, match="unreadable header|not an image"):
        encode_image(data[:100], S)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"not an image at all" * 20, "not an image: cannot identify image file"),
    ],
)
def test_non_images_rejected(data, reason):
    with pytest.raises(ImageRejected) as exc:
        encode_image(data, S)
    assert exc.value.reason == reason


def test_too_small_rejected(imgs):
    with pytest.raises(ImageRejected) as exc:
        encode_image(imgs.to_bytes(Image.new("RGB", (20, 300)), "PNG"), S)
    assert exc.value.reason == "too small: 20x300 (min side 32)"


def test_random_and_mangled_bytes_only_raise_image_rejected(imgs):
    rng = np.random.default_rng(4)
    good = imgs.to_bytes(imgs.smooth_rgb(48, 40), "JPEG")
    png = imgs.to_bytes(imgs.smooth_rgb(48, 40), "PNG")
    samples = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1, 10, 100, 3000)]
    samples += [good[:cut] for cut in range(0, len(good), 97)]
    samples += [png[:cut] for cut in range(0, len(png), 211)]
    for _ in range(60):
        b = bytearray(good if rng.random() < 0.5 else png)
        for _ in range(3):
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        samples.append(bytes(b))
    for data in samples:
        try:
            enc = encode_image(data, S)
        except ImageRejected as e:
            assert e.reason
        else:
            assert imgs.decode(enc.webp).size == (enc.width, enc.height)


# -------------------------------------------------------------------------------------------- huge


def test_huge_jpeg_decoded_via_draft(huge_jpeg, imgs):
    saved = Image.MAX_IMAGE_PIXELS
    enc = encode_image(huge_jpeg, S)
    assert (enc.width, enc.height, enc.orig_width, enc.orig_height) == (768, 768, 14000, 14000)
    out = np.asarray(imgs.decode(enc.webp), dtype=np.int16)
    assert np.abs(out - 128).max() <= 2  # the flat grey the JPEG holds
    assert Image.MAX_IMAGE_PIXELS == saved  # global limit untouched
    assert imgs.decode(bare_chain(huge_jpeg, S)).size == (768, 768)


def test_huge_jpeg_memory_bounded(huge_jpeg, tmp_path):
    # measured in a fresh process: full decode would need >= 196 MB (L) + 588 MB (RGB)
    path = tmp_path / "huge.jpg"
    path.write_bytes(huge_jpeg)
    # VmHWM (peak RSS of this process image); ru_maxrss would carry over pytest's peak through exec
    code = (
        "import re, sys\n"
        "from imnet_assets.core.encode import encode_image, EncodeSettings\n"
        "e = encode_image(open(sys.argv[1], 'rb').read(), EncodeSettings())\n"
        "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
        "print(e.width, e.height, hwm)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True, cwd=REPO
    )
    w, h, maxrss_kib = map(int, res.stdout.split())
    assert (w, h) == (768, 768)
    assert maxrss_kib < 250 * 1024, f"peak RSS {maxrss_kib / 1024:.0f} MiB"


def test_huge_non_draftable_rejected_without_decoding(imgs):
    data = imgs.png_header(14000, 14000) + imgs.png_chunk(b"IDAT", b"x") + imgs.png_chunk(b"IEND", b"")
    with pytest.raises(ImageRejected) as exc:
        encode_image(data, S)
    assert exc.value.reason.startswith("too large to decode: 14000x14000 PNG")
    assert MAX_FULL_DECODE_PIXELS < 14000 * 14000


def test_panorama_beyond_webp_limit_rejected(imgs):
    # short side <= 768 so no resize, but WebP cannot hold a 20000 px side
    data = imgs.to_bytes(Image.new("L", (20000, 40), 90), "PNG")
    with pytest.raises(ImageRejected, match="too large for WebP: 20000x40 PNG"):
        encode_image(data, S)


def test_open_image_has_no_bomb_check_but_image_open_still_does(huge_jpeg):
    img = open_image(huge_jpeg)
    assert img.size == (14000, 14000) and img.format == "JPEG"
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(huge_jpeg))


# ----------------------------------------------------------------------------- determinism, bare chain


def test_deterministic(imgs):
    _, data = _exif_source(imgs, size=(1000, 900))
    a = encode_image(data, S)
    b = encode_image(data, S)
    assert a == b and a.webp == b.webp
    assert bare_chain(data, S) == bare_chain(data, S)


def test_settings_change_output(imgs):
    data = imgs.to_bytes(imgs.smooth_rgb(300, 200), "JPEG")
    low = encode_image(data, EncodeSettings(quality=50)).webp
    high = encode_image(data, EncodeSettings(quality=95)).webp
    assert len(low) < len(high)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: m.to_bytes(m.smooth_rgb(2000, 1500), "JPEG", quality=90),
        lambda m: m.to_bytes(m.smooth_rgb(700, 1700).convert("CMYK"), "JPEG"),
        lambda m: m.to_bytes(m.smooth_rgb(900, 800).convert("L"), "PNG"),
        lambda m: m.to_bytes(m.smooth_rgb(300, 200).convert("P"), "GIF"),
    ],
)
def test_bare_chain_same_size_and_pixels(imgs, make):
    data = make(imgs)
    enc = encode_image(data, S)
    bare = imgs.decode(bare_chain(data, S))
    out = imgs.decode(enc.webp)
    assert bare.size == out.size == (enc.width, enc.height)
    assert imgs.mean_abs_diff(bare, out) < 1  # same chain: identical up to nothing at all, here


def test_picklable_for_worker_processes(imgs):
    data = imgs.to_bytes(imgs.smooth_rgb(64, 64), "PNG")
    enc = encode_image(data, S)
    assert pickle.loads(pickle.dumps(enc)) == enc
    assert isinstance(enc, Encoded)
    err = pickle.loads(pickle.dumps(ImageRejected("too small: 1x1 (min side 32)")))
    assert isinstance(err, ImageRejected) and err.reason == "too small: 1x1 (min side 32)"
    assert pickle.loads(pickle.dumps(S)) == S
    assert pickle.loads(pickle.dumps(encode_image)) is encode_image
