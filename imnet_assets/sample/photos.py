"""Synthetic photo-like images for the sample raw release and benchmarks.

`make_photo` draws smooth gradients, a few soft blobs, short strokes (edges), region-dependent
multi-scale texture and sensor-like grain, so JPEG sizes and decode/encode costs are close to
real photos rather than flat colour: about 4.3 bits per pixel (~100 KB) for a 500x375 JPEG at
quality 90, falling to ~2 bpp for multi-megapixel images, as with real camera photos. A
3000x2000 photo takes ~0.3 s. `imagenet_size_mix` draws image sizes in ImageNet's proportions.

Everything is deterministic given the random generator's state. No Dagster imports here.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageChops, ImageDraw

__all__ = ["as_numpy_rng", "imagenet_size_mix", "make_photo"]

Rng = random.Random | np.random.Generator

# Reference area: the typical ImageNet image (500x375).
_REF_AREA = 500 * 375
# Side of the coarse canvas the smooth structure is drawn on before upscaling.
_COARSE = 96
# Texture amplitudes (grey levels): fine grain, chroma noise, strokes per 500x375 image and the
# (downscale factor, amplitude) levels of the texture pyramid. Tuned for ~100 KB at 500x375 q90.
_FINE_AMP = 22.0
_CHROMA_AMP = 14.0
_STROKES = 350
_SQRT12 = math.sqrt(12.0)
_LEVELS = ((16, 12.0), (8, 16.0), (4, 20.0), (2, 26.0))


def as_numpy_rng(rng: Rng) -> np.random.Generator:
    """A numpy Generator for `rng`: itself when it already is one, else seeded from it."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, random.Random):
        return np.random.default_rng(rng.getrandbits(64))
    raise TypeError(f"expected random.Random or numpy.random.Generator, got {type(rng).__name__}")


def _resize_f(arr: np.ndarray, width: int, height: int, resample: int) -> np.ndarray:
    """Resize a 2-D float32 array with Pillow (mode F), which is fast and deterministic."""
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), mode="F")
    return np.array(img.resize((width, height), resample), dtype=np.float32)


def _detail(width: int, height: int) -> float:
    """Texture strength: full for ImageNet-sized images, lower per pixel for large ones."""
    area = max(1, width * height)
    return float(np.clip((_REF_AREA / area) ** 0.3, 0.3, 1.15))


def make_photo(width: int, height: int, rng: Rng) -> Image.Image:
    """An RGB image of `width` x `height` that compresses like a real photo."""
    if width < 1 or height < 1:
        raise ValueError(f"bad size {width}x{height}")
    g = as_numpy_rng(rng)
    scale = max(width, height) / _COARSE
    cw = max(2, min(width, round(width / scale)))
    ch = max(2, min(height, round(height / scale)))

    yy, xx = np.mgrid[0:ch, 0:cw].astype(np.float32)
    yy /= max(ch - 1, 1)
    xx /= max(cw - 1, 1)

    # Background: two colours along a random direction, plus a vertical "sky/ground" shift.
    c0 = g.uniform(20, 235, 3).astype(np.float32)
    c1 = g.uniform(20, 235, 3).astype(np.float32)
    ang = float(g.uniform(0, 2 * np.pi))
    t = math.cos(ang) * xx + math.sin(ang) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    canvas = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
    horizon = float(g.uniform(0.3, 0.7))
    ground = g.uniform(-50, 50, 3).astype(np.float32)
    step = 1.0 / (1.0 + np.exp(-(yy - horizon) * float(g.uniform(8, 30))))
    canvas += ground[:, None, None] * step

    # Low-frequency colour variation (lighting, large structures): a few random smooth waves.
    waves = g.uniform([0.5, -np.pi, 0], [4.0, np.pi, 2 * np.pi], (4, 3))
    amps = g.normal(0, 18, (4, 3)).astype(np.float32)
    for (freq, direction, phase), amp in zip(waves.tolist(), amps):
        wave = np.cos((math.cos(direction) * xx + math.sin(direction) * yy) * (freq * math.pi) + phase)
        canvas += amp[:, None, None] * wave

    # A few soft blobs / ellipses (objects), some with a sharp-ish edge.
    for _ in range(int(g.integers(3, 9))):
        cx, cy, rx, ry, rot, sharp, opacity = (
            float(v)
            for v in g.uniform([-0.1, -0.1, 0.04, 0.04, 0, 1.5, 0.5], [1.1, 1.1, 0.35, 0.35, np.pi, 12, 0.95])
        )
        cos, sin = np.float32(np.cos(rot)), np.float32(np.sin(rot))
        dx, dy = xx - np.float32(cx), yy - np.float32(cy)
        u = (dx * cos + dy * sin) * np.float32(1 / rx)
        v = (dy * cos - dx * sin) * np.float32(1 / ry)
        d = u * u + v * v
        d -= 1.0
        d *= np.float32(sharp)
        np.minimum(d, 60.0, out=d)
        alpha = np.float32(opacity) / (1.0 + np.exp(d))
        colour = g.uniform(0, 255, 3).astype(np.float32)
        shade = 1.0 - 0.35 * np.clip(u * 0.5 + v * 0.5, -1, 1)  # simple lighting across the blob
        canvas += (colour[:, None, None] * shade - canvas) * alpha

    # Where texture lives (foliage, fur, fabric) versus smooth regions (sky, walls).
    mask_grid = g.uniform(0, 1, (int(g.integers(3, 7)), int(g.integers(3, 7)))).astype(np.float32)
    mask_c = np.clip(_resize_f(mask_grid, cw, ch, Image.BICUBIC) * 1.6 - 0.3, 0.1, 1.0)

    # Everything but the fine grain is built at a working resolution of half the size (a
    # quarter of the pixels) and upscaled once at the end: fast, and photo-like in spectrum.
    div = 2 if min(width, height) >= 48 else 1
    ww, wh = -(-width // div), -(-height // div)
    detail = _detail(width, height)

    # Texture at several scales (1/f-like), modulated by the mask: a pyramid where each level is
    # upscaled and added to the next finer one, ending at the working resolution.
    tex = None
    for level_div, amp in _LEVELS:
        tw, th = max(1, -(-width // level_div)), max(1, -(-height // level_div))
        if tex is not None:
            tex = _resize_f(tex, tw, th, Image.BICUBIC)
        level = g.random((th, tw), dtype=np.float32)  # uniform, unit variance after scaling
        level -= 0.5
        level *= amp * detail * _SQRT12
        tex = level if tex is None else tex + level
    if tex.shape != (wh, ww):
        tex = _resize_f(tex, ww, wh, Image.BICUBIC)
    tex *= _resize_f(mask_c, ww, wh, Image.BILINEAR)

    # The smooth structure at working resolution, plus the luminance texture and some chroma
    # (uniform integer noise: cheaper than normal draws, and the sum is bell-shaped anyway).
    coarse = np.clip(canvas, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    base = Image.fromarray(np.ascontiguousarray(coarse), mode="RGB").resize((ww, wh), Image.BILINEAR)
    chroma_amp = max(1, round(_CHROMA_AMP * detail * 1.7))
    work = g.integers(-chroma_amp, chroma_amp, (wh, ww, 3), dtype=np.int16, endpoint=True).astype(np.float32)
    work += tex[..., None]
    work += np.asarray(base)
    np.clip(work, 0, 255, out=work)
    photo = Image.fromarray(work.astype(np.uint8), mode="RGB")

    # Edges: short strokes (twigs, grass, hair, outlines) drawn in the textured regions, in
    # colours close to the local ones.
    n_strokes = int(_STROKES * min(4.0, width * height / _REF_AREA) * detail)
    if n_strokes:
        xs = g.uniform(0, 1, n_strokes)
        ys = g.uniform(0, 1, n_strokes)
        ix = (xs * (cw - 1)).astype(np.intp)
        iy = (ys * (ch - 1)).astype(np.intp)
        keep = mask_c[iy, ix] > g.uniform(0, 1, n_strokes)
        diag = float(np.hypot(ww, wh))
        angles = g.uniform(0, np.pi, n_strokes)
        lengths = g.uniform(0.005, 0.06, n_strokes) * diag
        widths = g.integers(1, max(2, round(min(ww, wh) / 250)) + 1, n_strokes)
        shifts = g.normal(0, 50, (n_strokes, 1)) + g.normal(0, 12, (n_strokes, 3))
        colours = np.clip(canvas[:, iy, ix].T + shifts, 0, 255).astype(np.uint8)
        x0, y0 = xs * ww, ys * wh
        x1, y1 = x0 + np.cos(angles) * lengths, y0 + np.sin(angles) * lengths
        lines = np.stack([x0, y0, x1, y1], axis=1)[keep].tolist()
        draw = ImageDraw.Draw(photo)
        for line, colour, w in zip(lines, colours[keep].tolist(), widths[keep].tolist()):
            draw.line(line, fill=tuple(colour), width=w)

    if (ww, wh) != (width, height):
        photo = photo.resize((width, height), Image.BILINEAR)

    # Fine grain at full resolution (sensor noise, pixel-level texture): uniform, drawn as uint8.
    fine_amp = max(1, round(_FINE_AMP * detail))
    fine = g.integers(128 - fine_amp, 128 + fine_amp, (height, width), dtype=np.uint8, endpoint=True)
    fine_img = Image.fromarray(fine, mode="L")
    return ImageChops.add(photo, Image.merge("RGB", (fine_img, fine_img, fine_img)), 1.0, -128)


# (probability, size) of the typical class: ImageNet's most common shapes.
_TYPICAL = (
    (0.34, (500, 375)),
    (0.20, (500, 333)),
    (0.10, (375, 500)),
    (0.06, (500, 334)),
    (0.05, (333, 500)),
    (0.05, (500, 500)),
    (0.04, (400, 300)),
)


def _choice_index(rng: Rng, weights: list[float]) -> int:
    r = float(rng.random()) * sum(weights)
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if r < acc:
            return i
    return len(weights) - 1


def _uniform_int(rng: Rng, lo: int, hi: int) -> int:
    """Integer in [lo, hi] using only `rng.random()`, so both rng kinds agree in behaviour."""
    return lo + min(hi - lo, int(float(rng.random()) * (hi - lo + 1)))


def imagenet_size_mix(rng: Rng) -> tuple[int, int]:
    """Draw a (width, height) from an ImageNet-like mix of sizes.

    About 87% typical (500x375, 500x333, 375x500, ...), 8.5% medium (800-1600 px long side),
    1.5% large (long side 1700 to ~3000 px) and 3% small (150-300 px).
    """
    kinds = [0.87, 0.085, 0.015, 0.03]
    kind = _choice_index(rng, kinds)
    if kind == 0:
        i = _choice_index(rng, [p for p, _ in _TYPICAL])
        return _TYPICAL[i][1]
    if kind == 1:
        long_side = _uniform_int(rng, 800, 1600)
        ratio = (4 / 3, 3 / 2, 1.0, 16 / 9)[_choice_index(rng, [0.5, 0.3, 0.1, 0.1])]
    elif kind == 2:
        long_side = _uniform_int(rng, 1700, 3000)
        ratio = (4 / 3, 3 / 2)[_choice_index(rng, [0.6, 0.4])]
    else:
        long_side = _uniform_int(rng, 150, 300)
        ratio = (4 / 3, 1.0, 3 / 2)[_choice_index(rng, [0.5, 0.3, 0.2])]
    short_side = max(1, round(long_side / ratio))
    if float(rng.random()) < 0.7:
        return long_side, short_side
    return short_side, long_side
