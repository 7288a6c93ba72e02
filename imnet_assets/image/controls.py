"""The known-good control images of the machinery guard (image/guard.py): which control a failing
image gets (``control_for``) and the control's bytes (``control_image``), made here, in memory.

A control is of the failing image's kind: its format (the Pillow plugin that opens its header, tried
as ``decode.open_image`` tries them, else the plugin whose signature check takes its first bytes),
its mode and, for JPEG, progressive or not when its header says so; cut short like it when it
lacks its end marker, or when the failure came from the repair of data cut short (guard.settle's
``cut``; a format with no control cut short, ``CUTTABLE``, then gets the JPEG control cut short, the
only kind that reaches the repair); what the header does not say, the format's usual kind. It carries EXIF where its format
does (an ICC profile too in RGB), and a JPEG control a grey corner (``_grey_corner``), so that
every step of the chain runs on it.

Every format Pillow both reads and writes has a control of its own, and PSD, CUR and DCX, so a
plugin broken by an upgrade (PsdImagePlugin, say) is caught at the first image of its format and
never excludes them all: PSD, which it only reads, is written here by hand (``_psd``: the
header, no resources or layers, PackBits rows as Photoshop writes them); CUR and DCX are an ICO
and a PCX in their containers. Bytes no plugin's signature takes (and whose header no plugin
reads) could only have been read by a plugin without a signature check (``open_image`` tries
those on every such file): their control is a TGA, the one of those in use. Formats Pillow reads
but no control is made for (``UNCONTROLLED``: rare scientific, game, video and vector formats, the
other plugins without a signature, and stubs that need a handler) get a JPEG control: a plugin of
theirs broken alone is not caught.
"""

from __future__ import annotations

import functools
import io
import struct
from typing import NamedTuple

from PIL import Image

from imnet_assets.image.formats import looks_truncated, pillow_plugins, takes

# Per format, the modes a control is made in (each verified to pass every path and to read back in
# its mode: tests/core/test_guard.py), the usual one first; formats Pillow opens and writes, and PSD.
MODES = {
    "JPEG": ("RGB", "L", "CMYK"),
    "PNG": ("RGB", "L", "LA", "P", "RGBA", "1", "I;16"),
    "GIF": ("P",),
    "BMP": ("RGB", "L", "P", "1"),
    "DIB": ("RGB", "L", "P", "1"),
    "TIFF": ("RGB", "L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F"),
    "WEBP": ("RGB", "RGBA"),
    "AVIF": ("RGB", "L", "RGBA"),
    "JPEG2000": ("RGB", "L", "LA", "RGBA", "I;16", "CMYK"),
    "PSD": ("RGB", "L", "RGBA", "CMYK"),
    "ICO": ("RGB", "RGBA", "L", "LA", "P", "1"),
    "CUR": ("RGB", "RGBA", "P"),
    "ICNS": ("RGBA",),
    "PPM": ("RGB", "L", "1", "I", "F"),
    "PCX": ("RGB", "L", "P", "1"),
    "DCX": ("RGB", "L", "P", "1"),
    "TGA": ("RGB", "L", "LA", "P", "RGBA", "1"),
    "SGI": ("RGB", "L", "RGBA"),
    "QOI": ("RGB", "RGBA"),
    "DDS": ("RGB", "RGBA", "L", "LA"),
    "BLP": ("P",),
    "MSP": ("1",),
    "XBM": ("1",),
}
# Formats whose control cut short still decodes, repaired (the repair path's control).
CUTTABLE = frozenset({"JPEG", "PNG", "GIF", "BMP", "DIB", "TIFF", "PSD", "PPM", "PCX", "TGA", "SGI", "MSP", "XBM"})
NO_SIGNATURE = "TGA"  # the control of bytes no plugin's signature takes
FALLBACK = "JPEG"  # the control of a format in UNCONTROLLED
# Formats Pillow reads with no control of their own (tests/core/test_guard_formats.py keeps this list
# equal to what the installed Pillow opens, so an upgrade's new format is met here); EPS is refused.
UNCONTROLLED = frozenset({"BUFR", "EPS", "FITS", "FLI", "FTEX", "GBR", "GRIB", "HDF5", "MCIDAS", "MPEG", "PIXAR",
                          "SUN", "WMF", "XPM", "XVTHUMB", "IM", "IMT", "IPTC", "PCD", "SPIDER"})
# Square controls: an icon, the largest its format stores; a texture (written or read in pure Python:
# seconds at the usual size, 11 s for a BLP), a usual texture's size.
_FIXED_SIDE = {"ICO": 256, "CUR": 256, "ICNS": 512, "BLP": 256, "DDS": 256}
_CUT_AT = 0.9  # the fraction of a cut control's bytes kept (a progressive JPEG keeps its first scans)
_MAX_DRAFT_CONTROL_SIDE = 2048  # a JPEG control is drafted (short side > 2 x max_short) up to this side
_MIN_CONTROL_SIDE = 256


class ControlKind(NamedTuple):
    format: str
    mode: str
    progressive: bool
    cut: bool
    max_short: int

    def describe(self) -> str:
        size = "x".join(map(str, control_size(self.format, self.max_short)))
        return f"{self.format} {self.mode}{' progressive' if self.progressive else ''} {size}" + (
            " cut short" if self.cut else ""
        )


def control_size(fmt: str, max_short: int) -> tuple[int, int]:
    """Large enough to be resized (and a JPEG, drafted: short side over twice ``max_short``, up to
    _MAX_DRAFT_CONTROL_SIDE), landscape so the long side is rounded; at least _MIN_CONTROL_SIDE, so
    that a cut control keeps its header and first scans. An icon or a texture: _FIXED_SIDE."""
    if fmt in _FIXED_SIDE:
        return _FIXED_SIDE[fmt], _FIXED_SIDE[fmt]
    short = (
        2 * max_short + 16
        if fmt == "JPEG" and 2 * max_short + 16 <= _MAX_DRAFT_CONTROL_SIDE
        else max_short + 16
    )
    short = max(short, _MIN_CONTROL_SIDE)
    return short + short // 3, short


def signature_format(data) -> str | None:
    """The format whose plugin's signature check takes ``data``'s first bytes, in Pillow's order
    (the plugin ``decode.open_image`` gives them to first); None when no plugin's does. No decoder
    runs: the checks compare a few bytes."""
    prefix = bytes(data[:16])
    for fmt, _factory, accept in pillow_plugins():
        if accept is None:
            continue
        try:
            if takes(accept, prefix):
                return fmt
        except Exception:  # noqa: BLE001 - a check that cannot say yes
            continue
    return None


_TGA_FOOTER = b"TRUEVISION-XFILE.\x00"  # the end of a TGA 2.0 file (a TGA has no signature at its start)


def _signed_format(data) -> str:
    """The format the bytes name without a decoder: a TGA's footer, else the first signature check
    that takes them (a TGA of true colour starts as a cursor does), else NO_SIGNATURE."""
    if bytes(data[-len(_TGA_FOOTER):]) == _TGA_FOOTER:
        return "TGA"
    return signature_format(data) or NO_SIGNATURE


def _opened(data) -> tuple[str, str, bool] | None:
    """(format, mode, progressive) of the plugin that opens ``data``'s header, tried as
    ``decode.open_image`` tries them (the plugins whose signature check takes the first bytes, and
    those without one, in Pillow's order); None when none does."""
    prefix = bytes(data[:16])
    for fmt, factory, accept in pillow_plugins():
        try:
            if accept is not None and not takes(accept, prefix):
                continue
            img = factory(io.BytesIO(bytes(data)), "")
        except Exception:  # noqa: BLE001 - not this plugin's, or its parse fails too
            continue
        with img:
            return fmt, img.mode, fmt == "JPEG" and bool(img.info.get("progressive"))
    return None


def control_for(data, max_short: int, header: bool = True, cut: bool | None = None) -> ControlKind:
    """The control of the failing image ``data``'s kind (see the module's docstring). ``header=False``:
    from what the bytes say without a decoder only (the format's usual kind; for an image whose
    header crashed the process that read it). ``cut``: True, cut short whatever the image's end
    (the failure came from the repair of data cut short; a format not CUTTABLE: FALLBACK's control cut
    short); False, never; None, when it looks cut."""
    opened = _opened(data) if header else None
    fmt, mode, progressive = opened or (_signed_format(data), None, False)
    if fmt not in MODES:
        fmt, mode, progressive = FALLBACK, None, False
    if mode not in MODES[fmt]:
        mode = MODES[fmt][0]
    if cut is None:
        cut = looks_truncated(data, fmt)
    elif cut and fmt not in CUTTABLE:
        # The failure came from the repair, which a control of this format (never cut short) does not
        # reach: it would pass whatever the repair does. The fallback's control cut short takes it.
        fmt, mode, progressive = FALLBACK, MODES[FALLBACK][0], False
    return ControlKind(fmt, mode, progressive, fmt in CUTTABLE and cut, max_short)


def _picture(size: tuple[int, int], mode: str) -> Image.Image:
    """A photo-like picture (gradients and detail, no flat areas, no grey corners) in ``mode``
    (a JPEG control's corner is then painted grey: ``_grey_corner``)."""
    small = (256, 192)
    x = Image.linear_gradient("L").rotate(90).resize(small)
    y = Image.linear_gradient("L").resize(small)
    detail = Image.effect_mandelbrot(small, (-2.2, -1.2, 1.0, 1.2), 64)
    if mode == "P":  # quantized small: a palette of the whole picture costs ~0.3 s
        return Image.merge("RGB", (x, y, detail)).quantize(64, dither=Image.Dither.NONE).resize(size)
    rgb = Image.merge("RGB", (x, y, detail)).resize(size, Image.Resampling.BICUBIC)
    if mode == "1":
        return rgb.convert("L").convert("1")
    if mode == "I;16":
        return rgb.convert("L").point(lambda v: v * 257, "I").convert("I;16")
    if mode in ("LA", "RGBA"):
        img = rgb.convert(mode)
        img.putalpha(x.resize(size))
        return img
    return rgb.convert(mode)


_EXIF_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF")  # whose EXIF the encoder reads (Pillow's info["exif"])
_GREY_CORNER = 64  # px: whole MCUs of flat grey at every draft scale, chroma upsampling included


def _grey_corner(img: Image.Image) -> None:
    """Paint the bottom right of a JPEG control libjpeg's grey (128, what it decodes a block with no
    data to): a complete control then decodes there to that grey too, so that ``decode`` confirms
    it is complete by its second, strict decode (decode._jpeg_ran_out), which the control then runs."""
    w, h = img.size
    img.paste((128,) * len(img.getbands()) if len(img.getbands()) > 1 else 128,
              (w - _GREY_CORNER, h - _GREY_CORNER, w, h))


def _metadata() -> dict:
    """A colour-space EXIF tag (ColorSpace sRGB) and an sRGB ICC profile: the metadata rules run too."""
    exif = Image.Exif()
    exif[0x8769] = {0xA001: 1}
    meta = {"exif": exif.tobytes()}
    try:
        from PIL import ImageCms

        meta["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    except ImportError:  # Pillow without littlecms: no profile
        pass
    return meta


def _packbits(row: bytes) -> bytes:
    """A row as PackBits literal runs (a count byte n, then n + 1 bytes), as Photoshop's RLE reads."""
    out = bytearray()
    for i in range(0, len(row), 128):
        chunk = row[i : i + 128]
        out += bytes((len(chunk) - 1,)) + chunk
    return bytes(out)


def _psd(img: Image.Image) -> bytes:
    """A Photoshop file of ``img`` (RGB, RGBA, L or CMYK, 8 bits): the header, empty colour-mode,
    resource and layer sections, and the composite image as PackBits rows (compression 1), channel
    after channel (CMYK inverted, as Photoshop stores it)."""
    psd_mode = {"L": 1, "RGB": 3, "RGBA": 3, "CMYK": 4}[img.mode]
    channels = img.split()
    if img.mode == "CMYK":
        channels = tuple(c.point(lambda v: 255 - v) for c in channels)
    w, h = img.size
    rows = [_packbits(c.tobytes()[y * w : (y + 1) * w]) for c in channels for y in range(h)]
    return b"".join((
        b"8BPS", struct.pack(">H6xHIIHH", 1, len(channels), h, w, 8, psd_mode),
        struct.pack(">III", 0, 0, 0), struct.pack(">H", 1),
        b"".join(struct.pack(">H", len(r)) for r in rows), *rows,
    ))


def _saved(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _cur(img: Image.Image) -> bytes:
    """A cursor: an ICO of ``img`` (a bitmap, which is what Pillow reads from a cursor) with the cursor's type (2) and a hotspot at 0, 0."""
    ico = bytearray(_saved(img, "ICO", sizes=[img.size], bitmap_format="bmp"))
    ico[2:4] = struct.pack("<H", 2)
    ico[6 + 4 : 6 + 8] = struct.pack("<HH", 0, 0)  # the first entry's planes/bpp fields: the hotspot
    return bytes(ico)


def _dcx(img: Image.Image) -> bytes:
    """A DCX: its magic, the offset of its one page (a PCX of ``img``) and the end of the list."""
    return struct.pack("<III", 0x3ADE68B1, 12, 0) + _saved(img, "PCX")


@functools.lru_cache(maxsize=64)
def control_image(kind: ControlKind) -> bytes:
    """The control's bytes (made once per process per kind)."""
    img = _picture(control_size(kind.format, kind.max_short), kind.mode)
    if kind.format == "JPEG":
        _grey_corner(img)
    options: dict = {}
    if kind.format in _EXIF_FORMATS:  # the EXIF rules run on every mode; an ICC profile, RGB's
        meta = _metadata()
        options.update(meta if kind.mode == "RGB" else {"exif": meta["exif"]})
    if kind.format in ("JPEG", "WEBP"):
        options["quality"] = 90
    if kind.format == "JPEG":
        options["progressive"] = kind.progressive
    if kind.format in ("ICO", "ICNS"):
        options["sizes"] = [img.size]
    if kind.format == "PSD":
        data = _psd(img)
    elif kind.format == "CUR":
        data = _cur(img)
    elif kind.format == "DCX":
        data = _dcx(img)
    else:
        data = _saved(img, kind.format, **options)
    return data[: int(len(data) * _CUT_AT)] if kind.cut else data
