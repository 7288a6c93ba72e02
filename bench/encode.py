"""Shard encoding against the bare codec chain, worker scaling, and a shard run's fixed cost.

    .venv/bin/python bench/encode.py [--work /tmp/imnet-bench] [--images 400] [--rounds 3]
                                     [--dagster-rounds 2] [--skip-dagster]

1. In one process, alternating in every round (so a busy machine hurts both sides alike):
   - bare: `encode.bare_chain` over the source bytes of the shard's plan slice, already in memory
     (decode with draft, RGB, resize, WebP at the same settings; nothing else);
   - project, 1 and 2 workers: `shard.build_shard` over the same plan slice (range reads, sha256 of
     source and WebP, JSON, tar write and fsync, manifest);
   - verify: tests/shard_check.py's `check_committed_shard` (verify.read_back, the read of `imnet
     verify`, from the plan and manifest) decoding every sample, and hashes and headers only (the
     wds_shards asset's blocking check decodes every 16th sample: between the two).
   Ratios are taken inside each round and the median over rounds is printed.
2. `dagster asset materialize -m imnet_assets.definitions --select wds_shards --partition 0000` on
   a 400-image and a 1200-image single-shard release (IMNET_WORKERS=1), alternating: the difference
   gives the per-image marginal cost of a shard run (encode + the blocking check) and the fixed
   start-up cost; the marginal is set against the bare chain over the same 800 extra images.
   The same pair with IMNET_WORKERS=2 gives the speed-up of the marginal cost from 1 to 2 workers.

The photo release is generated once under --work (photo_release.py) and reused.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.shard_check

import photo_release  # noqa: E402
from cpuload import Sample, measure  # noqa: E402
from report import met, print_table, spread  # noqa: E402

from imnet_assets.image.encode import EncodeSettings, bare_chain, encode_image
from imnet_assets.release.outroot import read_manifest
from imnet_assets.release.plan import read_slice
from imnet_assets.release.sample_tar import sample_members
from imnet_assets.settings import Settings  # noqa: E402
from imnet_assets.stages.filtered_index import build_filtered_index
from imnet_assets.stages.fingerprints import stale_stages
from imnet_assets.stages.raw_tars import build_raw_tars
from imnet_assets.stages.shard import build_shard
from imnet_assets.stages.shuffled_plan import build_shuffled_plan
from imnet_assets.stages.synset_manifest import build_synset_manifest
from imnet_assets.storage import fs
from tests.shard_check import check_committed_shard  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARD = "0000"
QUIET = 0.25  # cores used by other processes below which a round counts as quiet


def quiet(_msg: str) -> None:
    pass


def release(work: Path, images: int, quality: int, method: int, shards: int = 1, workers: int = 2) -> Settings:
    """A release of the first `images` photos in `shards` shards, planned (catalog stages run when
    stale); bench/scaleup.py and bench/scaleup_build.py plan theirs here too."""
    tars = photo_release.ensure_photos(work, -(-images // photo_release.PER_TAR))
    name = f"raw-{len(tars) * photo_release.PER_TAR}"
    raw = photo_release.raw_root(work, tars, name)
    layout = name if shards == 1 else f"{name}-{shards}"  # the catalog and out root of this many shards
    settings = Settings(
        raw_root=str(raw), out_root=str(work / f"out-{layout}"), catalog=str(work / f"cat-{layout}.duckdb"),
        num_shards=shards, webp_quality=quality, webp_method=method, workers=workers,
    )
    if stale_stages(settings, log=quiet):
        for build in (build_raw_tars, build_synset_manifest, build_filtered_index, build_shuffled_plan):
            build(settings, "bench", log=quiet)
    return settings


def env_for(settings: Settings, dagster_home: Path, workers: int = 1) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMNET_", "DAGSTER_"))}
    env.update(
        IMNET_RAW_ROOT=settings.raw_root, IMNET_OUT_ROOT=settings.out_root, IMNET_CATALOG=settings.catalog,
        IMNET_NUM_SHARDS="1", IMNET_WORKERS=str(workers), IMNET_WEBP_QUALITY=str(settings.webp_quality),
        IMNET_WEBP_METHOD=str(settings.webp_method), DAGSTER_HOME=str(dagster_home),
    )
    return env


def sources_of(settings: Settings) -> list[bytes]:
    """Every planned source's bytes, in plan order (shard by shard)."""
    out = []
    with fs.RangeReader() as reader:
        for key in settings.partition_keys:
            rows, _ = read_slice(settings.out_root, key)
            out += [reader.read(fs.join(settings.raw_root, r.tar), r.offset, r.size) for r in rows]
    return out


def timed(fn) -> float:
    return measure(fn).wall


def run_bare(sources: list[bytes], enc: EncodeSettings) -> None:
    for data in sources:
        bare_chain(data, enc)


def run_project(settings: Settings, enc: EncodeSettings, workers: int) -> None:
    build_shard(out_root=settings.out_root, raw_root=settings.raw_root, shard_key=SHARD,
                shard_name=settings.shard_name(SHARD), settings=enc, workers=workers, run_id="bench")


def run_verify(settings: Settings, decode: bool) -> None:
    problems = check_committed_shard(settings.out_root, SHARD, settings.shard_name(SHARD), decode_every=1 if decode else 0)
    if problems:
        raise SystemExit(f"check_committed_shard found problems: {problems[:3]}")


# ------------------------------------------------------------------------------------------------


def in_process(args, enc: EncodeSettings) -> list[list[str]]:
    settings = release(args.work, args.images, enc.quality, enc.method)
    sources = sources_of(settings)
    n = len(sources)
    print(f"in-process: {n} images, WebP q{enc.quality} m{enc.method}, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs", flush=True)
    run_project(settings, enc, 2)  # warm up: page cache, imports, the forkserver
    kinds = ["bare", "w1", "w2"]
    t: dict[str, list[Sample]] = {k: [] for k in [*kinds, "verify", "verify_header"]}
    for r in range(args.rounds):
        order = kinds[r % 3:] + kinds[: r % 3]
        if r % 2:
            order.reverse()
        for kind in order:
            if kind == "bare":
                t[kind].append(measure(lambda: run_bare(sources, enc)))
            else:
                t[kind].append(measure(lambda kind=kind: run_project(settings, enc, int(kind[1]))))
        t["verify"].append(measure(lambda: run_verify(settings, True)))
        t["verify_header"].append(measure(lambda: run_verify(settings, False)))
        print(f"  round {r + 1}: " + ", ".join(
            f"{k} {v[-1].wall * 1e3 / n:.1f} ms/img wall, {v[-1].cpu * 1e3 / n:.1f} cpu" for k, v in t.items()),
            flush=True)
        print("           other processes used " + ", ".join(
            f"{v[-1].others_cores:.1f}" for v in t.values()) + " of the cores during these", flush=True)
    ms = {k: [s.wall * 1e3 / n for s in v] for k, v in t.items()}
    cpu_ms = {k: [s.cpu * 1e3 / n for s in v] for k, v in t.items()}
    ratio = [b.wall / p.wall for b, p in zip(t["bare"], t["w1"])]
    ratio_cpu = [b.cpu / p.cpu for b, p in zip(t["bare"], t["w1"])]
    speedup = [a.wall / b.wall for a, b in zip(t["w1"], t["w2"])]
    quiet = [a.wall / b.wall for a, b in zip(t["w1"], t["w2"]) if max(a.others_cores, b.others_cores) < QUIET]
    bound = [2 * a.cpu / b.cpu for a, b in zip(t["w1"], t["w2"])]
    cores = [b.cores for b in t["w2"]]
    others = [s.others_cores for v in t.values() for s in v]
    vcost = [v.cpu / p.cpu for v, p in zip(t["verify"], t["w1"])]
    hcost = [v.cpu / p.cpu for v, p in zip(t["verify_header"], t["w1"])]
    return [
        ["bare chain, ms/img wall | cpu", f"{spread(ms['bare'], 1)} | {spread(cpu_ms['bare'], 1)}", "", ""],
        ["build_shard 1 worker, ms/img wall | cpu", f"{spread(ms['w1'], 1)} | {spread(cpu_ms['w1'], 1)}", "", ""],
        ["build_shard 2 workers, ms/img wall | cpu (all processes)",
         f"{spread(ms['w2'], 1)} | {spread(cpu_ms['w2'], 1)}", "", ""],
        ["bare / build_shard (1 worker), wall", spread(ratio), ">= 0.95", met(statistics.median(ratio) >= 0.95)],
        ["bare / build_shard (1 worker), cpu", spread(ratio_cpu), ">= 0.95",
         met(statistics.median(ratio_cpu) >= 0.95)],
        ["speed-up 1 -> 2 workers, wall", spread(speedup), ">= 1.9", met(statistics.median(speedup) >= 1.9)],
        [f"  same, rounds where others used < {QUIET} cores ({len(quiet)})", spread(quiet) if quiet else "-",
         ">= 1.9", met(statistics.median(quiet) >= 1.9) if quiet else ""],
        ["speed-up bound from cpu, 2 x cpu(1) / cpu(2)", spread(bound), ">= 1.9",
         met(statistics.median(bound) >= 1.9)],
        ["cores kept busy by the 2-worker run", spread(cores), "~2", ""],
        ["cores used by other processes meanwhile", spread(others, 1), "0 ideally", ""],
        ["check_committed_shard full decode / build_shard(1), cpu", spread(vcost, 3), "", ""],
        ["check_committed_shard header only / build_shard(1), cpu", spread(hcost, 3), "", ""],
    ]


def breakdown(args, enc: EncodeSettings) -> list[list[str]]:
    """Per-image cost of everything build_shard does besides the codec, in microseconds."""
    settings = release(args.work, args.images, enc.quality, enc.method)
    sources = sources_of(settings)[:100]
    rows, _ = read_slice(settings.out_root, SHARD)
    encoded = [encode_image(d, enc) for d in sources]
    n = len(sources)

    def per(fn) -> float:
        best = min(timed(fn) for _ in range(5))
        return best * 1e6 / n

    def tar_write():
        with tarfile.open(fileobj=io.BytesIO(), mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for row, e in zip(rows, encoded):
                for name, payload in sample_members(row, e):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))

    def webp_decode():
        from PIL import Image

        for e in encoded:
            with Image.open(io.BytesIO(e.webp)) as im:
                im.load()

    costs = {
        "codec: bare_chain": per(lambda: run_bare(sources, enc)),
        "codec: encode_image (rules + metadata)": per(lambda: [encode_image(d, enc) for d in sources]),
        "sha256 of the source": per(lambda: [hashlib.sha256(d).hexdigest() for d in sources]),
        "sha256 of the WebP": per(lambda: [hashlib.sha256(e.webp).hexdigest() for e in encoded]),
        "json + tar members (in memory)": per(tar_write),
        "pickle source + result (IPC, 2 workers)": per(
            lambda: [pickle.loads(pickle.dumps(x, 5)) for x in [*sources, *encoded]]),
        "WebP full decode (check_committed_shard)": per(webp_decode),
    }
    base = costs["codec: bare_chain"]
    return [[k, f"{v:,.0f} us ({v / base * 100:.1f}% of bare)", "", ""] for k, v in costs.items()]


def dagster_runs(args, enc: EncodeSettings) -> list[list[str]]:
    small = release(args.work, args.small, enc.quality, enc.method)
    large = release(args.work, args.large, enc.quality, enc.method)
    home = args.work / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    exe = shutil.which("dagster", path=os.path.dirname(sys.executable)) or "dagster"
    cmd = [exe, "asset", "materialize", "-m", "imnet_assets.definitions", "--select", "wds_shards",
           "--partition", SHARD]
    # The images the large release holds beyond the small one (whole tars), in the large plan's order.
    small_tars = {p.name for p in Path(small.raw_root).iterdir()}
    rows, _ = read_slice(large.out_root, SHARD)
    with fs.RangeReader() as reader:
        extra = [reader.read(fs.join(large.raw_root, r.tar), r.offset, r.size) for r in rows
                 if r.tar not in small_tars]
    n_small = len(read_slice(small.out_root, SHARD)[0])
    n_large = len(rows)
    n_extra = n_large - n_small
    assert len(extra) == n_extra

    build_seconds: dict[str, list[float]] = {"small": [], "large": []}

    def materialize(settings: Settings, workers: int = 1) -> None:
        proc = subprocess.run(cmd, env=env_for(settings, home, workers), cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        if workers == 1:
            build_seconds["small" if settings is small else "large"].append(
                read_manifest(settings.out_root, SHARD)["seconds"])

    print(f"\ndagster asset materialize: {n_small}- and {n_large}-image shards, IMNET_WORKERS=1 "
          f"(and 2 for the speed-up), {args.dagster_rounds} rounds", flush=True)
    materialize(small)  # warm up: page cache, .pyc files, instance storage
    build_seconds["small"].clear()
    res: dict[str, list[Sample]] = {"small": [], "bare": [], "large": [], "small2": [], "large2": []}
    runs = {"small": (small, 1), "large": (large, 1), "small2": (small, 2), "large2": (large, 2)}
    for r in range(args.dagster_rounds):
        steps = ["small", "bare", "large", "small2", "large2"]
        if r % 2:
            steps.reverse()
        for step in steps:
            if step == "bare":
                res[step].append(measure(lambda: run_bare(extra, enc)))
            else:
                res[step].append(measure(lambda step=step: materialize(*runs[step])))
        print(f"  round {r + 1}: " + ", ".join(
            f"{k} {v[-1].wall:.1f} s wall, {v[-1].cpu:.1f} s cpu (others used {v[-1].others_cores:.1f} cores)"
            for k, v in res.items()), flush=True)

    def derived(attr: str) -> tuple[list[float], list[float], list[float]]:
        fixed, marginal, ratio = [], [], []
        for s, b, lg in zip(res["small"], res["bare"], res["large"]):
            m = (getattr(lg, attr) - getattr(s, attr)) / n_extra
            marginal.append(m * 1e3)
            fixed.append(getattr(s, attr) - n_small * m)
            ratio.append(getattr(b, attr) / n_extra / m)
        return fixed, marginal, ratio

    fixed, marginal, ratio = derived("wall")
    speedup = [(lg.wall - sm.wall) / (lg2.wall - sm2.wall)
               for sm, lg, sm2, lg2 in zip(res["small"], res["large"], res["small2"], res["large2"])]
    build_marginal = [(lg - sm) * 1e3 / n_extra for sm, lg in zip(build_seconds["small"], build_seconds["large"])]
    fixed_c, marginal_c, ratio_c = derived("cpu")
    # The 2-worker runs' encoders are children of a forkserver the run never waits for: their CPU
    # shows up as "other processes", so those runs are left out of this figure.
    others = [s.others_cores for k, v in res.items() if not k.endswith("2") for s in v]
    return [
        ["fixed start-up cost of a shard run, s wall", spread(fixed), "<= 5", met(statistics.median(fixed) <= 5)],
        ["fixed start-up cost of a shard run, s cpu", spread(fixed_c), "<= 5", met(statistics.median(fixed_c) <= 5)],
        ["marginal cost, ms/img wall | cpu", f"{spread(marginal, 1)} | {spread(marginal_c, 1)}", "", ""],
        ["  of which build_shard (manifest seconds), ms/img wall", spread(build_marginal, 1), "", ""],
        [f"bare / marginal (same {n_extra} images), wall", spread(ratio), ">= 0.90",
         met(statistics.median(ratio) >= 0.90)],
        [f"bare / marginal (same {n_extra} images), cpu", spread(ratio_c), ">= 0.90",
         met(statistics.median(ratio_c) >= 0.90)],
        ["speed-up of the marginal cost, IMNET_WORKERS 1 -> 2, wall", spread(speedup), ">= 1.8",
         met(statistics.median(speedup) >= 1.8)],
        ["cores used by other processes meanwhile", spread(others, 1), "0 ideally", ""],
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/imnet-bench"), help="cache and scratch folder")
    p.add_argument("--images", type=int, default=400, help="images in the in-process shard (x100)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--method", type=int, default=4)
    p.add_argument("--small", type=int, default=400, help="images in the small dagster shard")
    p.add_argument("--large", type=int, default=1200, help="images in the large dagster shard")
    p.add_argument("--dagster-rounds", type=int, default=2)
    p.add_argument("--skip-in-process", action="store_true")
    p.add_argument("--skip-dagster", action="store_true")
    p.add_argument("--skip-breakdown", action="store_true")
    p.add_argument("--json", type=Path, help="also write the tables here")
    args = p.parse_args()
    args.work = args.work.resolve()
    enc = EncodeSettings(quality=args.quality, method=args.method)
    tables = {}
    if not args.skip_in_process:
        tables["build_shard vs bare chain (in one process)"] = in_process(args, enc)
    if not args.skip_breakdown:
        tables["per-image cost outside the codec (best of 5, 100 images)"] = breakdown(args, enc)
    if not args.skip_dagster:
        tables["one shard run through dagster asset materialize"] = dagster_runs(args, enc)
    print(f"\n$ {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    for title, rows in tables.items():
        print_table(title, rows)
    if args.json:
        args.json.write_text(json.dumps(tables, indent=1))


if __name__ == "__main__":
    main()
