"""WebP quality x method (or, with --codec jpeg, JPEG quality): output size against the source JPEGs,
encode time and fidelity.

    .venv/bin/python bench/webp_settings.py [--work /tmp/imnet-bench] [--images 200]
                                            [--qualities 80,85,90,95] [--methods 4,6] [--codec jpeg]

Every image of the cached photo release (photo_release.py: JPEG sources, q90 4:2:0 unless
--source-quality / --source-subsampling say otherwise, at an ImageNet-like size mix) goes through the project's `encode_image` once per setting; the settings are taken in a
rotating order for every image, so a busy machine slows them all alike. Printed per setting:
WebP bytes / source JPEG bytes over the whole set (the release card says the WebP release is ~56%
of the JPEG release), ms per image (CPU time of the encode; wall time beside it), and PSNR of the
decoded WebP against the pixels that were encoded (RGB after resize), with ms relative to the
project default.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import photo_release  # noqa: E402

from imnet_assets.image.decode import ImageRejected
from imnet_assets.image.encode import EncodeSettings, encode_image
from imnet_assets.settings import DEFAULT_WEBP_METHOD, DEFAULT_WEBP_QUALITY, Settings  # noqa: E402

CARD_RATIO = 0.56


def reference_pixels(data: bytes) -> np.ndarray:
    """The RGB pixels the encoder hands to WebP (decode with draft, RGB, resize), via a lossless
    round trip through the bare chain's steps."""
    from imnet_assets.image.decode import is_draftable, open_image, target_size
    from imnet_assets.image.encode import RESAMPLE

    img = open_image(data)
    target = target_size(img.width, img.height)
    box = None
    if target != img.size and is_draftable(img):
        drafted = img.draft(img.mode, target)
        if drafted is not None:
            box = drafted[1]
    img = img.convert("RGB")
    if img.size != target:
        img = img.resize(target, RESAMPLE, box=box)
    return np.asarray(img, dtype=np.float32)


def psnr(ref: np.ndarray, webp: bytes) -> float:
    with Image.open(io.BytesIO(webp)) as im:
        got = np.asarray(im.convert("RGB"), dtype=np.float32)
    mse = float(np.mean((ref - got) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/imnet-bench"))
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--qualities", default="80,85,90,95")
    p.add_argument("--methods", default="4,6")
    p.add_argument("--codec", default="webp", choices=["webp", "jpeg"],
                   help="jpeg: a JPEG release's encoder (issue 25; --methods is ignored, the default is quality 90)")
    p.add_argument("--source-quality", type=int, default=90, help="JPEG quality of the source photos")
    p.add_argument("--source-subsampling", type=int, default=2, choices=[0, 1, 2],
                   help="chroma subsampling of the sources: 2 = 4:2:0, 0 = 4:4:4")
    p.add_argument("--raw", type=Path, help="use the first --images members of the <wnid>.tar files in "
                   "this folder (e.g. a sample of the real release) instead of generated photos")
    args = p.parse_args()
    if args.raw:
        tars = sorted(args.raw.glob("n*.tar"))
        label = f"members of {args.raw}"
    else:
        tars = photo_release.ensure_photos(args.work.resolve(), -(-args.images // photo_release.PER_TAR),
                                           quality=args.source_quality, subsampling=args.source_subsampling)
        label = f"JPEG q{args.source_quality} photos (subsampling {args.source_subsampling})"
    sources = []
    for t in tars:
        sources += [d for _n, d in photo_release.read_members(t)][: args.images - len(sources)]
        if len(sources) >= args.images:
            break
    kept = []
    for data in sources:  # real releases hold files the encoder excludes; they are not compared
        try:
            encode_image(data)
            kept.append(data)
        except ImageRejected:
            pass
    if len(kept) < len(sources):
        print(f"{len(sources) - len(kept)} of {len(sources)} sources are excluded by the encoder; left out")
    sources = kept
    methods = args.methods.split(",") if args.codec == "webp" else [str(DEFAULT_WEBP_METHOD)]
    grid = [EncodeSettings(quality=int(q), method=int(m), codec=args.codec)
            for q in args.qualities.split(",") for m in methods]
    default = EncodeSettings(quality=DEFAULT_WEBP_QUALITY if args.codec == "webp" else Settings.jpeg_quality,
                             method=DEFAULT_WEBP_METHOD, codec=args.codec)
    if default not in grid:
        grid.append(default)
    print(f"{len(sources)} {label}, {sum(map(len, sources)) / len(sources) / 1e3:.0f} kB average; "
          f"{len(grid)} settings", flush=True)
    out_bytes = {s: 0 for s in grid}
    cpu = {s: 0.0 for s in grid}
    wall = {s: 0.0 for s in grid}
    quality = {s: [] for s in grid}
    for i, data in enumerate(sources):
        try:
            ref = reference_pixels(data)
        except OSError:  # e.g. a truncated source the encoder repairs: no PSNR for it
            ref = None
        order = grid[i % len(grid):] + grid[: i % len(grid)]
        for s in order:
            c0, t0 = time.process_time(), time.perf_counter()
            enc = encode_image(data, s)
            cpu[s] += time.process_time() - c0
            wall[s] += time.perf_counter() - t0
            out_bytes[s] += len(enc.webp)
            if ref is not None and ref.shape[:2] == (enc.height, enc.width) and ref.ndim == 3:
                quality[s].append(psnr(ref, enc.webp))
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{len(sources)}", flush=True)
    src_bytes = sum(map(len, sources))
    n = len(sources)
    print(f"\n$ {shlex.join([os.path.relpath(sys.executable), *sys.argv])}\n")
    head = ["quality", "method", f"{args.codec}/source bytes", "vs card 0.56", "ms/img (cpu)", "ms/img (wall)",
            "time vs default", "PSNR dB (mean)"]
    rows = []
    for s in grid:
        ratio = out_bytes[s] / src_bytes
        rows.append([
            str(s.quality), str(s.method) + (" *" if s == default else ""), f"{ratio:.3f}",
            f"{ratio / CARD_RATIO:.2f}x", f"{cpu[s] * 1e3 / n:.1f}", f"{wall[s] * 1e3 / n:.1f}",
            f"{cpu[s] / cpu[default]:.2f}", f"{np.mean(quality[s]):.2f}",
        ])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("\n* project default (settings.py)")


if __name__ == "__main__":
    main()
