"""One raw image in, one WebP (or, for a release with `codec = "jpeg"`, JPEG) out: the pixel and
metadata rules of SPEC.md "Output", the same for both codecs.

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
7. lossy WebP or baseline JPEG (``save_stored``: the only step where the codecs differ), with only the
   colour-space EXIF tags and an RGB ICC profile carried over.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
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
from imnet_assets.image.guard import MachineryFault, settle
from imnet_assets.settings import Settings

# Resampling filter, used identically by ``encode_image`` and ``bare_chain``.  LANCZOS is Pillow's
# highest-quality antialiasing downscaler (the one ``thumbnail`` uses).  After a JPEG draft the decoded
# image is less than ~2x the target per side, so the filter cost is small next to decode + WebP encode.
# No ``reducing_gap``: the result is the exact filter output of the (drafted) decoded image.
RESAMPLE = Image.Resampling.LANCZOS

# The stored image's codec -> its member extension in a sample (`<key>.webp`, `<key>.jpg`: the
# extensions webdataset's decoders and timm's reader, `input_key="jpg;png;webp"`, look for).
CODEC_EXTENSIONS = {"webp": "webp", "jpeg": "jpg"}

# JPEG (issue 25), fixed so that the same input gives the same bytes on every run and worker (with
# the pinned Pillow's libjpeg-turbo, whose default accurate integer DCT gives the same coefficients
# with or without SIMD):
# - 4:2:0 chroma subsampling: what lossy WebP always stores, so both releases keep the same colour
#   detail, and the layout every JPEG decoder (GPU ones included) handles fastest;
# - baseline (sequential), not progressive: libjpeg-turbo decodes it about 2.5x as fast, and the
#   hardware JPEG decoders of data-centre GPUs (nvJPEG's) take baseline only;
# - optimized Huffman tables: 2-4% smaller files (~2 ms more per image, README "JPEG settings"),
#   still baseline, computed from the image alone; the quality scales libjpeg's standard tables;
# - no restart markers, no comment (Pillow would copy a source JPEG's COM segment), JFIF header with
#   no density, EXIF and ICC as for WebP.
JPEG_OPTIONS = {"subsampling": "4:2:0", "progressive": False, "optimize": True}

# Part of every shard's fingerprint (stages/shard.py): raise it when the same source and settings
# would give other stored bytes.
ENCODER_VERSION = "3"  # 2: JPEG data that runs out before EOI is repaired or rejected; progressive memory cap;
# 3: an ICC profile claiming RGB on a CMYK or grey source is no longer carried; a cut-short PNG, GIF, ...
#    of which under 5% of the rows decode is refused (decode._filled_rows), as a JPEG was


@dataclass(frozen=True)
class EncodeSettings:
    quality: int = 90  # of the codec: IMNET_WEBP_QUALITY for WebP, a release's JPEG quality for JPEG
    method: int = 4  # WebP only
    max_short: int = MAX_SHORT  # a release's max_short_edge
    alt_labels: str = ""  # issue 17: IMNET_ALT_LABELS, extra label fields in each sample's JSON (release/altlabels.py)
    codec: str = "webp"  # issue 25: "webp" | "jpeg"

    def __post_init__(self) -> None:
        if self.codec not in CODEC_EXTENSIONS:
            raise ValueError(f"codec must be one of {sorted(CODEC_EXTENSIONS)}, got {self.codec!r}")
        if not 0 <= self.quality <= 100:
            raise ValueError(f"{self.codec_name} quality must be 0..100, got {self.quality}")
        if not 0 <= self.method <= 6:
            raise ValueError(f"WebP method must be 0..6, got {self.method}")
        if self.max_short < MIN_SIDE:
            raise ValueError(f"max_short must be >= {MIN_SIDE}, got {self.max_short}")

    @property
    def extension(self) -> str:
        """The stored image's member extension in each sample."""
        return CODEC_EXTENSIONS[self.codec]

    @property
    def codec_name(self) -> str:
        return "WebP" if self.codec == "webp" else "JPEG"

    def image_fields(self) -> dict:
        """What the stored image's bytes depend on besides the source and the encoder version (part
        of each shard's fingerprint). WebP's fields are the ones fingerprints held before the codec
        was a setting, so the default release's shards stay fresh; a JPEG release adds its codec
        and options, and leaves out the WebP method, which does not touch its bytes."""
        if self.codec == "webp":
            return {"quality": self.quality, "method": self.method, "max_short": self.max_short}
        return {"codec": self.codec, "quality": self.quality, "max_short": self.max_short, "jpeg": JPEG_OPTIONS}



def encode_settings(settings: Settings) -> EncodeSettings:
    """A release's encode settings (issue 25: its codec; the quality is the codec's, and
    max_short_edge sizes both; issue 17: alt_labels)."""
    quality = settings.jpeg_quality if settings.codec == "jpeg" else settings.webp_quality
    return EncodeSettings(quality=quality, method=settings.webp_method, max_short=settings.max_short_edge,
                          alt_labels=settings.alt_labels, codec=settings.codec)


def codec_identity(settings: EncodeSettings) -> str:
    """A short name for everything the stored image's bytes depend on besides the source: the
    settings' image fields, ENCODER_VERSION, and the versions of Pillow and of the codec library
    it links (the same source gives the same bytes only under all of them: see JPEG_OPTIONS).
    Stored images made under one identity may stand in for encoding again under the same one
    (stages/staged_encodes.py)."""
    from PIL import __version__ as pillow
    from PIL import features

    library = features.version("jpg" if settings.codec == "jpeg" else "webp")
    text = json.dumps({"fields": settings.image_fields(), "encoder": ENCODER_VERSION, "pillow": pillow,
                       "library": library}, sort_keys=True)
    return f"{settings.codec}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class Encoded:
    webp: bytes  # the stored image, WebP or JPEG as the settings' codec says (like shard_samples.webp_*)
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


def save_stored(out: Image.Image, settings: EncodeSettings, exif: bytes | None = None,
                icc: bytes | None = None) -> bytes:
    """The stored image's bytes: ``out`` (RGB, final size) as lossy WebP (quality, method) or as
    baseline JPEG (quality, JPEG_OPTIONS), with ``exif`` and ``icc`` and no other metadata."""
    buf = io.BytesIO()
    if settings.codec == "jpeg":
        # a JPEG's APP1 segment holds the TIFF structure after an "Exif\0\0" header (WebP's chunk: bare)
        out.save(buf, "JPEG", quality=settings.quality, **JPEG_OPTIONS, exif=b"Exif\x00\x00" + exif if exif else b"",
                 icc_profile=icc, comment=b"")
    else:
        out.save(buf, "WEBP", quality=settings.quality, method=settings.method, exif=exif or b"",
                 icc_profile=icc)
    return buf.getvalue()


def encode_image(data: bytes, settings: EncodeSettings = DEFAULT_SETTINGS) -> Encoded:
    """Encode one raw image per SPEC "Output".  Raises ``ImageRejected`` for any bad input; other
    exceptions only for environment problems (``MemoryError``) or bugs."""
    try:
        img, (ow, oh), target, box, repaired = decode(data, settings.max_short)
        info = img.info
        exif = filter_exif(info.get("exif"))
        icc = rgb_icc_profile(info.get("icc_profile"), img.mode)
        out = _to_rgb_resized(img, target, box)
    except (ImageRejected, MemoryError, MachineryFault):
        raise
    except Exception as e:
        raise ImageRejected(f"undecodable: {describe_error(e)}", e) from e
    try:
        stored = save_stored(out, settings, exif, icc)
    except MemoryError:
        raise
    except Exception as e:  # not expected: sizes are checked in plan_decode
        raise ImageRejected(f"cannot encode {settings.codec_name}: {describe_error(e)}", e) from e
    return Encoded(
        webp=stored,
        width=out.width,
        height=out.height,
        orig_width=ow,
        orig_height=oh,
        repaired=repaired,
    )


def bare_chain(data: bytes, settings: EncodeSettings = DEFAULT_SETTINGS) -> bytes:
    """The minimal reference chain for the benchmark: open, draft when downsizing JPEG, convert to
    RGB, resize with the same filter, the settings' codec (``save_stored``) without metadata.  No
    validation, metadata, truncation handling or error mapping."""
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
    return save_stored(img, settings)


def encode_or_refusal(data, settings: EncodeSettings, encode=None) -> Encoded | str:
    """The encoded image, or the reason it is excluded at encode time: the encoder refused it
    (ImageRejected), or failed on it (any other error but MemoryError, which propagates: memory is
    no property of the image). One rule for the shard runs and the index's staged encodes.
    A refusal made from an exception stands only once a known-good image of its kind passed the
    same codec with the same settings; else guard.MachineryFault (guard.settle), never an exclusion.
    `encode`: the codec (default encode_image; bench/scaleup.py passes a null one)."""
    encode = encode or encode_image
    try:
        return encode(data, settings)
    except ImageRejected as e:
        reason, error, repairing = e.reason, e.error, e.repairing
    except (MemoryError, MachineryFault):
        raise
    except Exception as e:  # noqa: BLE001 - one bad image never crashes a stage or shard
        reason, error, repairing = f"encoder error: {describe_error(e)}", e, False
    if error is not None:
        settle(f"encoding ({path_settings(settings)})", error, data, functools.partial(_encodes, encode=encode,
               settings=settings), settings.max_short, cut=repairing or None)
    return reason


def path_settings(settings: EncodeSettings) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.image_fields().items() if k != "jpeg")


def _encodes(data: bytes, encode, settings: EncodeSettings) -> str | None:
    """None when the codec takes these bytes, else its refusal (guard.settle's attempt)."""
    try:
        encode(data, settings)
    except ImageRejected as e:
        return e.reason
    return None
