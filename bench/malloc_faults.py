"""Why pool workers set malloc's thresholds (runtime/worker_memory.py): the CPU and page faults per
image of an encode worker's work, with glibc's default thresholds and with the workers' own, in
the same run.

    .venv/bin/python bench/malloc_faults.py [--work /tmp/imnet-bench] [--images 300] [--rounds 3]

Each side runs in a fresh process of its own (malloc's state is per process), alternating round by
round so that a busy machine hurts both alike: every planned image of a shard, in jobs of 8 as the
workers get them, each image through `shard_jobs.prepare_sample` (read, sha256, encode, the
WebP's sha256, the tar members, the sampled decode check, the sample's digest) and each job's reply
pickled, as `wire.worker_main` sends it. The bare chain (`encode.bare_chain`, nothing else) runs
in each process too, over the same sources, as the reference: its own faults and CPU show what the
codec alone costs under each setting. Printed per image: user and system CPU (getrusage: the
system time is where page faults are paid), minor page faults, and the worker's CPU against the
bare chain of the same process.
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from encode import SHARD, release  # noqa: E402
from report import print_table, spread  # noqa: E402

from imnet_assets.image.encode import EncodeSettings, bare_chain  # noqa: E402
from imnet_assets.release.plan import read_slice  # noqa: E402
from imnet_assets.runtime.worker_memory import keep_freed_memory  # noqa: E402
from imnet_assets.stages.shard_jobs import _read_source, prepare_sample  # noqa: E402


def usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def side(work: Path, images: int, tuned: bool) -> dict[str, float]:
    """One side's figures per image (in this process, fresh)."""
    if tuned:
        assert keep_freed_memory(), "no glibc mallopt here"
    enc = EncodeSettings()
    settings = release(work, images, enc.quality, enc.method)
    rows, _ = read_slice(settings.out_root, SHARD)
    sources = [_read_source(row, settings.raw_root)[0] for row in rows[:8]]  # warm the caches and imports
    for data in sources:
        bare_chain(data, enc)
    out: dict[str, float] = {}

    def took(name: str, before: tuple[float, float, int]) -> None:
        after = usage()
        out[f"{name} user"], out[f"{name} sys"] = (after[0] - before[0]) / len(rows), (after[1] - before[1]) / len(rows)
        out[f"{name} faults"] = (after[2] - before[2]) / len(rows)

    before = usage()
    for start in range(0, len(rows), 8):
        job = rows[start:start + 8]
        reads = [_read_source(row, settings.raw_root) for row in job]
        reply = [prepare_sample(row, data, problem, enc, 16) for row, (data, problem) in zip(job, reads)]
        pickle.dumps((True, reply), protocol=5)
        del reads, reply
    took("worker", before)
    before = usage()
    for start in range(0, len(rows), 8):
        for row in rows[start:start + 8]:
            bare_chain(_read_source(row, settings.raw_root)[0], enc)
    took("bare", before)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/imnet-bench"))
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--side", choices=["default", "tuned"], help=argparse.SUPPRESS)  # one side, in its process
    args = p.parse_args()
    if args.side:
        print(json.dumps(side(args.work.resolve(), args.images, args.side == "tuned")))
        return
    release(args.work.resolve(), args.images, EncodeSettings().quality, EncodeSettings().method)  # made once
    got: dict[str, list[dict[str, float]]] = {"default": [], "tuned": []}
    for r in range(args.rounds):
        for name in ("default", "tuned") if r % 2 == 0 else ("tuned", "default"):
            run = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--images", str(args.images),
                                  "--side", name], capture_output=True, text=True, check=True)
            got[name].append(json.loads(run.stdout.splitlines()[-1]))
            f = got[name][-1]
            print(f"  round {r + 1}, {name}: worker {1000 * (f['worker user'] + f['worker sys']):.2f} ms/image, "
                  f"{f['worker faults']:.0f} faults/image", flush=True)
    rows = []
    for name, label in (("default", "glibc's default thresholds"), ("tuned", "the workers' (worker_memory)")):
        runs = got[name]

        def col(key: str, scale: float = 1000.0, digits: int = 3, runs: list = runs) -> str:
            return spread([scale * f[key] for f in runs], digits)

        rows += [
            [f"{label}: worker, user / sys ms per image", f"{col('worker user')} / {col('worker sys')}"],
            [f"{label}: worker, minor page faults per image", col("worker faults", 1, 0)],
            [f"{label}: bare chain, user / sys ms per image", f"{col('bare user')} / {col('bare sys')}"],
            [f"{label}: bare chain, minor page faults per image", col("bare faults", 1, 0)],
            [f"{label}: worker CPU / bare chain CPU (same process)",
             spread([(f["worker user"] + f["worker sys"]) / (f["bare user"] + f["bare sys"]) for f in runs], 4)],
        ]
    pairs = list(zip(got["tuned"], got["default"]))
    rows.append(["worker CPU per image, tuned / default",
                 spread([(t["worker user"] + t["worker sys"]) / (d["worker user"] + d["worker sys"]) for t, d in pairs],
                        4)])
    print(f"\n$ .venv/bin/python bench/malloc_faults.py --images {args.images} --rounds {args.rounds}")
    print_table(f"An encode worker's work per image ({args.images} images), malloc's thresholds default and tuned",
                rows, ["measure", "value"])


if __name__ == "__main__":
    main()
