"""One raw image in, one WebP (or, for a release with `codec = "jpeg"`, JPEG) out: the pixel and
metadata rules of SPEC.md "Output", the same for both codecs.

Pure functions with no dagster dependency; everything here is a picklable top-level function so the
shard runs can call it from worker processes.

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

import io
import re
import struct
from dataclasses import dataclass
from typing import NamedTuple

from PIL import Image, ImageChops, ImageFile, JpegImagePlugin, UnidentifiedImageError

MAX_SHORT = 768
MIN_SIDE = 32

# Formats without DCT draft scaling are decoded at full size; above this many pixels they are rejected
# rather than risking the worker's memory (144 MP RGB is ~430 MB).  JPEG is checked against the same
# limit *after* draft, which can only exceed it for > 48k x 24k px files.  The limit is below Pillow's
# own hard decompression-bomb limit (2 * Image.MAX_IMAGE_PIXELS ~ 179 MP), which some plugins also
# check while loading.
MAX_FULL_DECODE_PIXELS = 12000 * 12000

# A progressive JPEG is decoded through a whole-image buffer of DCT coefficients, 128 bytes per 8x8
# block of every component, whatever the draft scale: 3 bytes per pixel for 4:2:0 YCbCr, 6 for 4:4:4,
# 8 for 4:4:4 CMYK.  A file of a few hundred bytes can claim 65535 x 65535 px (13 GB at 4:2:0).  The
# limit is what a 144 MP 4:2:0 image needs (the pixel limit above), 72 MP at 4:4:4: several times
# ImageNet's largest photos (10-20 MP); with the small drafted image it keeps a worker well under
# 1 GB.  (libjpeg needs the same buffer for a sequential JPEG whose components come in separate
# scans; the header Pillow reads ends before the first SOS, so those are not limited here.)
MAX_COEFFICIENT_BYTES = 3 * MAX_FULL_DECODE_PIXELS

# libwebp cannot store a side longer than this (an extreme panorama whose short side is <= 768).
WEBP_MAX_SIDE = 16383

# Resampling filter, used identically by ``encode_image`` and ``bare_chain``.  LANCZOS is Pillow's
# highest-quality antialiasing downscaler (the one ``thumbnail`` uses).  After a JPEG draft the decoded
# image is less than ~2x the target per side, so the filter cost is small next to decode + WebP encode.
# No ``reducing_gap``: the result is the exact filter output of the (drafted) decoded image.
RESAMPLE = Image.Resampling.LANCZOS

# Pillow formats we refuse to decode even though Pillow identifies them: EPS is rendered by running
# Ghostscript on the file's PostScript program.
REFUSED_FORMATS = frozenset({"EPS"})

# Modes we can turn into RGB.  ("La" is the only mode Pillow cannot convert to RGB.)
SUPPORTED_MODES = frozenset(
    {
        "1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV",
        "I", "I;16", "I;16L", "I;16B", "I;16N", "F",
    }
)  # fmt: skip


# The stored image's codec -> its member extension in a sample (`<key>.webp`, `<key>.jpg`: the
# extensions webdataset's decoders and timm's reader, `input_key="jpg;png;webp"`, look for).
CODEC_EXTENSIONS = {"webp": "webp", "jpeg": "jpg"}

# JPEG (issue 25), fixed so that the same input gives the same bytes on every run and worker (with
# the pinned Pillow's libjpeg-turbo, whose default accurate integer DCT gives the same coefficients
# with or without SIMD):
# - 4:2:0 chroma subsampling: what lossy WebP always stores, so both releases keep the same colour
#   detail, and the layout every JPEG decoder (GPU ones included) handles fastest;
# - baseline (sequential), not progressive: libjpeg-turbo decodes it about twice as fast, and the
#   hardware JPEG decoders of data-centre GPUs (nvJPEG's) take baseline only;
# - optimized Huffman tables: 2-4% smaller files (~2 ms more per image, README "JPEG settings"),
#   still baseline, computed from the image alone; the quality scales libjpeg's standard tables;
# - no restart markers, no comment (Pillow would copy a source JPEG's COM segment), JFIF header with
#   no density, EXIF and ICC as for WebP.
JPEG_OPTIONS = {"subsampling": "4:2:0", "progressive": False, "optimize": True}


@dataclass(frozen=True)
class EncodeSettings:
    quality: int = 90  # of the codec: IMNET_WEBP_QUALITY for WebP, a release's JPEG quality for JPEG
    method: int = 4  # WebP only
    max_short: int = MAX_SHORT  # a release's max_short_edge
    alt_labels: str = ""  # issue 17: IMNET_ALT_LABELS, extra label fields in each sample's JSON (core/altlabels.py)
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


class ImageRejected(Exception):
    """The image must be excluded; ``reason`` is a short, deterministic, human-readable string."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Encoded:
    webp: bytes  # the stored image, WebP or JPEG as the settings' codec says (like shard_samples.webp_*)
    width: int
    height: int
    orig_width: int
    orig_height: int
    repaired: bool


def target_size(width: int, height: int, max_short: int = MAX_SHORT) -> tuple[int, int]:
    """Output size: when ``min(w, h) > max_short`` the short side becomes exactly ``max_short`` and the
    long side ``round(long * max_short / short)``; otherwise unchanged."""
    short = min(width, height)
    if short <= max_short:
        return width, height
    if width <= height:
        return max_short, round(height * max_short / width)
    return round(width * max_short / height), max_short


# --------------------------------------------------------------------------------------------------
# Opening


_OPEN_SKIP_ERRORS = (SyntaxError, IndexError, TypeError, struct.error)
_plugins_loaded = False


def open_image(data: bytes) -> ImageFile.ImageFile:
    """Identify ``data`` exactly as ``Image.open`` does (same plugins, same order, same tolerated
    errors) but without the decompression-bomb size check, and without touching any global state
    (``Image.MAX_IMAGE_PIXELS`` or warning filters).  Header parse only; nothing is decoded.

    Raises ``UnidentifiedImageError`` (fixed message) when no plugin accepts the bytes.
    """
    global _plugins_loaded
    if not _plugins_loaded:
        Image.preinit()  # the common plugins first, like Image.open
        Image.init()
        _plugins_loaded = True
    fp = io.BytesIO(data)
    prefix = data[:16]
    for fmt in tuple(Image.ID):
        factory, accept = Image.OPEN[fmt]
        if accept is not None:
            accepted = accept(prefix)
            if not accepted or isinstance(accepted, str):
                continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except _OPEN_SKIP_ERRORS:
            continue
    raise UnidentifiedImageError("cannot identify image file")


def describe_error(exc: BaseException) -> str:
    """``Type: message`` with object addresses removed, so reasons are deterministic."""
    msg = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc)).strip()
    name = type(exc).__name__
    return f"{name}: {msg}" if msg else name


def _is_draftable(img: Image.Image) -> bool:
    return isinstance(img, JpegImagePlugin.JpegImageFile)  # JPEG and MPO


def _frame_blocks(img, size: tuple[int, int], padded: bool) -> int:
    """8x8 blocks of all components of the JPEG frame ``img.layer`` describes at ``size``: per
    component ``ceil(width * h / (8 * h_max))`` by ``ceil(height * v / (8 * v_max))`` (libjpeg's
    jdinput.c), each rounded up to a multiple of its sampling factors when ``padded`` (the whole-image
    coefficient buffer, jdcoefct.c).  Sampling factors outside 1..4, which libjpeg refuses, count as 1."""
    layers = getattr(img, "layers", 0) or len(img.layer)
    sampling = [(min(max(h, 1), 4), min(max(v, 1), 4)) for _, h, v, _ in img.layer[-layers:]]
    if not sampling:
        return 0
    w, h = size
    h_max = max(s[0] for s in sampling)
    v_max = max(s[1] for s in sampling)
    blocks = 0
    for hs, vs in sampling:
        cols = -(-w * hs // (8 * h_max))
        rows = -(-h * vs // (8 * v_max))
        if padded:
            cols, rows = -(-cols // hs) * hs, -(-rows // vs) * vs
        blocks += cols * rows
    return blocks


def coefficient_bytes(img) -> int:
    """Bytes of the whole-image coefficient buffer libjpeg allocates to decode ``img`` when it is a
    progressive JPEG (0 for anything else), from the frame header only: 64 two-byte coefficients per
    block of every component.

    ``img`` is an opened, not drafted ``JpegImageFile`` or anything with the same ``size``, ``format``,
    ``info`` and ``layer`` (the probe's header record)."""
    if img.format not in ("JPEG", "MPO") or not img.info.get("progressive"):
        return 0
    return 128 * _frame_blocks(img, img.size, padded=True)


def plan_decode(
    img: ImageFile.ImageFile, max_short: int = MAX_SHORT
) -> tuple[tuple[int, int], tuple[float, float, float, float] | None]:
    """Validate an opened (not yet loaded) image and prepare its decode.

    Returns ``(target, box)``: the output size and, when a JPEG draft was applied, the region of the
    drafted image that corresponds to the full original (for ``resize(box=...)``).  Raises
    ``ImageRejected`` for images that must be excluded.  Header-only: the probe calls it too, so the
    probe and the encoder agree on what is excluded.
    """
    w, h = img.size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise ImageRejected(f"too small: {w}x{h} (min side {MIN_SIDE})")
    if img.format in REFUSED_FORMATS:
        raise ImageRejected(f"unsupported format {img.format}")
    if img.mode not in SUPPORTED_MODES:
        raise ImageRejected(f"unsupported mode {img.mode} ({img.format})")
    target = target_size(w, h, max_short)
    # WebP's limit, for every codec: the index settles it (at 768) once for all releases, so a JPEG
    # release holds the same images as the WebP one.
    if max(target) > WEBP_MAX_SIDE:
        raise ImageRejected(
            f"too large for WebP: {w}x{h} {img.format} -> {target[0]}x{target[1]} (max side {WEBP_MAX_SIDE})"
        )
    coef = coefficient_bytes(img)
    if coef > MAX_COEFFICIENT_BYTES:
        raise ImageRejected(
            f"too large to decode: {w}x{h} progressive JPEG needs ~{coef / 1e9:.2f} GB of coefficient"
            f" memory (max {MAX_COEFFICIENT_BYTES / 1e9:.2f} GB)"
        )
    box = None
    if target != (w, h) and _is_draftable(img):
        # DCT-domain downscale by 1/2, 1/4 or 1/8; the decoded size stays >= target.
        drafted = img.draft(img.mode, target)
        if drafted is not None:
            box = drafted[1]
    dw, dh = img.size
    if dw * dh > MAX_FULL_DECODE_PIXELS:
        raise ImageRejected(
            f"too large to decode: {w}x{h} {img.format} ({dw * dh} px to decode > {MAX_FULL_DECODE_PIXELS})"
        )
    return target, box


def _open_planned(data: bytes, max_short: int):
    if not data:
        raise ImageRejected("empty file")
    try:
        img = open_image(data)
    except UnidentifiedImageError as e:
        raise ImageRejected("not an image: cannot identify image file") from e
    except Image.DecompressionBombError as e:  # raised by a few plugins while parsing headers
        raise ImageRejected(f"too large to decode: {describe_error(e)}") from e
    except MemoryError:
        raise
    except Exception as e:  # a plugin recognised the format but its header is cut or corrupt
        raise ImageRejected(f"unreadable header: {describe_error(e)}") from e
    orig = img.size
    target, box = plan_decode(img, max_short)
    return img, orig, target, box


def _load_truncated(img: ImageFile.ImageFile) -> None:
    """``img.load()`` with Pillow's truncated-image tolerance, scoped to this call.

    Encoding runs in worker processes, one image at a time, so flipping the module flag inside
    try/finally does not leak to other code."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        img.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def jpeg_scan_bytes(data: bytes) -> int:
    """Bytes of entropy-coded data after the first SOS header of a JPEG (trailing zero padding and EOI
    not counted); -1 when no SOS segment is found.  Walks the marker segments, so SOS markers inside
    APP segments (EXIF thumbnails) are skipped."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return -1
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            scan = data[pos + 2 + length :].rstrip(b"\x00")
            if scan.endswith(b"\xff\xd9"):
                scan = scan[:-2]
            return len(scan)
        pos += 2 + length
    return -1


def _is_uniform(img: Image.Image) -> bool:
    ext = img.getextrema()
    if isinstance(ext[0], tuple):
        return all(lo == hi for lo, hi in ext)
    return ext[0] == ext[1]


# ---- JPEG data that ends early
#
# When the entropy-coded data of a scan stops at a marker (typically a file cut short that still ends
# with EOI, or one Pillow completes with a fake EOI), libjpeg only warns: the blocks it has no data
# for keep all-zero coefficients, which decode to mid grey (128 in every channel; 127 for Adobe
# inverted CMYK), at every draft scale; scans that never started leave a progressive image coarse.

# A JPEG whose data ran out before this fraction of its rows decoded is rejected, not stored nearly
# all grey.
MIN_DECODED_FRACTION = 0.05

_FILL_VALUES = (127, 128)
_NOT_FILL_LUT = [0 if v in _FILL_VALUES else 255 for v in range(256)]
# The first marker after entropy-coded data (fill bytes included): 0xFF followed by anything but a
# stuffed zero or a restart marker.
_ECS_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# One-bits (0xFF, stuffed) put after the last scan's data in the confirming decode: enough for the
# bit reader's look-ahead (57 bits) on the last block of a complete scan.
_ONE_BITS = b"\xff\x00" * 8
# Bytes (no 0xFF) that decode as arbitrary Huffman codes, for the progressive confirmation.
_FILLER = bytes((37 * i + 11) % 255 for i in range(64))
_SOS_OR_EOI = re.compile(rb"\xff[\xd9\xda]")
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_ALL_COEFFICIENTS = (1 << 64) - 1


def _is_fill(pixel) -> bool:
    if isinstance(pixel, int):
        return pixel in _FILL_VALUES
    return all(v in _FILL_VALUES for v in pixel)


class JpegScans(NamedTuple):
    sof: int  # the frame's marker (0xC0 baseline ... 0xC2 progressive, 0xC9.. arithmetic coding)
    components: bytes  # the frame's component ids
    scans: list[bytes]  # each scan's SOS header, without its length field
    starts: list[int]  # offset where each scan's entropy-coded data starts


def jpeg_scans(data: bytes) -> JpegScans | None:
    """The frame and the scans before the first EOI of a JPEG; None when the marker segments up to
    the first SOS cannot be walked, or there is no frame.

    Inside entropy-coded data a 0xFF byte is only ever followed by 0x00 or a restart marker, and the
    table segments between scans cannot hold FF DA or FF D9 (0xFF is no Huffman symbol), so after the
    first SOS the others and the EOI are found by one regex search (C speed, ~60 us for 100 kB)."""
    pos, n = 2, len(data)
    sof, components = 0, b""
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = data[pos + 2] << 8 | data[pos + 3]
        if marker in _SOF_MARKERS and length >= 8:
            segment = data[pos + 4 : pos + 2 + length]
            sof, components = marker, segment[6::3][: segment[5]]
        if marker == 0xDA:
            break
        if marker in (0xD8, 0xD9) or length < 2:
            return None
        pos += 2 + length
    scans, starts = [], []
    for found in _SOS_OR_EOI.finditer(data, pos):
        at = found.start()
        if data[at + 1] == 0xD9:
            break
        length = data[at + 2] << 8 | data[at + 3] if at + 4 <= n else 0
        scans.append(data[at + 4 : at + 2 + length])
        starts.append(min(at + 2 + length, n))
    if not components:
        return None
    return JpegScans(sof, components, scans, starts)


def _scan_data_end(data: bytes, start: int) -> int:
    """Where the entropy-coded data starting at ``start`` ends: at the first marker (or fill bytes
    before one) that follows it, else at the end of ``data``."""
    found = _ECS_END.search(data, start)
    if found is None:
        return len(data)
    end = found.start()
    while end > start and data[end - 1] == 0xFF:
        end -= 1
    return end


def _scan_script_complete(components: bytes, scans: list[bytes], progressive: bool) -> bool:
    """Whether the scans bring every coefficient of every component to full precision (a progressive
    scan with Al = 0), or, for a sequential JPEG, include every component."""
    done = dict.fromkeys(components, 0)
    for sos in scans:
        ns = sos[0] if sos else 0
        if len(sos) < 2 * ns + 4:
            continue  # cut short: its scan has no data
        ss, se, al = sos[2 * ns + 1], sos[2 * ns + 2], sos[2 * ns + 3] & 15
        if not progressive:
            bits = _ALL_COEFFICIENTS
        elif al == 0 and ss <= se:
            bits = ((1 << (se + 1)) - 1) ^ ((1 << ss) - 1)
        else:
            continue
        for c in sos[1 : 2 * ns + 1 : 2]:
            if c in done:
                done[c] |= bits
    return all(v & _ALL_COEFFICIENTS == _ALL_COEFFICIENTS for v in done.values())


def _jpeg_ran_out(img: Image.Image, orig: tuple[int, int], data: bytes, max_short: int) -> bool:
    """Whether the entropy-coded data of a JPEG that decoded without error (``img``, loaded; ``orig``
    its size before any draft) ran out before the image was complete.

    Sequential JPEG: the block decoded last (bottom right) is then libjpeg's grey, so a bottom-right
    pixel that is not grey settles it (one ``getpixel``: every usual image stops here).  Otherwise
    the file is decoded again, strictly, with its data after the last scan replaced by a few bytes of
    one-bits and no EOI: complete data decodes to the same pixels (the extra bits are skipped as
    padding), while data that ran out makes libjpeg wait for more (an error) or decode the extra
    bits (other pixels).  A cut inside the last few blocks can go unseen.

    Progressive JPEG (the scan headers are walked, ~50 us per 100 kB): the data ran out when the scan
    script stops before every coefficient is complete, or when the file is too small to hold even the
    first DC scan (1 bit per block at least, with Huffman coding), or, when the bottom-right pixel is
    grey, when a few filler bytes put after each scan's data change the decoded pixels (a complete
    scan skips them).  A cut inside the final scan, which only refines detail, is not detected.
    """
    progressive = bool(img.info.get("progressive"))
    grey_corner = _is_fill(img.getpixel((img.width - 1, img.height - 1)))
    if not (progressive or grey_corner):
        return False
    walked = jpeg_scans(data)
    if walked is None:
        return False  # nothing to go on: what decoded is what there is
    if not _scan_script_complete(walked.components, walked.scans, progressive):
        return True
    if progressive and walked.sof < 0xC8 and 8 * len(data) < _frame_blocks(img, orig, padded=False):
        return True
    if not grey_corner:
        return False
    if progressive:
        # The filler inserted after each scan's data is skipped by a scan that is complete, and
        # decoded (into DC values other than the grey's) by one that ran out.
        patched, last = [], 0
        for start in walked.starts:
            end = _scan_data_end(data, start)
            patched += [data[last:end], _FILLER]
            last = end
        patched.append(data[last:])
        again_data = b"".join(patched)
    else:
        again_data = data[: _scan_data_end(data, walked.starts[-1])] + _ONE_BITS
    try:
        again = _open_planned(again_data, max_short)[0]
        again.load()
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - libjpeg asked for more data than there is
        return True
    return again.tobytes() != img.tobytes()


def _decoded_rows(img: Image.Image) -> int:
    """Rows of a decoded JPEG down to the last one holding a pixel that is not libjpeg's grey fill."""
    mask = None
    for band in img.split():
        not_fill = band.point(_NOT_FILL_LUT)
        mask = not_fill if mask is None else ImageChops.lighter(mask, not_fill)
    bbox = mask.getbbox() if mask is not None else None
    return bbox[3] if bbox else 0


def _check_decoded_part(img: Image.Image) -> None:
    """Reject a JPEG whose data ran out so early that almost all of it is grey fill."""
    rows = _decoded_rows(img)
    if rows < MIN_DECODED_FRACTION * img.height:
        raise ImageRejected(
            f"undecodable: image data ends early, only the top {100 * rows / img.height:.1f}% decoded"
            f" (min {MIN_DECODED_FRACTION:.0%})"
        )


def _decode(data: bytes, max_short: int):
    """Open, plan and decode.  Returns ``(img, orig_size, target, box, repaired)``."""
    img, orig, target, box = _open_planned(data, max_short)
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as first:  # truncated / broken data: decode again, as far as the data goes
        first_error = describe_error(first)
    else:
        if _is_draftable(img) and _jpeg_ran_out(img, orig, data, max_short):
            _check_decoded_part(img)
            return img, orig, target, box, True
        return img, orig, target, box, False
    img, orig, target, box = _open_planned(data, max_short)
    if _is_draftable(img) and jpeg_scan_bytes(data) <= 0:
        # libjpeg would invent a grey image (plus a little noise) from the header alone
        raise ImageRejected(f"undecodable: no image data could be decoded ({first_error})")
    try:
        _load_truncated(img)
    except MemoryError:
        raise
    except Exception as e:
        raise ImageRejected(f"undecodable: {first_error}; {describe_error(e)}") from e
    # Pillow fills what it could not decode with a constant (black, or grey for JPEG); a result that
    # is a single colour carries no decoded data (e.g. a PNG whose IDAT is not zlib data, a JPEG
    # whose first scan is unusable).
    if _is_uniform(img):
        raise ImageRejected(f"undecodable: no image data could be decoded ({first_error})")
    if _is_draftable(img):
        _check_decoded_part(img)
    return img, orig, target, box, True


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
# Metadata

ICC_RGB = b"RGB "

# Colour-space EXIF tags kept (everything else, including Orientation, GPS, maker notes, is dropped).
_KEEP_IFD0 = frozenset({0x013E, 0x013F, 0x0211, 0x0212, 0x0213})  # WhitePoint, PrimaryChromaticities,
# YCbCrCoefficients, YCbCrSubSampling, YCbCrPositioning
_KEEP_EXIF = frozenset({0xA001, 0xA500})  # ColorSpace, Gamma
_KEEP_INTEROP = frozenset({0x0001})  # InteroperabilityIndex
_EXIF_IFD = 0x8769
_INTEROP_IFD = 0xA005
# TIFF field type -> bytes per value
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_MAX_ENTRIES = 1024

Entry = tuple[int, int, bytes]  # (type, count, raw value bytes in the source byte order)


def _read_ifd(tiff: bytes, bo: str, offset: int) -> dict[int, Entry]:
    entries: dict[int, Entry] = {}
    if offset < 8 or offset + 2 > len(tiff):
        return entries
    (n,) = struct.unpack_from(bo + "H", tiff, offset)
    n = min(n, _MAX_ENTRIES, (len(tiff) - offset - 2) // 12)
    for i in range(n):
        pos = offset + 2 + 12 * i
        tag, typ, count = struct.unpack_from(bo + "HHI", tiff, pos)
        size = _TYPE_SIZES.get(typ)
        if size is None:
            continue
        total = size * count
        if total <= 4:
            value = tiff[pos + 8 : pos + 8 + total]
        else:
            (voff,) = struct.unpack_from(bo + "I", tiff, pos + 8)
            value = tiff[voff : voff + total]
        if len(value) == total:
            entries[tag] = (typ, count, value)
    return entries


def _pointer(entries: dict[int, Entry], tag: int, bo: str) -> int | None:
    entry = entries.get(tag)
    if entry is None or entry[0] not in (4, 13) or entry[1] != 1:
        return None
    return struct.unpack(bo + "I", entry[2])[0]


def _ifd_size(entries: dict[int, Entry]) -> int:
    data = sum(len(v) + (len(v) & 1) for _, _, v in entries.values() if len(v) > 4)
    return 2 + 12 * len(entries) + 4 + data


def _write_ifd(entries: dict[int, Entry], start: int, bo: str) -> bytes:
    head = [struct.pack(bo + "H", len(entries))]
    data = bytearray()
    data_start = start + 2 + 12 * len(entries) + 4
    for tag in sorted(entries):
        typ, count, value = entries[tag]
        if len(value) <= 4:
            field = value.ljust(4, b"\0")
        else:
            field = struct.pack(bo + "I", data_start + len(data))
            data += value
            if len(value) & 1:
                data += b"\0"
        head.append(struct.pack(bo + "HHI", tag, typ, count) + field)
    head.append(struct.pack(bo + "I", 0))
    return b"".join(head) + bytes(data)


def filter_exif(raw: bytes | None) -> bytes | None:
    """Keep only the colour-space EXIF tags (values byte for byte, source byte order).

    ``raw`` is the source's EXIF block (with or without the ``Exif\\0\\0`` prefix).  Returns a TIFF
    structure (IFD0 [+ Exif IFD [+ Interop IFD]]) or ``None`` when nothing is kept or the block cannot
    be parsed.  Only the three IFDs involved are read; maker notes, GPS, thumbnails are never parsed.
    """
    if not raw:
        return None
    try:
        return _filter_exif(bytes(raw))
    except (struct.error, ValueError, IndexError, OverflowError):
        return None


def _filter_exif(tiff: bytes) -> bytes | None:
    if tiff.startswith(b"Exif\x00\x00"):
        tiff = tiff[6:]
    if tiff[:2] == b"II":
        bo = "<"
    elif tiff[:2] == b"MM":
        bo = ">"
    else:
        return None
    magic, ifd0_off = struct.unpack_from(bo + "HI", tiff, 2)
    if magic != 42:
        return None
    ifd0 = _read_ifd(tiff, bo, ifd0_off)
    keep0 = {t: e for t, e in ifd0.items() if t in _KEEP_IFD0}
    keep_exif: dict[int, Entry] = {}
    keep_interop: dict[int, Entry] = {}
    exif_off = _pointer(ifd0, _EXIF_IFD, bo)
    if exif_off is not None and exif_off != ifd0_off:
        exif = _read_ifd(tiff, bo, exif_off)
        keep_exif = {t: e for t, e in exif.items() if t in _KEEP_EXIF}
        interop_off = _pointer(exif, _INTEROP_IFD, bo)
        if interop_off is not None and interop_off not in (ifd0_off, exif_off):
            interop = _read_ifd(tiff, bo, interop_off)
            keep_interop = {t: e for t, e in interop.items() if t in _KEEP_INTEROP}
    if not (keep0 or keep_exif or keep_interop):
        return None

    def ptr(offset: int) -> Entry:
        return (4, 1, struct.pack(bo + "I", offset))

    # Layout: header | IFD0 | Exif IFD | Interop IFD.  Pointer entries are inline, so sizes are known
    # before the offsets are filled in.
    if keep_interop:
        keep_exif[_INTEROP_IFD] = ptr(0)
    if keep_exif:
        keep0[_EXIF_IFD] = ptr(0)
    off0 = 8
    off_exif = off0 + _ifd_size(keep0)
    off_interop = off_exif + (_ifd_size(keep_exif) if keep_exif else 0)
    if keep_interop:
        keep_exif[_INTEROP_IFD] = ptr(off_interop)
    if keep_exif:
        keep0[_EXIF_IFD] = ptr(off_exif)
    header = tiff[:2] + struct.pack(bo + "HI", 42, off0)
    parts = [header, _write_ifd(keep0, off0, bo)]
    if keep_exif:
        parts.append(_write_ifd(keep_exif, off_exif, bo))
    if keep_interop:
        parts.append(_write_ifd(keep_interop, off_interop, bo))
    return b"".join(parts)


def rgb_icc_profile(icc: bytes | None) -> bytes | None:
    """The ICC profile to carry: only a profile whose colour space (header bytes 16:20) is RGB.
    CMYK/grey profiles describe pixels that convert("RGB") has already converted naively."""
    if icc and len(icc) >= 128 and icc[16:20] == ICC_RGB:
        return bytes(icc)
    return None


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
        img, (ow, oh), target, box, repaired = _decode(data, settings.max_short)
        info = img.info
        exif = filter_exif(info.get("exif"))
        icc = rgb_icc_profile(info.get("icc_profile"))
        out = _to_rgb_resized(img, target, box)
    except (ImageRejected, MemoryError):
        raise
    except Exception as e:
        raise ImageRejected(f"undecodable: {describe_error(e)}") from e
    try:
        stored = save_stored(out, settings, exif, icc)
    except MemoryError:
        raise
    except Exception as e:  # not expected: sizes are checked in plan_decode
        raise ImageRejected(f"cannot encode {settings.codec_name}: {describe_error(e)}") from e
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
    if target != img.size and _is_draftable(img):
        drafted = img.draft(img.mode, target)
        if drafted is not None:
            box = drafted[1]
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != target:
        img = img.resize(target, RESAMPLE, box=box)
    return save_stored(img, settings)


def trial_decode(data: bytes, max_short: int = MAX_SHORT) -> str | None:
    """Why the encoder would refuse these bytes when decoding them, or None when it decodes them
    (repaired or not). The index runs it on the images it saw truncated, so that the encoder's
    decoding rules (the 5% rule among them) settle those before the plan and shards balance."""
    try:
        _decode(bytes(data), max_short)
    except ImageRejected as e:
        return e.reason
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - as encode_image words it
        return f"undecodable: {describe_error(e)}"
    return None
