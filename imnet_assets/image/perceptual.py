"""A 64-bit perceptual hash (pHash) of image bytes, for finding near duplicates of eval images.

pHash: the image as 8-bit grey, reduced to 32x32, its 2-D DCT-II, and one bit per coefficient of
the 8x8 lowest frequencies: set when the coefficient is above their median. Re-encoding and
resizing move few of those bits; unrelated photos differ in about half of them (bench/
phash_threshold.py measures both and chose NEAR_DUPLICATE_BITS; bench/README.md has the figures).

Cost at index time: a JPEG is decoded at reduced scale (libjpeg's DCT scaling through Pillow's
`draft`), so hashing costs a fraction of a full decode. The same function hashes raw images and
eval images, so both sides see the same reduction.

The hash is stored as a signed 64-bit integer (DuckDB BIGINT): the unsigned value minus 2**64
when its top bit is set. Hamming distance is `bit_count(xor(a, b))` either way.
"""

from __future__ import annotations

import functools
import io
import warnings
from typing import TYPE_CHECKING

from PIL import Image

from imnet_assets.image.faults import hit
from imnet_assets.image.guard import describe_error, settle

if TYPE_CHECKING:
    import numpy as np

HASH_SIDE = 32  # the grey image the DCT is taken of
LOW = 8  # LOW x LOW lowest frequencies give the 64 bits
# Largest Hamming distance (bits of 64) at which a raw image counts as a copy of an eval image:
# chosen by bench/phash_threshold.py (see bench/README.md "Perceptual hash threshold").
NEAR_DUPLICATE_BITS = 7
# A non-JPEG source is decoded in full (no draft): above this many pixels it is not hashed (it
# can still match an eval image byte for byte by sha256).
MAX_FULL_DECODE_PIXELS = 64_000_000
# A file of more bytes than the largest image the pHash decodes in full (MAX_FULL_DECODE_PIXELS of
# 16-bit RGBA, stored uncompressed: 512 MB) is not an image this hash decodes: it is not read into
# memory to be decoded (an eval set's 2 GB video or .zip; its sha256 is streamed: stages/eval_pool.py).
# The same limit holds for raw images (a video packed into a synset tar: excluded, too_many_bytes, its
# sha256 streamed: stages/index.py), so that over it neither side of decontamination is decoded and
# both match by sha256 alone. A raw image the encoder could decode and this would refuse is an
# uncompressed 16-bit image of 64-144 MP, or a JPEG of gigapixels (ImageNet's files: ~110 KB on average).
MAX_DECODED_BYTES = 8 * MAX_FULL_DECODE_PIXELS
# Why an image has no pHash (thumbnail_or_problem), the first words of the reason recorded for an eval
# image (catalog eval_images.no_phash; counted by sql/eval_summary.sql)
NO_DECODE = "does not decode"
TOO_LARGE = "too large"


def too_many_bytes(size: int) -> str:
    """Why a file of `size` bytes (over MAX_DECODED_BYTES) has no pHash: TOO_LARGE, and the detail."""
    return f"{TOO_LARGE}: {size:,} bytes, over the {MAX_DECODED_BYTES:,} of the largest image hashed; not decoded"


def _dct_matrix(n: int) -> np.ndarray:
    import numpy as np

    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


@functools.cache
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """The DCT matrix and the bit weights, made at the first hash: numpy is imported then, not
    with this module (which `imnet` imports for every command, through the index stage's
    definitions: 0.08 s of its start-up, for builds that hash nothing)."""
    import numpy as np

    return _dct_matrix(HASH_SIDE), (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def grey_thumbnail(data: bytes, side: int = HASH_SIDE) -> np.ndarray | None:
    """The image as a side x side float grey array, decoding a JPEG at reduced scale; None when
    Pillow cannot decode it (or it is too large to decode in full). A failure is the image's only
    once the known-good control image of its kind (image/guard.py) gets its thumbnail: else
    guard.MachineryFault, never a silent "no pHash" for every image (decontamination's near-copy
    matching would stop with every check green). MemoryError propagates: memory is no property of
    the image, so never a silently missing pHash (the index's scan worker exits, and the image is
    hashed again in a fresh one: stages/scan_pool.py, stages/eval_pool.py)."""
    return thumbnail_or_problem(data, side)[0]


def thumbnail_or_problem(data: bytes, side: int = HASH_SIDE) -> tuple[np.ndarray | None, str | None]:
    """grey_thumbnail, and when there is none, why not (NO_DECODE or TOO_LARGE, and the detail)."""
    try:
        grey = _grey(data, side)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - the image's, once the control passes
        settle(f"perceptual hashing ({side}x{side} grey thumbnail)", error, data,
               functools.partial(_greys, side=side), side, cut=False)
        return None, f"{NO_DECODE}: {describe_error(error)}"
    if grey is None:
        return None, f"{TOO_LARGE}: over {MAX_FULL_DECODE_PIXELS:,} pixels, not decoded in full"
    return grey, None


def _grey(data: bytes, side: int) -> np.ndarray | None:
    import numpy as np

    hit("phash", data)  # the index's test hook (image/faults.py)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                im.draft("L", (side * 2, side * 2))  # libjpeg scales by 1/2..1/8, never below 2x side
            elif im.width * im.height > MAX_FULL_DECODE_PIXELS:
                return None
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                grey = Image.fromarray(np.clip(arr / 257.0, 0, 255).astype(np.uint8), "L")
            else:
                grey = im.convert("L")
            small = grey.resize((side, side), Image.Resampling.BOX)
            return np.asarray(small, dtype=np.float64)


def _greys(data: bytes, side: int) -> str | None:
    """None when the thumbnail of these bytes is made (guard.settle's attempt)."""
    return None if _grey(data, side) is not None else "no thumbnail (larger than a full decode may be)"


def phash_of_grey(grey: np.ndarray) -> int:
    """The unsigned 64-bit pHash of a HASH_SIDE x HASH_SIDE grey array."""
    import numpy as np

    dct, weights = _tables()
    coeffs = (dct @ grey @ dct.T)[:LOW, :LOW].ravel()
    bits = coeffs > np.median(coeffs)
    return int((bits.astype(np.uint64) * weights).sum(dtype=np.uint64))


def signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def image_hash(data: bytes | memoryview) -> int | None:
    """The signed 64-bit pHash of image bytes, or None when they do not decode (guard.MachineryFault
    when a known-good image of their kind does not either: grey_thumbnail)."""
    return hash_or_problem(data)[0]


def hash_or_problem(data: bytes | memoryview) -> tuple[int | None, str | None]:
    """image_hash, and when there is none, why not (thumbnail_or_problem)."""
    grey, problem = thumbnail_or_problem(bytes(data) if isinstance(data, memoryview) else data)
    return (None, problem) if grey is None else (signed64(phash_of_grey(grey)), None)


def distance(a: int, b: int) -> int:
    """Hamming distance of two hashes (signed or unsigned)."""
    return bin((a ^ b) & ((1 << 64) - 1)).count("1")
