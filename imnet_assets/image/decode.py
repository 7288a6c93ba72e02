"""One raw image in, decoded: identified, checked against the limits, planned (JPEG draft), decoded,
repaired when its data is cut short. The decode half of SPEC.md "Output"; image/encode.py does colour,
size and the codec.

Steps 1 to 4 of the chain that image/encode.py's docstring lays out: identify without the
decompression-bomb check (``open_image``), reject by the limits (``plan_decode``, which the probe
calls too), draft a JPEG that gets downsized, decode, and repair data cut short (``decode``:
``_jpeg_ran_out`` finds a JPEG whose data ran out though it decoded without error; under
``MIN_DECODED_FRACTION`` of its rows it is rejected, as is any other image cut short: ``_filled_rows``).
"""

from __future__ import annotations

import functools
import io
import struct

from PIL import Image, ImageChops, ImageFile, JpegImagePlugin, UnidentifiedImageError

from imnet_assets.image.faults import hit
from imnet_assets.image.formats import looks_truncated, pillow_plugins, takes
from imnet_assets.image.guard import MachineryFault, describe_error, settle
from imnet_assets.image.jpeg_scans import jpeg_scan_bytes, jpeg_scans, scan_data_end, scan_script_complete
from imnet_assets.runtime.wire import REPAIR_DECODE, step

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



class ImageRejected(Exception):
    """The image must be excluded; ``reason`` is a short, deterministic, human-readable string.
    ``error``: the exception the refusal was made from, None when a rule refused the image; such a
    refusal stands only once a known-good image passed the same path (image/guard.py: settle).
    ``repairing``: it was made in the repair of data that failed to decode (``decode``'s second
    try), so the control is cut short, to take that path too (guard.settle's ``cut``)."""

    def __init__(self, reason: str, error: BaseException | None = None, repairing: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.repairing = repairing



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


def open_image(data: bytes) -> ImageFile.ImageFile:
    """Identify ``data`` exactly as ``Image.open`` does (same plugins, same order, same tolerated
    errors) but without the decompression-bomb size check, and without touching any global state
    (``Image.MAX_IMAGE_PIXELS`` or warning filters).  Header parse only; nothing is decoded.

    Raises ``UnidentifiedImageError`` (fixed message) when no plugin accepts the bytes.
    """
    fp = io.BytesIO(data)
    prefix = data[:16]
    for _fmt, factory, accept in pillow_plugins():
        if accept is not None and not takes(accept, prefix):
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except _OPEN_SKIP_ERRORS:
            continue
    raise UnidentifiedImageError("cannot identify image file")


def is_draftable(img: Image.Image) -> bool:
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
    if target != (w, h) and is_draftable(img):
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
    except UnidentifiedImageError as e:  # also what a plugin broken for every input reads as (guard.py)
        raise ImageRejected("not an image: cannot identify image file", e) from e
    except Image.DecompressionBombError as e:  # raised by a few plugins while parsing headers
        raise ImageRejected(f"too large to decode: {describe_error(e)}") from e
    except MemoryError:
        raise
    except Exception as e:  # a plugin recognised the format but its header is cut or corrupt
        raise ImageRejected(f"unreadable header: {describe_error(e)}", e) from e
    orig = img.size
    target, box = plan_decode(img, max_short)
    return img, orig, target, box


def _load_truncated(img: ImageFile.ImageFile, data: bytes) -> None:
    """``img.load()`` with Pillow's truncated-image tolerance, scoped to this call: the repair
    decode, marked as such in a pool worker (wire.step: a crash here is settled on a control that
    takes this path, cut short: stages/crash_control.py).

    Encoding runs in worker processes, one image at a time, so flipping the module flag inside
    try/finally does not leak to other code."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with step(REPAIR_DECODE):
            hit("repair", data)  # the test hook (image/faults.py)
            img.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


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
# One-bits (0xFF, stuffed) put after the last scan's data in the confirming decode: enough for the
# bit reader's look-ahead (57 bits) on the last block of a complete scan.
_ONE_BITS = b"\xff\x00" * 8
# Bytes (no 0xFF) that decode as arbitrary Huffman codes, for the progressive confirmation.
_FILLER = bytes((37 * i + 11) % 255 for i in range(64))



def _is_fill(pixel) -> bool:
    if isinstance(pixel, int):
        return pixel in _FILL_VALUES
    return all(v in _FILL_VALUES for v in pixel)




def _jpeg_ran_out(img: Image.Image, orig: tuple[int, int], data: bytes, max_short: int) -> bool | Exception:
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

    A strict decode that raises says the data ran out (libjpeg asked for more than there is): its
    exception is returned, truthy, for ``decode`` to settle (one broken for every input would
    mark every image with a grey corner repaired).
    """
    progressive = bool(img.info.get("progressive"))
    grey_corner = _is_fill(img.getpixel((img.width - 1, img.height - 1)))
    if not (progressive or grey_corner):
        return False
    walked = jpeg_scans(data)
    if walked is None:
        return False  # nothing to go on: what decoded is what there is
    if not scan_script_complete(walked.components, walked.scans, progressive):
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
            end = scan_data_end(data, start)
            patched += [data[last:end], _FILLER]
            last = end
        patched.append(data[last:])
        again_data = b"".join(patched)
    else:
        again_data = data[: scan_data_end(data, walked.starts[-1])] + _ONE_BITS
    try:
        again = _open_planned(again_data, max_short)[0]
        again.load()
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - libjpeg asked for more data than there is (decode settles it)
        return e
    return again.tobytes() != img.tobytes()


def _decoded_rows(img: Image.Image) -> int:
    """Rows of a decoded JPEG down to the last one holding a pixel that is not libjpeg's grey fill."""
    mask = None
    for band in img.split():
        not_fill = band.point(_NOT_FILL_LUT)
        mask = not_fill if mask is None else ImageChops.lighter(mask, not_fill)
    bbox = mask.getbbox() if mask is not None else None
    return bbox[3] if bbox else 0


def _check_decoded_part(img: Image.Image, error: BaseException | None = None) -> None:
    """Reject a JPEG whose data ran out so early that almost all of it is grey fill (``error``: the
    decoding error that led here, if one did: then the refusal was made in the repair)."""
    rows = _decoded_rows(img)
    if rows < MIN_DECODED_FRACTION * img.height:
        raise ImageRejected(
            f"undecodable: image data ends early, only the top {100 * rows / img.height:.1f}% decoded"
            f" (min {MIN_DECODED_FRACTION:.0%})", error, repairing=error is not None
        )


def _filled_rows(data: bytes, max_short: int, img: Image.Image) -> int:
    """Rows of a cut-short image (not JPEG: PNG, GIF, ...) its repair decode filled in. Their
    decoders leave what the data does not reach as the image memory was, zeros, which a decoded
    black row also is: so the repair decode is made again into memory holding another value, and
    the rows the same in both are the decoded ones (anywhere: an interlaced image cut short has
    every other row, or every eighth)."""
    again = _open_planned(data, max_short)[0]
    # A GIF's first frame is filled with its transparent index instead (GifImageFile.load_prepare,
    # for both decodes): not asked to here, and another value than that index put in its memory
    own, again._frame_transparency = getattr(again, "_frame_transparency", None), None
    value = 0xA5 if own == 0x5A else 0x5A
    fill = tuple([value] * len(again.getbands())) if len(again.getbands()) > 1 else value
    again.im = Image.new(again.mode, again.size, fill).im  # load_prepare keeps an image memory it finds
    _load_truncated(again, data)
    if again.mode != img.mode or again.size != img.size:
        return img.height  # a format whose decoder makes its own memory: nothing to compare
    rows, step = 0, max(1, _STRIPE_BYTES // max(1, len(img.crop((0, 0, img.width, 1)).tobytes())))
    for top in range(0, img.height, step):  # a stripe at a time: two whole copies more would double the peak
        box = (0, top, img.width, min(img.height, top + step))
        a, b = img.crop(box).tobytes(), again.crop(box).tobytes()
        row = len(a) // (box[3] - top)
        rows += box[3] - top if a == b else sum(a[i:i + row] == b[i:i + row] for i in range(0, len(a), row))
    return rows


_STRIPE_BYTES = 4 << 20  # _filled_rows compares the two decodes this many bytes at a time


def _check_filled_part(data: bytes, max_short: int, img: Image.Image, error: BaseException) -> None:
    """The 5% rule (SPEC "Failure behaviour") for a repaired image that is not a JPEG."""
    rows = _filled_rows(data, max_short, img)
    if rows < MIN_DECODED_FRACTION * img.height:
        raise ImageRejected(
            f"undecodable: image data ends early, only {100 * rows / img.height:.1f}% of its rows decoded"
            f" (min {MIN_DECODED_FRACTION:.0%})", error, repairing=True
        )


def decode(data: bytes, max_short: int, settles: bool = True):
    """Open, plan and decode.  Returns ``(img, orig_size, target, box, repaired)``.

    A repair made because something raised (the first decode, on bytes that do not look cut short;
    or ``_jpeg_ran_out``'s strict decode) stands only once the complete control of the image's kind
    decodes with no repair (guard.settle; else MachineryFault): a decoder broken for every input
    must not mark every image repaired. ``settles=False``: that control's own decode."""
    img, orig, target, box = _open_planned(data, max_short)
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as e:  # truncated / broken data: decode again, as far as the data goes
        first, first_error = e, describe_error(e)
    else:
        ran_out = is_draftable(img) and _jpeg_ran_out(img, orig, data, max_short)
        if not ran_out:
            return img, orig, target, box, False
        if settles and isinstance(ran_out, Exception):
            _settle_repair("confirming where the JPEG data ends", ran_out, data, max_short)
        _check_decoded_part(img)
        return img, orig, target, box, True
    img, orig, target, box = _open_planned(data, max_short)
    if is_draftable(img) and jpeg_scan_bytes(data) <= 0:
        # libjpeg would invent a grey image (plus a little noise) from the header alone
        raise ImageRejected(f"undecodable: no image data could be decoded ({first_error})", first, repairing=True)
    try:
        _load_truncated(img, data)
    except MemoryError:
        raise
    except Exception as e:
        raise ImageRejected(f"undecodable: {first_error}; {describe_error(e)}", e, repairing=True) from e
    # Pillow fills what it could not decode with a constant (black, or grey for JPEG); a result that
    # is a single colour carries no decoded data (e.g. a PNG whose IDAT is not zlib data, a JPEG
    # whose first scan is unusable).
    if _is_uniform(img):
        raise ImageRejected(f"undecodable: no image data could be decoded ({first_error})", first, repairing=True)
    if is_draftable(img):
        _check_decoded_part(img, first)
    else:
        _check_filled_part(data, max_short, img, first)
    if settles and not looks_truncated(data, img.format):
        _settle_repair("decoding", first, data, max_short)
    return img, orig, target, box, True


def _settle_repair(what: str, error: BaseException, data: bytes, max_short: int) -> None:
    """The repair ``error`` led to is the image's: the complete control of its kind decodes with
    no repair (guard.settle), else MachineryFault."""
    settle(f"{what} (max_short {max_short}; the image was repaired)", error, data,
           functools.partial(_decodes_whole, max_short=max_short), max_short, cut=False)


def _decodes_whole(data: bytes, max_short: int) -> str | None:
    """None when ``decode`` takes these bytes with no repair (``_settle_repair``'s attempt)."""
    try:
        repaired = decode(data, max_short, settles=False)[4]
    except ImageRejected as e:
        return e.reason
    return "decoded only by repairing it" if repaired else None


def trial_decode(data: bytes, max_short: int = MAX_SHORT) -> str | None:
    """Why the encoder would refuse these bytes when decoding them, or None when it decodes them
    (repaired or not). The index runs it on the images it saw truncated, so that the encoder's
    decoding rules (the 5% rule among them) settle those before the plan and shards balance.
    A refusal made from an exception stands only if a known-good image decodes (guard.settle);
    else guard.MachineryFault."""
    data = bytes(data)
    try:
        decode(data, max_short)
    except ImageRejected as e:
        reason, error, repairing = e.reason, e.error, e.repairing
    except (MemoryError, MachineryFault):
        raise
    except Exception as e:  # noqa: BLE001 - as encode_image words it
        reason, error, repairing = f"undecodable: {describe_error(e)}", e, False
    else:
        return None
    if error is not None:
        settle(f"decoding (max_short {max_short})", error, data, functools.partial(_decodes, max_short=max_short),
               max_short, cut=repairing or None)
    return reason


def _decodes(data: bytes, max_short: int) -> str | None:
    """None when ``decode`` takes these bytes, else the refusal (guard.settle's attempt)."""
    try:
        decode(data, max_short)
    except ImageRejected as e:
        return e.reason
    return None
