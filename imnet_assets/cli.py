"""imnet: build, audit and inspect the ImageNet Winter21 WebP WebDataset release.

Settings come from IMNET_* variables, in the environment or in the .env file at the project root
(the environment wins); relative paths resolve against the project root."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from imnet_assets.orchestrate.build import OutRootBusy
from imnet_assets.orchestrate.instance import unwritable as instance_unwritable
from imnet_assets.orchestrate.interrupts import begin, exiting, said_late, stop_on_signals
from imnet_assets.release.releases import by_name
from imnet_assets.release.releases import from_env as read_releases
from imnet_assets.settings import Settings, SettingsError, apply_env_file, shard_key
from imnet_assets.storage.atomic import FULL
from imnet_assets.storage.fs import StorageError, TooLarge

DEMO_SHARDS = 8


_SHARD_NUMBER = re.compile(r"[0-9]{1,4}")  # ASCII digits only (int() also takes "+3", "0_1", "٣")


def parse_shards(spec: str | None, keys: list[str]) -> list[str]:
    """`0000-0015,0042` -> those partition keys (all when spec is empty or 'all'; none for 'none')."""
    if not spec or spec == "all":
        return list(keys)
    if spec == "none":
        return []
    known = set(keys)
    chosen: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, sep, hi = (p.strip() for p in part.partition("-"))
        if not _SHARD_NUMBER.fullmatch(lo) or (sep and not _SHARD_NUMBER.fullmatch(hi)):
            raise SettingsError(f"--shards: {part!r} is not a shard number or range like 0000-0015")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise SettingsError(f"--shards: {part!r} is a backwards range (write the lower shard first)")
        for i in range(a, b + 1):
            k = shard_key(i)
            if k not in known:
                raise SettingsError(f"--shards: shard {k} does not exist (IMNET_NUM_SHARDS={len(keys)})")
            if k not in chosen:
                chosen.append(k)
    if not chosen:
        raise SettingsError(f"--shards: {spec!r} selects no shard")
    return chosen


def cmd_sample_raw(args) -> int:
    from imnet_assets.sample.sample_raw import write_sample_raw

    summary = write_sample_raw(args.dir, synsets=args.synsets, images=args.images, seed=args.seed, layout=args.layout)
    what = "synset folders" if args.layout == "folders" else "synset tars"
    print(f"wrote {len(summary.wnids)} {what} with {summary.total_members} files to {args.dir}")
    print("quirks: " + ", ".join(f"{k} ({len(v)})" for k, v in sorted(summary.quirks.items())))
    return 0



def cmd_build(args) -> int:
    from imnet_assets.orchestrate.build import build

    # a configuration error before any process starts or anything is written
    s = Settings.from_env()
    releases = read_releases()
    selected = [by_name(releases, args.release)] if args.release else releases
    wanted = {r.release: parse_shards(args.shards, r.partition_keys) for r in selected}
    return build(s, wanted, verbose=args.verbose, keep_going=args.keep_going, parallel=args.parallel,
                 releases=releases, selected=selected)


def demo_settings(root: Path) -> dict[str, str]:
    """What `imnet demo` writes into the project's `.env`: its shard count, the data/ paths and
    an instance under data/ (DAGSTER_HOME is absolute: Dagster's tools refuse a relative one)."""
    return {
        "IMNET_NUM_SHARDS": str(DEMO_SHARDS),
        "IMNET_RAW_ROOT": "data/raw",
        "IMNET_OUT_ROOT": "data/out",
        "IMNET_CATALOG": "data/catalog.duckdb",
        "DAGSTER_HOME": str(root / "data" / "dagster_home"),
    }


def _env_value(value: str) -> str:
    """A value as a .env line holds it: double-quoted (JSON's escapes, which python-dotenv reads)
    when it has a space, a quote or a '#'."""
    import json

    return json.dumps(value) if re.search(r"[\s#'\"\\]", value) else value


def write_env_settings(path: Path, wanted: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Add to the `.env` at `path` each of `wanted` it does not set yet (the value from the
    environment when set there, else the one given), keeping every line it has; atomically.
    Returns (what was added, the names it already had)."""
    from dotenv import dotenv_values

    from imnet_assets.storage import atomic

    text = path.read_text(encoding="utf-8") if path.exists() else ""
    have = dotenv_values(path) if path.exists() else {}
    added = {name: os.environ.get(name) or value for name, value in wanted.items() if name not in have}
    kept = [name for name in wanted if name in have]
    if added:
        if text and not text.endswith("\n"):
            text += "\n"
        text += "# written by `imnet demo` (the environment wins over this file)\n"
        text += "".join(f"{name}={_env_value(value)}\n" for name, value in added.items())
        atomic.write_atomic(str(path), text.encode("utf-8"))
    return added, kept


def cmd_demo(args) -> int:
    from imnet_assets.orchestrate.build import build
    from imnet_assets.orchestrate.instance import prepare_dagster_home
    from imnet_assets.sample.sample_raw import write_sample_raw
    from imnet_assets.settings import env_file, project_root
    from imnet_assets.storage import fs

    root = project_root()
    added, kept = write_env_settings(env_file(root), demo_settings(root))
    apply_env_file(root)
    if added:
        print(f"imnet demo: wrote {', '.join(f'{k}={v}' for k, v in added.items())} to {env_file(root)}")
    if kept:
        print(f"imnet demo: kept {', '.join(kept)} as {env_file(root)} sets them")
    s = Settings.from_env()
    prepare_dagster_home()
    files, folders = fs.listdir_and_folders(s.raw_root)
    # only into an empty root (or one holding what an interrupted sample-raw left): never beside a release
    if not folders and all(e["name"] in ("words.txt", "gloss.txt") or e["name"].endswith(".tmp") for e in files):
        summary = write_sample_raw(s.raw_root, synsets=args.synsets, images=args.images, seed=0)
        print(f"imnet demo: wrote a sample raw release ({len(summary.wnids)} synsets, "
              f"{summary.total_members} files with ImageNet's quirks) to {s.raw_root}")
    rs = read_releases()  # IMNET_RELEASES: the demo builds every release it names
    code = build(s, {r.release: r.partition_keys for r in rs}, verbose=args.verbose, releases=rs, selected=rs)
    if code == 0:
        outs = ", ".join(r.out_root for r in rs)
        print(f"demo done: shards, _info.json, README.md (the card) and classes.tsv in {outs}.")
        print("Next: `imnet status`, `imnet lineage <key>`, `imnet verify`, and `dg dev` (or "
              f"`dagster dev -w workspace.yaml` in {root}) for the UI on the instance at {os.environ['DAGSTER_HOME']}.")
    return code


def cmd_status(args) -> int:
    from imnet_assets.orchestrate.status import report

    return report(read_releases(), args.raw)


def cmd_lineage(args) -> int:
    """Where the image came from, then every release and shard that holds it (the catalog's
    `lineage` query gives a row per release whose plan holds it, with its `release` column)."""
    from imnet_assets.release.lineage import lineage_rows
    from imnet_assets.storage.catalog import open_reader
    from imnet_assets.storage.rawfolders import describe_source

    s = Settings.from_env()
    releases = {r.release: r for r in read_releases()}
    with open_reader(s.catalog) as cat:
        rows = lineage_rows(cat, args.key)
    if not rows:
        print(f"no image with key {args.key!r}, nor a raw member of that name or stem, in {s.catalog}",
              file=sys.stderr)
        return 1
    sources: dict[tuple, list[dict]] = {}  # one raw file may be planned in several releases
    for r in rows:
        sources.setdefault((r["key"], r["tar"], r["member"], r["offset"]), []).append(r)
    for held in sources.values():
        r = held[0]
        if r["key"] != args.key:  # found by the raw member's name or stem: say which key it got
            kept = "kept under" if r["status"] == "kept" else "excluded, its key"
            print(f"raw name     {r['member']}: {kept} {r['key']}")
        print(f"key          {r['key']}  ({r['wnid']})")
        where, how = describe_source(s.raw_root, r["tar"], r["member"], r["offset"])
        print(f"source       {where}")
        print(f"             {how}  size {r['size']}  sha256 {r['sha256'] or '(unreadable)'}")
        print(f"status       {r['status']}" + (f"  ({r['reason']})" if r["reason"] else ""))
        planned = [h for h in held if h["shard"] is not None]
        if r["status"] == "kept" and not planned and any(name for name in releases):
            print("release      (in no release: no release's synsets hold it)")
        for h in planned:
            _print_placement(h, releases.get(h.get("release") or "", s))
        print()
    return 0


def _print_placement(r: dict, release: Settings) -> None:
    """One release's shard for a sample: where it was planned, and the run that wrote it."""
    from imnet_assets.image.encode import CODEC_EXTENSIONS
    from imnet_assets.storage import fs

    if release.release:
        print(f"release      {release.release}  ({fs.redact(release.out_root)})")
    where = fs.join(release.out_root, r["path"] or release.shard_name(r["shard"]))
    if r["position"] is None:  # planned there; not written (yet, or refused by the encoder)
        print(f"shard        {r['shard']}  plan position {r['plan_position']}  file {where}")
    else:
        moved = f" (plan position {r['plan_position']})" if r["position"] != r["plan_position"] else ""
        print(f"shard        {r['shard']}  position {r['position']}{moved}  file {where}")
    if not r["run_id"]:
        print("written by   (not written yet: run `imnet build`)")
    elif r["webp_sha256"] is None:
        print(f"written by   run {r['run_id']}  code version {r['code_version']}  at {r['written_at']}"
              "  (this image is not in the shard: excluded when encoding)")
    else:
        print(f"written by   run {r['run_id']}  code version {r['code_version']}  at {r['written_at']}")
        image = f"{CODEC_EXTENSIONS[release.codec]} sha256"  # the stored image's (webp_sha256 holds it for any codec)
        print(f"{image:<13}{r['webp_sha256']}  repaired {r['repaired']}")


def cmd_verify(args) -> int:
    """Every selected release (`--release NAME`; default all), one after another: 1 when any fails, 3 when
    none fails but a shard could not be checked (verify_command.NOT_CHECKED), else 0."""
    from imnet_assets.orchestrate.verify_command import verify

    releases = read_releases()
    selected = [by_name(releases, args.release)] if args.release else releases
    return verify(selected, lambda keys: parse_shards(args.shards, keys), args.jobs, args.decode, args.verbose)


def _positive(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text.strip()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="imnet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("sample-raw", help="write a small synthetic raw release with ImageNet's quirks")
    sp.add_argument("dir")
    sp.add_argument("--synsets", type=int, default=6)
    sp.add_argument("--images", type=int, default=40)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--layout", choices=["tars", "folders"], default="tars", help="tars: <wnid>.tar per synset "
                    "(as ImageNet distributes them); folders: the extracted layout <wnid>/<wnid>_<n>.JPEG")
    sp.set_defaults(func=cmd_sample_raw)
    sp = sub.add_parser("build", help="materialize every stage through Dagster, then shards, then the audit")
    sp.add_argument("--shards", help="shard partitions to build, e.g. 0000-0015,0042 (default all; 'none' "
                    "builds only the catalog stages and the plan)")
    sp.add_argument("--release", metavar="NAME", help="build this release of IMNET_RELEASES only (after the shared "
                    "stages; default: every release)")
    sp.add_argument("--keep-going", action="store_true", help="when a shard fails, build every other one, then "
                    "exit non-zero naming the failed ones (the audit is skipped)")
    sp.add_argument("--parallel", type=_positive, metavar="N", help="shard runs at once (default "
                    "IMNET_PARALLEL_SHARDS, else about the CPUs over IMNET_WORKERS, at least 2)")
    sp.add_argument("-v", "--verbose", action="store_true", help="also print Dagster's warnings and errors "
                    "(with stack traces)")
    sp.set_defaults(func=cmd_build)
    sp = sub.add_parser("demo", help="write the demo's settings into the project's .env (8 shards, data/ paths, DAGSTER_HOME), sample-raw into the raw root when empty, then build")
    sp.add_argument("--synsets", type=int, default=6)
    sp.add_argument("--images", type=int, default=40)
    sp.add_argument("-v", "--verbose", action="store_true", help="as for build")
    sp.set_defaults(func=cmd_demo)
    sp = sub.add_parser("status", help="the resolved roots, and which stages, shard partitions and the audit are fresh")
    sp.add_argument("--raw", action="store_true", help="also list a raw root on object storage and compare "
                    "the catalog stages with it (20 listing pages at 19,167 tars)")
    sp.set_defaults(func=cmd_status)
    sp = sub.add_parser("lineage", help="where a sample came from and where it went")
    sp.add_argument("key")
    sp.set_defaults(func=cmd_lineage)
    sp = sub.add_parser("verify", help="re-read every shard and check it against the catalog",
                        description="Re-read every shard and check it against the catalog.",
                        epilog="exit status: 0 every shard ok; 1 something FAILED (damage: the next `imnet build` "
                        "writes a failed shard again), or verify could not run (its message says why); 3 nothing "
                        "failed but some shards were NOT CHECKED (no verdict: the storage did not answer, their "
                        "checking process kept dying, or a build wrote them meanwhile; run verify again); 2 a "
                        "usage or configuration error; 130 interrupted")
    sp.add_argument("--shards", help="shards to check, e.g. 0000-0015,0042 (default all; _info.json and stray "
                    "shard files are checked only with all)")
    sp.add_argument("--jobs", type=_positive, metavar="N", help="processes checking shards (default IMNET_WORKERS)")
    sp.add_argument("--decode", action="store_true", help="also decode every WebP")
    sp.add_argument("--release", metavar="NAME", help="check this release of IMNET_RELEASES only (default: every release)")
    sp.add_argument("-v", "--verbose", action="store_true")
    sp.set_defaults(func=cmd_verify)
    args = p.parse_args(argv)
    begin()  # nothing of an earlier command in this process (its late signals)
    if args.command in ("build", "demo", "verify"):
        stop_on_signals()
    from imnet_assets.storage.catalog import CatalogDamaged

    try:
        # the project's .env under the environment, for this process and what it starts (DAGSTER_HOME, AWS_*)
        apply_env_file()
        code = args.func(args)
        if said := said_late():
            print(said, file=sys.stderr, flush=True)
        exiting()
        return code
    except SettingsError as e:
        print(f"imnet: configuration error: {e}", file=sys.stderr)
        return 2
    except (CatalogDamaged, FileNotFoundError, StorageError, TooLarge, OutRootBusy) as e:  # each one line saying what to do
        print(f"imnet: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `imnet status | head`: the reader has gone; say nothing more (an OSError: before it)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        if e.errno not in FULL:
            raise
        print(f"imnet: {e}{'' if e.filename else _space_left()}", file=sys.stderr)  # a full disk outside any stage
        return 1
    except Exception as e:
        said = instance_unwritable(e)
        if said is None:
            raise
        print(f"imnet: {said}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imnet: interrupted", file=sys.stderr)
        return 130


def _space_left() -> str:
    """For a full disk's error that names no file (a print to a stream that Dagster's compute log
    capture points into DAGSTER_HOME while a step runs; atomic.removed_on_error names the files
    this project writes): the folders a build writes, with the space left on each."""
    import shutil
    import tempfile

    try:
        s = Settings.from_env()
        folders = [("out root", s.out_root), ("catalog folder", os.path.dirname(os.path.abspath(s.catalog)))]
    except Exception:  # noqa: BLE001 - only the message's detail
        folders = []
    folders += [("DAGSTER_HOME", os.environ.get("DAGSTER_HOME", "")), ("TMPDIR", tempfile.gettempdir())]
    left = []
    for name, path in folders:
        try:
            left.append(f"{name} {path} {shutil.disk_usage(path).free // 2**20} MiB")
        except (OSError, ValueError):  # remote, or not there
            continue
    return f" (space left: {'; '.join(left)})" if left else ""


if __name__ == "__main__":
    sys.exit(main())
