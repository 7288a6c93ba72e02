"""How many encode workers one shard run can feed: the coordinating process's CPU per image.

    .venv/bin/python bench/scaleup.py [--work /tmp/imnet-bench] [--images 400] [--workers 2]
                                      [--rounds 3] [--section a,b,c]

(b) A real shard run (`shard.build_shard`, IMNET_WORKERS=--workers, the shared worker pool
    already started): CPU seconds of the coordinating process (getrusage of this process: the
    writing thread and the pool's dispatcher thread) and of each worker process (/proc/<pid>/stat,
    before and after), per image; the part of the run spent in the shard check (read-back).
(a) The same shard with the codec replaced by a null codec that returns the WebP the real run
    produced for that source (looked up by the source's sha256): the pipeline's ceiling in images/s
    and the coordinator's CPU per image when encoding costs nothing.
(c) From (a)/(b), measured in the same run: how many workers one shard run can feed
    (worker CPU per image / coordinator CPU per image; goal >= 128), and the projected share of N
    cores kept encoding by shard runs of 12,843 images at 16, 64 and 128 cores: min(1, feedable / N)
    when shard runs overlap (`imnet build` running several: the next one encodes while one checks),
    and that times encode wall / (encode wall + the tail after the encode) when they run back to
    back (the tail: manifest, the check's read-back, parallel in the pool up to one chunk per 16 MiB).
(d) The fraction of the cores kept encoding over a multi-shard `imnet build` (4 shards x 300
    photos, the automatic --parallel) against the bare chain in the same run: what
    bench/scaleup_build.py measures (its own options: shards, images, --parallel values), run
    here with --rounds. Not in the default sections (~5 min); `--section b,a,c,d` runs all.

Sections run in the order given; (c) needs (a) and (b) of the same run. Prints a table of ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import resource
import shlex
import statistics
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpuload import proc_cpu  # noqa: E402
from encode import SHARD, release  # noqa: E402
from report import met, print_table, spread  # noqa: E402

from imnet_assets.image.encode import Encoded, EncodeSettings
from imnet_assets.release.verify import CHECK_CHUNK_BYTES
from imnet_assets.runtime import workerpool
from imnet_assets.stages.shard import build_shard

REAL_SHARD = 12_843  # images in one shard of the real release (13,151,276 / 1,024)


class NullCodec:
    """encode_image's stand-in: the WebP a real run produced for these source bytes (by sha256),
    loaded once per worker process from a pickle file."""

    _table: dict | None = None

    def __init__(self, path: str):
        self.path = path

    def __call__(self, data: bytes, _settings) -> Encoded:
        if NullCodec._table is None:
            with open(self.path, "rb") as f:
                NullCodec._table = pickle.load(f)
        return NullCodec._table[hashlib.sha256(data).hexdigest()]



def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def shard_run(settings, enc: EncodeSettings, workers: int, encode=None) -> dict:
    """One build_shard, with the CPU of the coordinator and of each pool worker, per image."""
    pool = workerpool.shared_pool(workers)
    deadline = time.monotonic() + 60
    while len(pool.pids()) != workers and time.monotonic() < deadline:  # started (the first time)
        time.sleep(0.05)
    pids = pool.pids()
    w0 = {p: proc_cpu(p) for p in pids}
    c0, t0 = own_cpu(), time.perf_counter()
    res = build_shard(out_root=settings.out_root, raw_root=settings.raw_root, shard_key=SHARD,
                      shard_name=settings.shard_name(SHARD), settings=enc, workers=workers, run_id="scaleup",
                      encode=encode, decode_every=16)
    wall, coord = time.perf_counter() - t0, own_cpu() - c0
    if res.problems:
        raise SystemExit(f"the shard check failed: {res.problems[:3]}")
    if pool.pids() != pids:
        raise SystemExit("a worker was replaced during the run: its CPU is not accounted")
    worker = sum(proc_cpu(p) - w0[p] for p in pids)
    n = res.num_samples
    return {"n": n, "wall": wall, "coord_ms": coord * 1e3 / n, "worker_ms": worker * 1e3 / n,
            "images_s": n / wall, "check_s": res.check_seconds, "encode_s": res.seconds, "bytes": res.bytes}


def webp_table(settings, path: Path) -> None:
    """source sha256 -> Encoded, from the shard the real run wrote (its .json names the source)."""
    table = {}
    with tarfile.open(Path(settings.out_root) / settings.shard_name(SHARD)) as tf:
        parts: dict = {}
        for m in tf:
            stem, _, ext = m.name.partition(".")
            parts[ext] = tf.extractfile(m).read()
            if ext == "webp":
                meta = json.loads(parts["json"])
                table[meta["source_sha256"]] = Encoded(parts["webp"], meta["width"], meta["height"],
                                                       meta["orig_width"], meta["orig_height"], False)
                parts = {}
    path.write_bytes(pickle.dumps(table, protocol=5))


def section_b(args, enc, state) -> list[list[str]]:
    settings = release(args.work, args.images, enc.quality, enc.method)
    state["settings"] = settings
    shard_run(settings, enc, args.workers)  # warm up: the pool, page cache
    runs = [shard_run(settings, enc, args.workers) for _ in range(args.rounds)]
    state["real"] = runs
    n = runs[0]["n"]
    return [
        [f"real shard run ({n} images, {args.workers} workers): images/s", spread([r["images_s"] for r in runs], 1), "", ""],
        ["  coordinator CPU per image, ms", spread([r["coord_ms"] for r in runs], 3), "", ""],
        ["  worker CPU per image (read, hash, encode, pack, sampled decode), ms",
         spread([r["worker_ms"] for r in runs], 1), "", ""],
        ["  coordinator / worker CPU per image", spread([r["coord_ms"] / r["worker_ms"] for r in runs], 4),
         f"<= {1 / 128:.4f}", met(statistics.median([r["coord_ms"] / r["worker_ms"] for r in runs]) <= 1 / 128)],
        ["  shard check (read-back after commit), share of the run's wall",
         spread([r["check_s"] / r["wall"] for r in runs], 3), "", ""],
    ]


def section_a(args, enc, state) -> list[list[str]]:
    import scaleup  # this module under its importable name, so the workers can unpickle NullCodec

    settings = state.get("settings") or release(args.work, args.images, enc.quality, enc.method)
    if "real" not in state:
        shard_run(settings, enc, args.workers)
    table = args.work / "scaleup-null-webps.pickle"
    webp_table(settings, table)
    codec = scaleup.NullCodec(str(table))
    shard_run(settings, enc, args.workers, codec)  # warm up: every worker loads the table
    runs = [shard_run(settings, enc, args.workers, codec) for _ in range(args.rounds)]
    state["null"] = runs
    return [
        [f"null codec ({args.workers} workers): pipeline ceiling, images/s", spread([r["images_s"] for r in runs], 0), "", ""],
        ["  coordinator CPU per image, ms", spread([r["coord_ms"] for r in runs], 3), "", ""],
        ["  worker CPU per image (read, hash, pack, sampled decode), ms", spread([r["worker_ms"] for r in runs], 3), "", ""],
    ]


def section_c(args, enc, state) -> list[list[str]]:
    if "real" not in state or "null" not in state:
        raise SystemExit("section c needs a and b in the same run")
    real, null = state["real"], state["null"]
    encode_ms = statistics.median([r["worker_ms"] for r in real])
    coord_ms = statistics.median([r["coord_ms"] for r in real + null])
    feedable = encode_ms / coord_ms
    # The run's tail after the encode (manifest, the check's read-back in chunks in the pool,
    # commit record), wall per image at --workers; the read-back parallelizes over the pool up to
    # one chunk per CHECK_CHUNK_BYTES of shard.
    tail_per_image = statistics.median([(r["wall"] - r["encode_s"]) / r["n"] for r in real])
    shard_bytes = statistics.median([r["bytes"] / r["n"] for r in real]) * REAL_SHARD
    chunks = max(1, shard_bytes / CHECK_CHUNK_BYTES)
    rows = [["workers one shard run can feed (worker / coordinator CPU per image)", f"{feedable:,.0f}", ">= 128",
             met(feedable >= 128)]]
    for cores in (16, 64, 128):
        feed = min(1.0, feedable / cores)
        encode_wall = REAL_SHARD * encode_ms / 1e3 / min(cores, feedable)
        tail = REAL_SHARD * tail_per_image * args.workers / min(cores, chunks)
        rows.append([f"{cores} cores: share kept encoding, shard runs back to back | overlapping",
                     f"{feed * encode_wall / (encode_wall + tail):.3f} | {feed:.3f}", "", ""])
    rows.append([f"  (tail after the encode at {args.workers} workers, ms wall per image)", f"{tail_per_image * 1e3:.3f}",
                 "", ""])
    return rows


def section_d(args, enc, state) -> list[list[str]]:
    """(d) cores kept encoding over a multi-shard `imnet build` (4 x 300 images, the automatic
    --parallel) against the bare chain in the same run: bench/scaleup_build.py's measurement."""
    import scaleup_build

    build_args = argparse.Namespace(work=Path("/tmp/imnet-bench-build").resolve(), shards=4, images=300,
                                    rounds=args.rounds, parallel=[0], timeline=False)
    return scaleup_build.cores_kept_encoding(build_args)[1]


SECTIONS = {"a": section_a, "b": section_b, "c": section_c, "d": section_d}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/imnet-bench"))
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--method", type=int, default=4)
    p.add_argument("--section", default="b,a,c", help="comma-separated, from " + ",".join(SECTIONS))
    p.add_argument("--scale-tail", action="store_true",
                   help="(c): assume the check's read-back scales with the cores (it runs in the pool)")
    args = p.parse_args()
    args.work = args.work.resolve()
    enc = EncodeSettings(quality=args.quality, method=args.method)
    state: dict = {}
    tables = []
    order = args.section.split(",")
    if "a" in order and "b" in order and order.index("a") < order.index("b"):
        order.remove("a")
        order.insert(order.index("b") + 1, "a")  # the null codec needs the real run's WebPs
    for name in order:
        print(f"section {name} ...", flush=True)
        tables.append((name, SECTIONS[name](args, enc, state)))
    print(f"\n$ {shlex.join([os.path.relpath(sys.executable), *sys.argv])}  ({os.cpu_count()} CPUs)")
    for name, rows in tables:
        print_table(f"({name})", rows)


if __name__ == "__main__":
    main()
