"""Real image bytes made with Pillow (and one hand-assembled huge JPEG) for the core tests."""

from __future__ import annotations

import hashlib
import io
import struct
import types
import uuid
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from tests.conftest import environ
from tests.s3server import MotoS3


def to_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def smooth_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: gradients plus mild noise (compresses and resamples like a photo)."""
    rng = np.random.default_rng(seed)
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    arr = np.empty((height, width, 3), np.float32)
    arr[..., 0] = 255 * x / max(width - 1, 1)
    arr[..., 1] = 255 * y / max(height - 1, 1)
    arr[..., 2] = 127.5 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)
    arr += rng.integers(-6, 7, (height, width, 3), dtype=np.int8)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def palette(img: Image.Image, colors: int = 64) -> Image.Image:
    """Adaptive palette without dithering (smooth, so lossy WebP stays close to it)."""
    return img.quantize(colors, dither=Image.Dither.NONE)


def decode(webp: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(webp))
    img.load()
    return img


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size, (a.size, b.size)
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)


def flat_grey_jpeg(width: int, height: int) -> bytes:
    """A real, valid baseline greyscale JPEG of any size (multiple of 8) filled with grey 128,
    assembled without allocating the image: every 8x8 block is "DC diff 0, EOB" (6 bits with the
    standard Huffman tables), i.e. the 3-byte pattern 28 A2 8A per 4 blocks."""
    assert width % 8 == 0 and height % 8 == 0 and (width // 8 * height // 8) % 4 == 0
    small = to_bytes(Image.new("L", (32, 8), 128), "JPEG", quality=50)  # 4 blocks -> 28 A2 8A
    sos = small.index(b"\xff\xda")
    scan_start = sos + 2 + int.from_bytes(small[sos + 2 : sos + 4], "big")
    assert small[scan_start:] == b"\x28\xa2\x8a\xff\xd9"
    header = bytearray(small[:scan_start])
    sof = header.index(b"\xff\xc0")
    header[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    blocks = (width // 8) * (height // 8)
    return bytes(header) + b"\x28\xa2\x8a" * (blocks // 4) + b"\xff\xd9"


def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def icc_with_colour_space(space: bytes) -> bytes:
    """A profile whose header declares another colour space (e.g. b"CMYK", b"GRAY")."""
    icc = bytearray(srgb_icc())
    icc[16:20] = space
    return bytes(icc)


@pytest.fixture(scope="session")
def huge_jpeg() -> bytes:
    return flat_grey_jpeg(14000, 14000)


@pytest.fixture(scope="session")
def imgs():
    """The helpers above, as a fixture (works whether or not tests/ is a package)."""
    return types.SimpleNamespace(
        to_bytes=to_bytes,
        smooth_rgb=smooth_rgb,
        palette=palette,
        decode=decode,
        mean_abs_diff=mean_abs_diff,
        png_chunk=png_chunk,
        png_header=png_header,
        flat_grey_jpeg=flat_grey_jpeg,
        srgb_icc=srgb_icc,
        icc_with_colour_space=icc_with_colour_space,
    )


@pytest.fixture
def raw(tmp_path):
    """Two raw tars of real JPEGs (test_shard.SOURCES), and slice rows for all their members (not yet
    ordered): the shard tests' and the commit-record tests' raw release."""
    from tests.core.test_shard import SOURCES, jpeg, write_raw_tar
    root = tmp_path / "raw"
    root.mkdir()
    rows = []
    for label, (wnid, images) in enumerate(sorted(SOURCES.items())):
        members = [(f"{wnid}_{n}.JPEG", jpeg(w, h, n)) for n, w, h in images]
        where = write_raw_tar(root / f"{wnid}.tar", members)
        for (name, data), (_, w, h) in zip(members, images):
            offset, size = where[name]
            rows.append([name[:-5], wnid, label, f"{wnid}.tar", name, offset, size,
                         hashlib.sha256(data).hexdigest(), w, h, False])
    return types.SimpleNamespace(root=root, rows=rows)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server of the module's own, one fresh bucket, and its variables in the environment
    (storage retries held to 10 s): (server, client, bucket), for the byte-limit tests."""
    with MotoS3(secret=f"limits-{uuid.uuid4().hex}") as server:
        client = server.client()
        bucket = f"limits-{uuid.uuid4().hex[:12]}"
        MotoS3.fresh_buckets(client, bucket)
        with environ(**server.env(), IMNET_STORAGE_RETRY_SECONDS="10"):
            yield server, client, bucket
