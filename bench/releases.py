"""What more releases cost (issue 25): builds of 1, 2 and 3 releases from one index, and the
catalog with three releases' plans at a synthetic size, scaled to the real 13,151,276 rows.

    .venv/bin/python bench/releases.py [--work /tmp/imnet-bench-releases] [--synsets 8] [--images 40]
                                       [--rows 1000000] [--skip-builds] [--skip-catalog] [--no-staged]

Builds (real `imnet build` processes on a generated raw release with ImageNet's quirks, 4 shards
a release, IMNET_WORKERS=2):
  1. one release `full` (every synset, WebP): the whole build's wall time, and the shared stages'
     (raw_tars, synset_manifest, filtered_index: what every further release shares) as its share;
  2. `sub` added (half the synsets, 2 validation images a class): the second build's wall time
     against the first: what one more release costs once the index exists;
  3. `jpeg` added (every synset, JPEG): the same for a third.
  After each: the catalog file's size, and the build process's peak RSS.
  4. the three at once from nothing, twice, in fresh folders: with IMNET_STAGE_ENCODES=off (each
     shard run reads and encodes its sources) and with the default (the index's pass encodes each
     kept image for both codecs: stages/staged_encodes.py): each build's wall time, the raw bytes
     read (the index's pass: every tar whole; the shard runs: each planned member not staged) and
     the staged files' bytes.
Catalog (each step its own child process: peak RSS and time are that step's): a catalog of
--rows kept images over 19,167 synsets (bench/scale.py's synthetic rows), the index's staged
encodes of every image for a WebP and a JPEG identity (so each plan publishes its shards'
lookups of staged encodes, stages/staged_encodes.py, as it does with several releases), then the plans of three
releases: every synset; the first 11,821 (ImageNet-12k's count) with val_per_class = 10; the first
1,000. The catalog's size after each, and each plan's peak RSS and time, measured; the figures at
13,151,276 rows are these scaled linearly by rows (each release's plan and its audit's rows are
one row per planned image: `plan` + `shard_samples`; the audit's per-row bytes come from the
builds' catalog, measured by step 3 of the builds).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report import met, print_table  # noqa: E402

REAL_ROWS = 13_151_276
REAL_SYNSETS = 19_167
SHARDS = 4
CATALOG_SHARDS = 1024
SHARED = ("raw_tars", "synset_manifest", "filtered_index")


def imnet_exe() -> str:
    return shutil.which("imnet", path=os.path.dirname(sys.executable)) or "imnet"


def releases_file(work: Path, names: list[str], sub: Path) -> str:
    tables = {
        "full": f'[release.full]\nout_root = "{work / "out" / "full"}"\nnum_shards = {SHARDS}\n',
        "sub": f'[release.sub]\nout_root = "{work / "out" / "sub"}"\nnum_shards = {SHARDS}\n'
               f'synsets = "{sub}"\nval_per_class = 2\n',
        "jpeg": f'[release.jpeg]\nout_root = "{work / "out" / "jpeg"}"\nnum_shards = {SHARDS}\ncodec = "jpeg"\n',
    }
    return "\n".join(tables[n] for n in names)


def run_build(env: dict) -> dict:
    """One `imnet build`: wall seconds, each materialized stage's seconds, its peak RSS (MB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = subprocess.run([imnet_exe(), "build"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"imnet build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    stages = {m.group(1): float(m.group(2))
              for m in re.finditer(r"^  (\S+)\s+materialized in ([0-9.]+)s", proc.stdout, re.M)}
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall": wall, "stages": stages, "peak_rss_mb": max(rss, before) / 1024, "out": proc.stdout}


def builds(args) -> dict:
    from imnet_assets.sample.sample_raw import write_sample_raw

    work = args.work / "builds"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    summary = write_sample_raw(work / "raw", synsets=args.synsets, images=args.images, seed=0)
    sub = work / "sub.txt"
    sub.write_text("\n".join(sorted(summary.wnids)[: max(1, len(summary.wnids) // 2)]) + "\n")
    toml = work / "releases.toml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMNET_", "DAGSTER_HOME"))}
    env.update(IMNET_PROJECT_ROOT=str(work), IMNET_RAW_ROOT=str(work / "raw"), IMNET_CATALOG=str(work / "catalog.duckdb"),
               IMNET_WORKERS="2", IMNET_RELEASES=str(toml), DAGSTER_HOME=str(work / "dagster_home"))
    (work / "dagster_home").mkdir()
    shutil.copy(Path(__file__).resolve().parent.parent / "dagster.yaml", work / "dagster_home" / "dagster.yaml")
    results = []
    for names in (["full"], ["full", "sub"], ["full", "sub", "jpeg"]):
        toml.write_text(releases_file(work, names, sub))
        r = run_build(env)
        r["catalog_bytes"] = (work / "catalog.duckdb").stat().st_size
        r["releases"] = names
        results.append(r)
        print(f"build with {', '.join(names)}: {r['wall']:.1f}s, catalog {r['catalog_bytes'] / 1e6:.1f} MB, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    with_plan = _catalog_rows(work / "catalog.duckdb")
    joint = {}
    for mode in ("off", "auto"):
        folder = args.work / f"joint-{mode}"
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "dagster_home").mkdir(parents=True)
        shutil.copy(Path(__file__).resolve().parent.parent / "dagster.yaml", folder / "dagster_home" / "dagster.yaml")
        (folder / "releases.toml").write_text(releases_file(folder, ["full", "sub", "jpeg"], sub))
        r = run_build({**env, "IMNET_PROJECT_ROOT": str(folder), "IMNET_CATALOG": str(folder / "catalog.duckdb"),
                       "IMNET_RELEASES": str(folder / "releases.toml"), "DAGSTER_HOME": str(folder / "dagster_home"),
                       "IMNET_STAGE_ENCODES": mode})
        r.update(_raw_reads(folder / "catalog.duckdb"))
        r["staged_bytes"] = sum(p.stat().st_size for p in folder.glob("out/*/_staged/*/*.bin"))
        joint[mode] = r
        print(f"three releases at once, IMNET_STAGE_ENCODES={mode}: {r['wall']:.1f}s, raw read "
              f"{(r['index_bytes'] + r['shard_bytes']) / 1e6:.1f} MB; stages: "
              + ", ".join(f"{k} {v:.1f}s" for k, v in r["stages"].items()), flush=True)
    return {"builds": results, "images": summary.total_members, "rows": with_plan, "joint": joint}


def _raw_reads(path: Path) -> dict:
    """Raw bytes a build read: the index's pass (every tar whole) and the shard runs (each planned
    member without a staged image of its release's codec; a staged one is read from `_staged`)."""
    import duckdb

    with duckdb.connect(str(path), read_only=True) as con:
        index = con.execute("SELECT sum(size) FROM raw_tars").fetchone()[0]
        shard = con.execute("""SELECT coalesce(sum(p.size), 0) FROM plan p WHERE NOT EXISTS (
            SELECT 1 FROM staged_images s WHERE s.key = p.key AND s.source_sha256 = p.sha256
            AND s.codec LIKE CASE WHEN p.release = 'jpeg' THEN 'jpeg-%' ELSE 'webp-%' END)""").fetchone()[0]
    return {"index_bytes": int(index), "shard_bytes": int(shard)}


def _catalog_rows(path: Path) -> dict:
    import duckdb

    with duckdb.connect(str(path), read_only=True) as con:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("images", "plan", "shard_samples")}


# ------------------------------------------------------------------------------ synthetic catalog


def catalog_settings(work: Path, name: str = "", **changes):
    import dataclasses

    from imnet_assets.settings import Settings

    base = work / "catalog"
    (base / "raw").mkdir(parents=True, exist_ok=True)
    s = Settings(raw_root=str(base / "raw"), out_root=str(base / "out"), catalog=str(base / "catalog.duckdb"),
                 num_shards=CATALOG_SHARDS, workers=os.cpu_count() or 1)
    if name:
        s = dataclasses.replace(s, release=name, out_root=str(base / "out" / name), **changes)
    return s


# bench/scale.py's rows, by column name (the table's columns grew with releases)
IMAGE_COLUMNS = ('INSERT INTO images (key, wnid, tar, member, "offset", size, sha256, width, height, format, mode, '
                 "status, reason, needs_repair, repaired, excluded_at, phash, duplicate_of)\n")
# What each release's audit adds to the catalog: one shard_samples row per planned image, as the
# audit loads them from the manifests (bench-only SQL, as bench/scale.py's FILL_SHARD_SAMPLES).
FILL_SHARD_SAMPLES = """
INSERT INTO shard_samples (key, shard, position, width, height, orig_width, orig_height, webp_bytes, webp_sha256,
                           repaired, release)
SELECT key, shard, position, width, height, width, height, size * 3 // 4, sha256(key), false, release
FROM plan WHERE release = $release
"""
# The index's staged encodes (stages/staged_encodes.py) of every kept image for one codec identity:
# its file is its tar's under the first release's out root (bench-only SQL).
FILL_STAGED = """
INSERT INTO staged_images
SELECT $codec, key, tar, sha256, $root || '/_staged/' || $codec || '/' || tar || '.bin',
       (row_number() OVER (PARTITION BY tar ORDER BY "offset") - 1) * 40000, size * 3 // 4, sha256(key || $codec),
       width, height, width, height, false, NULL
FROM images WHERE status = 'kept'
"""
SUBSETS = {"full": (REAL_SYNSETS, 0), "in12k_like": (11_821, 10), "in1k_like": (1_000, 0)}


def child(args) -> dict:
    from imnet_assets.storage.catalog import Catalog

    started = time.perf_counter()
    if args.child == "generate":
        import scale

        s = catalog_settings(args.work)
        Path(s.catalog).unlink(missing_ok=True)
        with Catalog(s.catalog) as cat:
            cat.con.execute(scale.GEN_SYNSETS, {"synsets": REAL_SYNSETS})
            cat.con.execute(scale.GEN_IMAGES.replace("INSERT INTO images\n", IMAGE_COLUMNS, 1),
                            {"synsets": REAL_SYNSETS, "rows": args.rows, "excluded": 0})
            cat.con.execute("CHECKPOINT")
        facts = {}
    elif args.child == "staged":
        from imnet_assets.image.encode import EncodeSettings, codec_identity

        with Catalog(catalog_settings(args.work).catalog) as cat:
            for enc in (EncodeSettings(), EncodeSettings(codec="jpeg", quality=95)):
                cat.con.execute(FILL_STAGED, {"codec": codec_identity(enc),
                                              "root": str(Path(catalog_settings(args.work, "full").out_root))})
            cat.con.execute("CHECKPOINT")
            (n,) = cat.con.execute("SELECT count(*) FROM staged_images").fetchone()
        facts = {"samples": n}
    elif args.child == "audit_rows":
        with Catalog(catalog_settings(args.work).catalog) as cat:
            cat.con.execute("DELETE FROM shard_samples")
            for name in SUBSETS:
                cat.con.execute(FILL_SHARD_SAMPLES, {"release": name})
            cat.con.execute("CHECKPOINT")
            (n,) = cat.con.execute("SELECT count(*) FROM shard_samples").fetchone()
        facts = {"samples": n}
    else:
        from imnet_assets.stages.shuffled_plan import build_shuffled_plan

        count, val = SUBSETS[args.child]
        wnids = Path(catalog_settings(args.work).catalog).parent / f"{args.child}.txt"
        with Catalog(catalog_settings(args.work).catalog, read_only=True) as cat:
            names = [w for (w,) in cat.con.execute("SELECT wnid FROM synsets ORDER BY wnid LIMIT $n",
                                                   {"n": count}).fetchall()]
        wnids.write_text("\n".join(names) + "\n")
        s = catalog_settings(args.work, args.child, synsets=str(wnids), val_per_class=val)
        facts = build_shuffled_plan(s, "bench-releases", log=lambda _m: None)
        with Catalog(s.catalog) as cat:
            cat.con.execute("CHECKPOINT")
    return {"seconds": time.perf_counter() - started, "samples": facts.get("samples"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def catalog(args) -> list[dict]:
    out = []
    for step in ("generate", *(() if args.no_staged else ("staged",)), *SUBSETS, "audit_rows"):
        cmd = [sys.executable, __file__, "--child", step, "--work", str(args.work), "--rows", str(args.rows)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"step {step} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        facts = json.loads(lines[-1][len("RESULT "):])
        facts["step"] = step
        facts["catalog_bytes"] = Path(catalog_settings(args.work).catalog).stat().st_size
        out.append(facts)
        print(f"{step}: {facts['seconds']:.1f}s, peak RSS {facts['peak_rss_mb']:.0f} MB, "
              f"catalog {facts['catalog_bytes'] / 1e6:.0f} MB", flush=True)
    return out


def report(built: dict | None, cat: list[dict] | None, rows: int) -> None:
    if built:
        one, two, three = built["builds"]
        shared = sum(one["stages"].get(s, 0.0) for s in SHARED)
        print_table(f"builds: {built['images']} raw images, {SHARDS} shards a release, IMNET_WORKERS=2", [
            ["one release: wall", f"{one['wall']:.1f} s", "", ""],
            ["  shared stages (raw_tars, synset_manifest, filtered_index)", f"{shared:.1f} s "
             f"({100 * shared / one['wall']:.0f}% of the build)", "run once", ""],
            ["second release (half the synsets, val 2/class): its build", f"{two['wall']:.1f} s "
             f"({two['wall'] / one['wall']:.2f}x one release)", "< 1x", ""],
            ["  index re-run", "no" if not set(SHARED) & set(two["stages"]) else "YES", "no", ""],
            ["third release (JPEG): its build", f"{three['wall']:.1f} s ({three['wall'] / one['wall']:.2f}x)",
             "< 1x", ""],
            ["catalog after 1 / 3 releases", f"{one['catalog_bytes'] / 1e6:.1f} / {three['catalog_bytes'] / 1e6:.1f} MB",
             "", ""],
            ["peak RSS of a build (1 / 3 releases)", f"{one['peak_rss_mb']:.0f} / {three['peak_rss_mb']:.0f} MB", "", ""],
        ])
        off, staged = built["joint"]["off"], built["joint"]["auto"]
        tars = off["index_bytes"]
        print_table("three releases (full WebP, half the synsets with validation, full JPEG) built at once", [
            ["staging off: wall; raw bytes read", f"{off['wall']:.1f} s; "
             f"{(tars + off['shard_bytes']) / tars:.2f}x the raw release (index pass + shard runs)", "", ""],
            ["staged encodes: wall; raw bytes read", f"{staged['wall']:.1f} s ({staged['wall'] / off['wall']:.2f}x); "
             f"{(tars + staged['shard_bytes']) / tars:.2f}x the raw release", "1.00x", met((tars + staged['shard_bytes']) / tars <= 1.0)],
            ["staged files (both codecs)", f"{staged['staged_bytes'] / 1e6:.1f} MB ({staged['staged_bytes'] / tars:.2f}x "
             "the raw release)", "", ""],
        ])
    if cat:
        base = cat[0]["catalog_bytes"]
        factor = REAL_ROWS / rows
        lines = [["catalog of images only", f"{base / 1e6:.0f} MB at {rows:,} rows; ~{base * factor / 1e9:.1f} GB "
                  "at 13.15M", "", ""]]
        prev = base
        for c in cat[1:]:
            grew = c["catalog_bytes"] - prev
            prev = c["catalog_bytes"]
            if c["step"] == "staged":
                lines.append([f"staged encodes of two codec identities ({c['samples']:,} rows)",
                              f"+{grew / 1e6:.0f} MB; at 13.15M: +{grew * factor / 1e9:.2f} GB", "", ""])
                continue
            if c["step"] == "audit_rows":
                lines.append([f"the three audits' shard_samples rows ({c['samples']:,})",
                              f"+{grew / 1e6:.0f} MB; at 13.15M: +{grew * factor / 1e9:.2f} GB", "", ""])
                continue
            lines.append([f"plan of {c['step']} ({c['samples']:,} samples)",
                          f"{c['seconds']:.1f} s, {c['peak_rss_mb']:.0f} MB RSS, +{grew / 1e6:.0f} MB; at 13.15M: "
                          f"~{c['seconds'] * factor:.0f} s, +{grew * factor / 1e9:.2f} GB", "", ""])
        lines.append(["catalog with three plans and audits", f"{prev / 1e6:.0f} MB; at 13.15M ~{prev * factor / 1e9:.1f} GB",
                      "", ""])
        print_table(f"catalog: {rows:,} synthetic kept images over {REAL_SYNSETS:,} synsets, {CATALOG_SHARDS} shards "
                    "(scaled linearly by rows to 13,151,276)", lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/imnet-bench-releases"))
    p.add_argument("--synsets", type=int, default=8)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--skip-builds", action="store_true")
    p.add_argument("--skip-catalog", action="store_true")
    p.add_argument("--no-staged", action="store_true", help="catalog without staged encodes (no lookups published)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    built = None if args.skip_builds else builds(args)
    cat = None if args.skip_catalog else catalog(args)
    report(built, cat, args.rows)


if __name__ == "__main__":
    main()
