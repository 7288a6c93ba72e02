"""Choose the perceptual hash threshold for eval-set decontamination by measurement.

For N photo-like images (core/photos.make_photo at ImageNet's size mix, saved as JPEG q90, as
bench/photo_release.py makes them) it measures the Hamming distance between each image's 64-bit
hash and the hash of edited copies (re-encoded at lower JPEG quality, resized down, resized and
re-encoded, WebP, PNG, greyscale), and between unrelated images (every pair). It does so for
pHash (image/perceptual.py, what the index uses) and, for comparison, a 64-bit dHash. A threshold
is good when every copy is at or under it and no unrelated pair is.

It also times the per-image hashing cost at index time: JPEG draft (libjpeg's DCT scaling to at
least 64x64, 1/4 or 1/8 for most photos) vs a full decode, next to sha256 and the header probe of
the same bytes (what the index already pays per image).

    python bench/phash_threshold.py [--images 300]

Prints a table; bench/README.md "Perceptual hash threshold" records a run.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time

import numpy as np
from PIL import Image

from imnet_assets.image import perceptual
from imnet_assets.sample.photos import imagenet_size_mix, make_photo


def _jpeg(im: Image.Image, q: int) -> bytes:
    out = io.BytesIO()
    im.convert("RGB").save(out, "JPEG", quality=q)
    return out.getvalue()


def _resized(im: Image.Image, factor: float) -> Image.Image:
    w, h = max(8, round(im.width * factor)), max(8, round(im.height * factor))
    return im.resize((w, h), Image.Resampling.LANCZOS)


def _short_side(im: Image.Image, side: int) -> Image.Image:
    s = side / min(im.size)
    return im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BICUBIC)


def edits(src: bytes) -> dict[str, bytes]:
    im = Image.open(io.BytesIO(src))
    im.load()
    webp, png = io.BytesIO(), io.BytesIO()
    im.save(webp, "WEBP", quality=80)
    im.save(png, "PNG")
    return {
        "jpeg q75": _jpeg(im, 75),
        "jpeg q50": _jpeg(im, 50),
        "jpeg q30": _jpeg(im, 30),
        "resize 1/2 q85": _jpeg(_resized(im, 0.5), 85),
        "resize 1/4 q85": _jpeg(_resized(im, 0.25), 85),
        "short side 256 q75": _jpeg(_short_side(im, 256), 75),
        "upscale x1.5 q90": _jpeg(_resized(im, 1.5), 90),
        "webp q80": webp.getvalue(),
        "png": png.getvalue(),
        "grey q90": _jpeg(im.convert("L"), 90),
    }


def dhash(data: bytes) -> int | None:
    """64-bit dHash: 9x8 grey, one bit per horizontally adjacent pair (comparison only)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("L", (18, 16))
        a = np.asarray(im.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int32)
    bits = (a[:, 1:] > a[:, :-1]).ravel()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def full_decode_hash(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as im:
        grey = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    return perceptual.phash_of_grey(grey)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sources = []
    for i in range(args.images):
        g = np.random.default_rng(np.random.SeedSequence([args.seed, i]))
        w, h = imagenet_size_mix(g)
        sources.append(_jpeg(make_photo(w, h, g), 90))
    print(f"{len(sources)} photos, {sum(map(len, sources)) / len(sources) / 1e3:.0f} KB each on average")

    for name, fn in (("pHash", lambda d: perceptual.image_hash(d)), ("dHash", dhash)):
        base = [fn(s) for s in sources]
        per_edit: dict[str, list[int]] = {}
        for s, h in zip(sources, base):
            for edit, data in edits(s).items():
                per_edit.setdefault(edit, []).append(perceptual.distance(h, fn(data)))
        arr = np.array(base, dtype=object)
        unrelated = [perceptual.distance(arr[i], arr[j]) for i in range(len(arr)) for j in range(i + 1, len(arr))]
        copies = [d for v in per_edit.values() for d in v]
        print(f"\n{name}: distance of edited copies (bits of 64): edit, mean, p99, max")
        for edit, ds in per_edit.items():
            print(f"  {edit:20s} {np.mean(ds):5.2f} {np.percentile(ds, 99):5.1f} {max(ds):3d}")
        u = np.array(unrelated)
        print(f"  copies overall: max {max(copies)}; unrelated pairs ({len(u)}): min {u.min()}, p0.1 "
              f"{np.percentile(u, 0.1):.1f}, p1 {np.percentile(u, 1):.1f}, median {np.median(u):.0f}")
        for t in range(0, 13):
            missed = sum(d > t for d in copies) / len(copies)
            false = int((u <= t).sum())
            print(f"  threshold {t:2d}: copies missed {missed:6.1%}, unrelated pairs within {false}")

    # index-time cost per image
    reps = max(1, 2000 // len(sources))
    from imnet_assets.image.probe import probe_image

    for label, fn in (("sha256", lambda d: hashlib.sha256(d).digest()),
                      ("probe (index, today)", probe_image),
                      ("pHash, JPEG draft", perceptual.image_hash),
                      ("pHash, full decode", full_decode_hash)):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            for s in sources:
                fn(s)
        n = reps * len(sources)
        print(f"{label:24s} {(time.perf_counter() - t0) / n * 1e3:6.2f} ms wall, "
              f"{(time.process_time() - c0) / n * 1e3:6.2f} ms CPU per image")


if __name__ == "__main__":
    main()
