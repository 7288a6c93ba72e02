from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from imnet_assets.image.decode import (
    MAX_COEFFICIENT_BYTES,
    MAX_FULL_DECODE_PIXELS,
    ImageRejected,
    coefficient_bytes,
    open_image,
    plan_decode,
    target_size,
)
from imnet_assets.image.encode import (
    RESAMPLE,
    Encoded,
    EncodeSettings,
    _to_rgb_resized,
    bare_chain,
    encode_image,
)
from imnet_assets.image.exif import filter_exif
from imnet_assets.sample.photos import make_photo

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


def test_rgb_profile_on_cmyk_or_grey_source_dropped(imgs):
    # SPEC: "An RGB source's ICC profile is carried": a CMYK or grey file labelled with an RGB profile
    # is no RGB source; its pixels went through convert("RGB"), which the profile does not describe
    icc = imgs.srgb_icc()
    for mode in ("CMYK", "L"):
        data = imgs.to_bytes(imgs.smooth_rgb(120, 90).convert(mode), "JPEG", icc_profile=icc)
        assert Image.open(io.BytesIO(data)).info["icc_profile"] == icc
        webp = encode_image(data, S).webp
        assert "icc_profile" not in imgs.decode(webp).info and b"ICCP" not in webp_chunks(webp), mode
    # palette and alpha sources hold RGB values: theirs is carried
    for mode in ("P", "RGBA"):
        data = imgs.to_bytes(imgs.smooth_rgb(120, 90).convert(mode), "PNG", icc_profile=icc)
        assert imgs.decode(encode_image(data, S).webp).info.get("icc_profile") == icc, mode


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


def test_truncated_png_and_gif_under_5_percent_of_rows_rejected():
    # SPEC: a truncated image is repaired unless under 5% of its rows decode. A PNG's or GIF's
    # undecoded rows are zeros, like decoded black ones: only a JPEG's grey fill was counted before
    rng = np.random.default_rng(5)
    src = Image.fromarray(rng.integers(0, 256, (400, 96, 3), dtype=np.uint8))  # noise: bytes ~ rows
    out = io.BytesIO()
    src.save(out, "PNG")
    png = out.getvalue()
    out = io.BytesIO()
    src.convert("P").save(out, "GIF")  # Pillow interlaces GIFs: cut at half, every other row decoded
    gif = out.getvalue()
    for data in (png[: len(png) // 50], gif[: len(gif) // 40]):
        with pytest.raises(ImageRejected, match=r"ends early, only \d\.\d% of its rows decoded \(min 5%\)"):
            encode_image(data, S)
    for data in (png[: len(png) // 2], gif[: len(gif) // 2]):
        enc = encode_image(data, S)
        assert enc.repaired and (enc.width, enc.height) == (96, 400)
    # rows decoded black are decoded rows: black on top of noise, cut below the black, is repaired
    top = np.concatenate([np.zeros((200, 96, 3), np.uint8), rng.integers(0, 256, (200, 96, 3), dtype=np.uint8)])
    out = io.BytesIO()
    Image.fromarray(top).save(out, "PNG")
    data = out.getvalue()
    assert encode_image(data[: len(data) * 3 // 4], S).repaired


_PEAK = """
import sys
from imnet_assets.image.decode import decode
def hwm():  # this process's peak resident memory (ru_maxrss would hold its parent's too)
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
data = open(sys.argv[1], "rb").read()
base = hwm()
assert decode(data, 768)[4]
print(hwm() - base)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM")
def test_cut_short_png_rows_counted_in_bounded_memory(tmp_path):
    # _filled_rows decodes a cut-short image a second time; comparing the two as two whole copies of
    # their bytes more held ~6 decoded images at once (a worker's peak: the largest allowed is 144 Mpx)
    side = 4000
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    arr = np.stack([np.add.outer(ramp, ramp) % 256, np.add.outer(ramp * 3, ramp * 0) % 256,
                    np.add.outer(ramp * 0, ramp * 2) % 256], -1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "PNG", compress_level=1)
    path = tmp_path / "cut.png"
    path.write_bytes(out.getvalue()[: len(out.getvalue()) // 2])
    peak = int(subprocess.run([sys.executable, "-c", _PEAK, str(path)], check=True, capture_output=True,
                              text=True).stdout)
    assert peak < 4.5 * arr.nbytes, f"{peak / arr.nbytes:.1f} decoded images at once"


@pytest.mark.parametrize("transparent", [0, 0x5A])
def test_truncated_transparent_gif_under_5_percent_of_rows_rejected(transparent):
    # Pillow fills a GIF's first frame with its transparent index before decoding it (whatever memory
    # was there): the rows the data never reached were the same in both decodes, and counted decoded
    from imnet_assets.image.decode import trial_decode

    rng = np.random.default_rng(6)
    src = Image.fromarray(rng.integers(0, 256, (400, 96), dtype=np.uint8), "P")
    src.putpalette(list(range(256)) * 3)
    out = io.BytesIO()
    src.save(out, "GIF", transparency=transparent)
    gif = out.getvalue()
    assert Image.open(io.BytesIO(gif)).info["transparency"] == transparent
    with pytest.raises(ImageRejected, match=r"ends early, only \d\.\d% of its rows decoded \(min 5%\)"):
        encode_image(gif[: len(gif) // 40], S)
    assert "rows decoded" in trial_decode(gif[: len(gif) // 40])  # the index refuses it before the plan
    enc = encode_image(gif[: len(gif) // 2], S)
    assert enc.repaired and (enc.width, enc.height) == (96, 400)


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


def to_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo_jpeg(size=(640, 480), mode="RGB", seed=0, **kw) -> bytes:
    img = make_photo(*size, np.random.default_rng(seed))
    return to_bytes(img if mode == "RGB" else img.convert(mode), "JPEG", quality=90, **kw)


def _cut_with_eoi(data: bytes, fraction: float) -> bytes:
    """The first part of a JPEG's bytes, closed by an EOI marker as if the file were complete."""
    return data[: int(len(data) * fraction)] + b"\xff\xd9"


def _with_frame_size(data: bytes, width: int, height: int, sof: bytes = b"\xff\xc0") -> bytes:
    """The JPEG with its SOF header claiming another size (its scan data unchanged)."""
    at = data.index(sof)
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def _pillow_loads(data: bytes, max_short: int = 768) -> Image.Image:
    img = open_image(data)  # Image.open without its decompression-bomb check
    img.draft(img.mode, target_size(*img.size, max_short))
    img.load()  # no error: libjpeg only warns about the data that is missing
    return img


@pytest.mark.parametrize("max_short", [768, 240, 60])  # full size, 1/2 and 1/8 DCT scale
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_cut_short_but_ending_in_eoi_repaired(mode, max_short):
    settings = EncodeSettings(max_short=max_short)
    data = _photo_jpeg(mode=mode)
    cut = _cut_with_eoi(data, 0.5)
    decoded = _pillow_loads(cut, max_short)
    corner = decoded.getpixel((decoded.width - 1, decoded.height - 1))
    assert corner in (128, (128,) * 3, (127,) * 4)  # libjpeg's fill for the blocks it had no data for
    enc = encode_image(cut, settings)
    assert enc.repaired is True
    assert encode_image(data, settings).repaired is False
    if max_short == 768:
        out = np.asarray(Image.open(io.BytesIO(enc.webp)).convert("RGB"), dtype=np.int16)
        ref = np.asarray(reference(data), dtype=np.int16)
        assert np.abs(out[:150] - ref[:150]).mean() < 6  # the decoded top is kept as it is
        if mode != "CMYK":
            assert np.abs(out[-60:] - 128).max() <= 3  # the rest is libjpeg's grey


@pytest.mark.parametrize(
    "kw", [{"restart_marker_rows": 1}, {"restart_marker_blocks": 3}, {"optimize": True}, {"subsampling": 0}]
)
def test_jpeg_cut_short_but_ending_in_eoi_repaired_kinds(kw):
    data = _photo_jpeg(size=(641, 483), **kw)  # odd sizes: partial MCUs on the right and bottom
    for fraction in (0.1, 0.5, 0.9, 0.99):
        for max_short in (768, 240, 60):
            enc = encode_image(_cut_with_eoi(data, fraction), EncodeSettings(max_short=max_short))
            assert enc.repaired is True, (fraction, max_short)
    assert encode_image(data, S).repaired is False


def test_progressive_jpeg_cut_but_ending_in_eoi_repaired():
    # Scans that never started leave the image coarse rather than grey: the scan headers tell.
    data = _photo_jpeg(progressive=True)
    for fraction in (0.05, 0.2, 0.4):
        cut = _cut_with_eoi(data, fraction)
        _pillow_loads(cut)
        assert encode_image(cut, S).repaired is True, fraction
        assert encode_image(cut, EncodeSettings(max_short=60)).repaired is True, fraction
    assert encode_image(data, S).repaired is False


def test_header_claiming_far_more_than_the_data_rejected():
    # 30000x30000 claimed, 256x192 px of data: libjpeg decodes a 99.9% grey image without an error.
    small = _photo_jpeg(size=(256, 192))
    lying = _with_frame_size(small, 30000, 30000)
    assert _pillow_loads(lying).size == (3750, 3750)  # 1/8 scale, no error
    with pytest.raises(ImageRejected) as exc:
        encode_image(lying, S)
    assert exc.value.reason == "undecodable: image data ends early, only the top 0.1% decoded (min 5%)"
    # the same for a progressive JPEG (file too small for its DC scan; or grey filler detected)
    small = _photo_jpeg(size=(64, 48), progressive=True)
    for size in ((3000, 2000), (640, 480)):
        with pytest.raises(ImageRejected, match=r"^undecodable: image data ends early, only the top"):
            encode_image(_with_frame_size(small, *size, sof=b"\xff\xc2"), S)
    # a meaningful part decoded: kept, repaired
    assert encode_image(_with_frame_size(small, 128, 96, sof=b"\xff\xc2"), S).repaired is True


def test_jpeg_with_almost_nothing_decoded_rejected_without_eoi_too():
    data = _photo_jpeg()
    with pytest.raises(ImageRejected, match=r"^undecodable: image data ends early, only the top [0-4]\.\d% "):
        encode_image(data[: len(data) // 50], S)
    assert encode_image(data[: len(data) // 10], S).repaired is True


def test_complete_grey_jpegs_not_marked_repaired(imgs):
    # Grey that the data really encodes is not mistaken for libjpeg's fill: the confirming decode
    # (with the data after the last scan replaced) gives the same pixels.
    for data in (
        imgs.flat_grey_jpeg(1024, 768),
        to_bytes(Image.new("RGB", (640, 480), (128, 128, 128)), "JPEG"),
        to_bytes(Image.new("CMYK", (640, 480), (127, 127, 127, 127)), "JPEG"),
        to_bytes(Image.new("RGB", (640, 480), (128, 128, 128)), "JPEG", progressive=True),
    ):
        for max_short in (768, 240, 60):
            assert encode_image(data, EncodeSettings(max_short=max_short)).repaired is False
    photo = make_photo(640, 480, np.random.default_rng(3))
    photo.paste((128, 128, 128), (560, 400, 640, 480))
    for kw in ({}, {"progressive": True}, {"restart_marker_rows": 1}):
        data = to_bytes(photo, "JPEG", quality=95, **kw)
        assert _pillow_loads(data).getpixel((639, 479)) == (128, 128, 128)  # the check looks further
        enc = encode_image(data, S)
        assert enc.repaired is False
        assert enc == encode_image(data, S)


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
        "from imnet_assets.image.encode import encode_image, EncodeSettings\n"
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


def _progressive_header(width: int, height: int, mode: str = "RGB", subsampling: int = 2) -> bytes:
    """A valid small progressive JPEG whose frame header claims ``width`` x ``height``."""
    data = to_bytes(Image.new(mode, (64, 48)), "JPEG", progressive=True, subsampling=subsampling)
    return _with_frame_size(data, width, height, sof=b"\xff\xc2")


def test_progressive_coefficient_memory_from_the_header():
    def coef(*args):
        return coefficient_bytes(open_image(_progressive_header(*args)))

    # 128 bytes per 8x8 block: 3 bytes per pixel at 4:2:0, 6 at 4:4:4, 8 for CMYK, 2 for grey
    assert coef(16000, 16000) == 16000 * 16000 * 3
    assert coef(4000, 3000, "RGB", 0) == 4000 * 3000 * 6
    assert coef(3000, 3000, "CMYK", 0) == 3000 * 3000 * 8
    assert coef(4000, 4000, "L") == 4000 * 4000 * 2
    assert coef(5000, 5000, "L") == 626 * 626 * 128  # blocks rounded up to the (2x2) sampling
    assert coef(17, 9) == (4 * 2 + 2 * 2 * 1 * 1) * 128  # partial blocks, MCUs of 2x2 luma blocks
    assert coefficient_bytes(open_image(_photo_jpeg(size=(64, 48)))) == 0  # baseline: none
    # The limit: 144 MP at 4:2:0 (the full-decode pixel limit), 72 MP at 4:4:4; ImageNet's largest
    # photos are 10-20 MP.
    assert MAX_COEFFICIENT_BYTES == 3 * MAX_FULL_DECODE_PIXELS < 2**30
    assert coef(12000, 12000) == MAX_COEFFICIENT_BYTES
    assert coef(8000, 6000, "CMYK", 0) < MAX_COEFFICIENT_BYTES


@pytest.mark.parametrize(
    "size,mode,subsampling,gb",
    [((16000, 16000), "RGB", 2, "0.77"), ((65535, 65535), "RGB", 2, "12.88"), ((9000, 9000), "RGB", 0, "0.49"),
     ((7000, 8000), "CMYK", 0, "0.45"), ((12001, 12000), "RGB", 2, "0.43")],
)  # fmt: skip
def test_progressive_too_large_rejected_by_plan(size, mode, subsampling, gb):
    img = open_image(_progressive_header(*size, mode, subsampling))
    with pytest.raises(ImageRejected) as exc:
        plan_decode(img)  # header only: nothing is decoded
    assert exc.value.reason == (
        f"too large to decode: {size[0]}x{size[1]} progressive JPEG needs ~{gb} GB of coefficient memory"
        " (max 0.43 GB)"
    )


def test_progressive_too_large_memory_bounded(tmp_path):
    # In a fresh process under an address-space limit, so that a regression fails instead of taking
    # the machine's memory: a 16000x16000 claim would take 0.77 GB, 65535x65535 12.9 GB.
    sizes = [(16000, 16000), (65535, 65535), (3000, 3000)]
    for i, size in enumerate(sizes):
        (tmp_path / f"{i}.jpg").write_bytes(_progressive_header(*size, "RGB", 0))
    code = (
        "import re, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from imnet_assets.image.encode import encode_image, ImageRejected\n"
        "from imnet_assets.image.decode import coefficient_bytes, open_image\n"
        "def hwm(): return int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
        "for path in sys.argv[1:]:\n"
        "    data = open(path, 'rb').read()\n"
        "    start = hwm()\n"
        "    try:\n"
        "        encode_image(data); reason = 'kept'\n"
        "    except ImageRejected as e:\n"
        "        reason = e.reason\n"
        "    print((hwm() - start) * 1024, coefficient_bytes(open_image(data)), reason, sep='|')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, *(str(tmp_path / f"{i}.jpg") for i in range(len(sizes)))],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    rows = [line.split("|") for line in res.stdout.splitlines()]
    for (grew, _coef, reason), size in zip(rows[:2], sizes):
        assert reason.startswith(f"too large to decode: {size[0]}x{size[1]} progressive JPEG needs")
        assert int(grew) < 20 * 2**20  # rejected before decoding
    # libjpeg really allocates what coefficient_bytes says (here 54 MB), on top of small images
    grew, coef, reason = rows[2]
    assert reason.startswith("undecodable: image data ends early")
    assert int(coef) == 54_000_000 and int(coef) <= int(grew) < int(coef) + 30 * 2**20


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
