"""One raw image in, one WebP out: the pixel and metadata rules of SPEC.md "Output".

Pure functions with no dagster dependency; everything here is a picklable top-level function so the
shard runs can call it from worker processes. Decoding (and the exclusion rules it applies) is
image/decode.py; the EXIF/ICC rules are image/exif.py.

Chain on the happy path (one header parse, one decode, at most one conversion and one resize):

1. identify the bytes with Pillow's plugins, *without* the decompression-bomb check (``open_image``);
2. reject tiny (< 32 px side), refused formats/modes and, for non-draftable formats, huge images;
3. for JPEG sources that get downsized, ``draft`` so libjpeg decodes at 1/2, 1/4 or 1/8 scale
   (always >= the target size);
4. decode; on a decoding error retry once tolerating truncated/broken data (``repaired=True``); a JPEG
   that decoded without error but whose data ran out before its last block (libjpeg fills the rest
   with grey and only warns) is found by ``_jpeg_ran_out`` and is ``repaired=True`` too; a JPEG that
   ran out before ``MIN_DECODED_FRACTION`` of its rows is rejected;
5. colour: what ``convert("RGB")`` gives (16-bit / 32-bit / float greyscale is scaled to 8 bit first);
6. resize to ``target_size`` with ``RESAMPLE``;
7. lossy WebP, with only the colour-space EXIF tags and an RGB ICC profile carried over.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from imnet_assets.image.decode import (
    MAX_SHORT,
    MIN_SIDE,
    ImageRejected,
    decode,
    describe_error,
    is_draftable,
    open_image,
    target_size,
)
from imnet_assets.image.exif import filter_exif, rgb_icc_profile

# Resampling filter, used identically by ``encode_image`` and ``bare_chain``.  LANCZOS is Pillow's
# highest-quality antialiasing downscaler (the one ``thumbnail`` uses).  After a JPEG draft the decoded
# image is less than ~2x the target per side, so the filter cost is small next to decode + WebP encode.
# No ``reducing_gap``: the result is the exact filter output of the (drafted) decoded image.
RESAMPLE = Image.Resampling.LANCZOS

@dataclass(frozen=True)
class EncodeSettings:
    quality: int = 90
    method: int = 4
    max_short: int = MAX_SHORT
    alt_labels: str = ""  # issue 17: IMNET_ALT_LABELS, extra label fields in each sample's JSON (core/altlabels.py)

    def __post_init__(self) -> None:
        if not 0 <= self.quality <= 100:
            raise ValueError(f"WebP quality must be 0..100, got {self.quality}")
        if not 0 <= self.method <= 6:
            raise ValueError(f"WebP method must be 0..6, got {self.method}")
        if self.max_short < MIN_SIDE:
            raise ValueError(f"max_short must be >= {MIN_SIDE}, got {self.max_short}")



@dataclass(frozen=True)
class Encoded:
    webp: bytes
    width: int
    height: int
    orig_width: int
    orig_height: int
    repaired: bool



# --------------------------------------------------------------------------------------------------
# Colour and size


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    """I;16*, I and F to "L".  Pillow's plain convert clips these at 255 (mostly white images), so
    16-bit data is scaled instead: round(v / 257).  "I" is treated as 16-bit data when it holds values
    above 255 (else as 8-bit).  "F" in [0, 1] is scaled by 255, other float ranges are clipped."""
    mode = img.mode
    if mode.startswith("I;16"):
        if mode != "I;16":  # point() only supports native "I;16"; "I" holds any 16-bit value
            img = img.convert("I")
        return img.point(lambda v: v / 257 + 0.5).convert("L")
    if mode == "I":
        lo, hi = img.getextrema()
        if hi > 255:
            img = img.point(lambda v: v / 257 + 0.5)
        return img.convert("L")
    # "F"
    lo, hi = img.getextrema()
    if lo >= 0.0 and hi <= 1.0:
        img = img.point(lambda v: v * 255 + 0.5)
    return img.convert("L")


def _to_rgb_resized(
    img: Image.Image, target: tuple[int, int], box: tuple[float, float, float, float] | None
) -> Image.Image:
    """Colour per ``convert("RGB")`` and resize to ``target``.

    Single-channel sources ("1", "L", "LA", 16-bit/float grey) are resized as "L" and expanded to RGB
    afterwards: convert("RGB") replicates the grey value into the three channels and the resampler
    works per channel, so this is bit-identical to convert-then-resize at a third of the cost.  All
    other modes are converted first (CMYK/P/alpha conversions are not per-channel linear; resizing
    RGBA would also premultiply alpha).
    """
    mode = img.mode
    if mode in ("P", "PA"):
        # Transparency only affects the output's info, never RGB pixel values; dropping it avoids
        # Pillow's "Palette images with Transparency expressed in bytes" warning.
        img.info.pop("transparency", None)
    if mode in ("1", "LA"):
        img = img.convert("L")
    elif mode in ("I", "F") or mode.startswith("I;16"):
        img = _to_8bit_grey(img)
    elif mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if img.size != target:
        img = img.resize(target, RESAMPLE, box=box)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


# --------------------------------------------------------------------------------------------------
# Public entry points

DEFAULT_SETTINGS = EncodeSettings()


def encode_image(data: bytes, settings: EncodeSettings = DEFAULT_SETTINGS) -> Encoded:
    """Encode one raw image per SPEC "Output".  Raises ``ImageRejected`` for any bad input; other
    exceptions only for environment problems (``MemoryError``) or bugs."""
    try:
        img, (ow, oh), target, box, repaired = decode(data, settings.max_short)
        info = img.info
        exif = filter_exif(info.get("exif"))
        icc = rgb_icc_profile(info.get("icc_profile"))
        out = _to_rgb_resized(img, target, box)
    except (ImageRejected, MemoryError):
        raise
    except Exception as e:
        raise ImageRejected(f"undecodable: {describe_error(e)}") from e
    buf = io.BytesIO()
    try:
        out.save(
            buf,
            "WEBP",
            quality=settings.quality,
            method=settings.method,
            exif=exif or b"",
            icc_profile=icc,
        )
    except MemoryError:
        raise
    except Exception as e:  # not expected: sizes are checked in plan_decode
        raise ImageRejected(f"cannot encode WebP: {describe_error(e)}") from e
    return Encoded(
        webp=buf.getvalue(),
        width=out.width,
        height=out.height,
        orig_width=ow,
        orig_height=oh,
        repaired=repaired,
    )


def bare_chain(data: bytes, settings: EncodeSettings = DEFAULT_SETTINGS) -> bytes:
    """The minimal reference chain for the benchmark: open, draft when downsizing JPEG, convert to
    RGB, resize with the same filter, WebP with the same quality/method.  No validation, metadata,
    truncation handling or error mapping."""
    img = open_image(data)
    target = target_size(img.width, img.height, settings.max_short)
    box = None
    if target != img.size and is_draftable(img):
        drafted = img.draft(img.mode, target)
        if drafted is not None:
            box = drafted[1]
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != target:
        img = img.resize(target, RESAMPLE, box=box)
    buf = io.BytesIO()
    img.save(buf, "WEBP", quality=settings.quality, method=settings.method)
    return buf.getvalue()
