"""A cached raw release of photo-like JPEGs for the benchmarks (not a test fixture).

Per-synset tars `<wnid>.tar` holding `<wnid>_<n>.JPEG` members, as ImageNet ships them, drawn with
`photos.make_photo` at `photos.imagenet_size_mix` sizes and saved as baseline JPEG, by default at
quality 90 with 4:2:0 chroma subsampling. Only ordinary photos: no quirks, so the project's
encoder and the bare chain see exactly the same work.

Tars are generated once under `<work>/photos-q<quality>/` (in parallel processes) and reused by
every later run; `raw_root(...)` makes a release folder of the first `n` tars from hard links.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from imnet_assets.sample.photos import imagenet_size_mix, make_photo

PER_TAR = 100
_TAR_MTIME = 1318550400


def wnid(i: int) -> str:
    return f"n{1_440_764 + 7919 * i:08d}"


def _make_tar(path: str, index: int, images: int, quality: int, seed: int, subsampling: int = 2) -> int:
    ss = np.random.SeedSequence([seed, index])
    numbers = np.sort(np.random.default_rng(ss).choice(60_000, images, replace=False) + 1).tolist()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for slot, n in enumerate(numbers):
            g = np.random.default_rng(np.random.SeedSequence([seed, index, slot + 1]))
            w, h = imagenet_size_mix(g)
            out = io.BytesIO()
            make_photo(w, h, g).save(out, "JPEG", quality=quality, subsampling=subsampling)
            info = tarfile.TarInfo(f"{wnid(index)}_{n}.JPEG")
            info.size = out.tell()
            info.mtime = _TAR_MTIME
            info.mode = 0o644
            info.uname = info.gname = "root"
            out.seek(0)
            tf.addfile(info, out)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
    return len(numbers)


def ensure_photos(work: Path, tars: int, quality: int = 90, seed: int = 0, workers: int | None = None,
                  log=print, subsampling: int = 2) -> list[Path]:
    """The first `tars` tars of the cached photo release (generated when missing). `subsampling` is
    Pillow's JPEG chroma subsampling: 2 is 4:2:0 (the default), 0 is 4:4:4."""
    folder = Path(work) / (f"photos-q{quality}-s{seed}" + ("" if subsampling == 2 else f"-sub{subsampling}"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{wnid(i)}.tar" for i in range(tars)]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if todo:
        log(f"generating {len(todo) * PER_TAR} photos ({len(todo)} tars) under {folder} ...")
        started = time.perf_counter()
        with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
            list(pool.map(_make_tar, [str(paths[i]) for i in todo], todo, [PER_TAR] * len(todo),
                          [quality] * len(todo), [seed] * len(todo), [subsampling] * len(todo)))
        log(f"  done in {time.perf_counter() - started:.0f} s")
    return paths


def raw_root(work: Path, tars: list[Path], name: str) -> Path:
    """A raw release folder holding exactly `tars` (hard links; copies across file systems)."""
    root = Path(work) / name
    want = {p.name: p for p in tars}
    if root.exists():
        have = {p.name for p in root.iterdir()}
        if have == set(want):
            return root
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for n, src in want.items():
        try:
            os.link(src, root / n)
        except OSError:
            shutil.copy2(src, root / n)
    return root


def read_members(tar: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf if m.isreg()]
