"""`imnet status`: the shared stages once, then each release (IMNET_RELEASES; unset: the one default
release, shown as before releases) with its plan, its shard partitions and its audit."""

from __future__ import annotations

import os
import sys
from collections import Counter

from imnet_assets.defs.release_keys import SHARED_STAGES
from imnet_assets.settings import Settings

STATUS_WAIT_S = 10.0  # how long `imnet status` waits for a catalog writer before reporting without it
SHOWN = 32  # shard keys named per line


def report(releases: list[Settings], raw: bool, out=sys.stdout) -> int:
    from imnet_assets.defs.schedules import shard_partition_status
    from imnet_assets.orchestrate.instance import dagster_instance
    from imnet_assets.release import changed_sources
    from imnet_assets.release.plan import read_index
    from imnet_assets.settings import dagster_home, env_file, project_root
    from imnet_assets.stages.audit import plan_mismatch
    from imnet_assets.stages.fingerprints import stale_stages
    from imnet_assets.storage import fs
    from imnet_assets.storage.catalog import CatalogBusy, open_reader

    def say(line: str = "") -> None:
        print(line, file=out)

    base = Settings.from_env()
    named = bool(releases[0].release)
    root = project_root()
    home = dagster_home(root)
    has_home = home.is_dir()
    planned = False  # a plan published under some out root: built somewhere, if not here
    for r in releases:
        index = read_index(r.out_root)
        planned = planned or index is not None
        if why := plan_mismatch(r, index):
            say(f"note: {r.release + ': ' if r.release else ''}{why}")
    # Comparing the stages with the raw root means listing it: 19,167 tars are 20 listing pages,
    # seconds of requests and of parsing on object storage. There, that is asked for (--raw).
    relist = raw or not fs.is_remote(base.raw_root)
    stale: dict[str, list[str]] | None = None  # release name -> its stale stages (shared ones included)
    built: dict[str, dict[str, bool]] | None = None  # release name -> stage -> recorded (not relisted)
    audits: dict[str, str | None] = {}
    staged: list[tuple] = []
    audit_unknown = "unknown here (no catalog)"  # why the audits' records are not known, or None
    if os.path.exists(base.catalog):
        try:
            # Held open while the stages are compared: no writer can start in between.
            with open_reader(base.catalog, say=lambda m: print(m, file=sys.stderr, flush=True),
                             wait_s=STATUS_WAIT_S) as cat:
                if relist:
                    roots = [r.out_root for r in releases]  # where shard runs mark changed sources
                    stale = {r.release: stale_stages(r, log=lambda _m: None, marker_roots=roots) for r in releases}
                else:
                    built = {r.release: {**{st: cat.stage_fingerprint(st) is not None for st in SHARED_STAGES},
                                         "shuffled_plan": cat.stage_fingerprint("shuffled_plan", r.release)
                                         is not None} for r in releases}
                audits = {r.release: cat.stage_fingerprint("shard_audit", r.release) for r in releases}
                staged = cat.rows("staged_summary")  # issue 25: stages/staged_encodes.py
                audit_unknown = None
        except CatalogBusy as e:
            audit_unknown = "unknown now (the catalog is being written)"
            say(f"catalog stages   unknown now: {e} (waited {STATUS_WAIT_S:.0f}s; `imnet status` again "
                "once it is done)")
    elif not planned:  # a first look, before any build
        audit_unknown = "not built yet"
        say(f"catalog stages   not built yet: no catalog at {base.catalog} (IMNET_CATALOG) and no plan under the "
            "out root: `imnet build` makes them")
    else:
        say(f"catalog stages   unknown here: no catalog at {base.catalog} (IMNET_CATALOG; it lives on the "
            "machine that builds the stages and runs the audit)")

    def stage_line(stage: str, r: Settings, indent: str = "") -> None:
        width = 16 - len(indent)
        if stale is not None:
            say(f"{indent}{stage:{width}s} {'stale' if stage in stale[r.release] else 'fresh'}")
        elif built is not None:
            say(f"{indent}{stage:{width}s} {'built' if built[r.release][stage] else 'not built'}")

    for stage in SHARED_STAGES:
        stage_line(stage, releases[0])
    for codec, images, refused, size in staged:
        amount = f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
        say(f"  staged encodes {codec}: {images:,} images ({refused} refused by the encoder), {amount} under _staged/")
    if not named:
        stage_line("shuffled_plan", releases[0])
    if built is not None:
        say("  (the raw root, on object storage, was not listed: `imnet status --raw` compares "
            "the stages with it)")
    if has_home:
        os.environ["DAGSTER_HOME"] = str(home)
    inst = dagster_instance() if has_home else None
    for r in releases:
        indent = "  " if named else ""
        if named:
            say(f"release {r.release}: {fs.redact(r.out_root)}  ({r.num_shards} shards, synsets {r.synsets}, "
                f"codec {r.codec})")
            stage_line("shuffled_plan", r, indent)
        # tars a shard run found changed in place since indexing (release/changed_sources.py)
        changed = changed_sources.pending(r.out_root)
        for marker in changed.values():
            say(f"{indent}  {marker.describe()}: the next `imnet build` indexes it again")
        status = shard_partition_status(r, inst)
        counts = Counter(status.values())
        say(f"{indent}{'wds_shards':{16 - len(indent)}s} " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        if changed or (stale and {"filtered_index", "shuffled_plan"} & set(stale[r.release])):
            say(f"{indent}  (judged against the published plan, which is stale: `imnet build` makes the plan again "
                "first, then builds the shards whose plan slices change)")
        not_fresh = [k for k, v in status.items() if v != "fresh"]
        if not_fresh:
            say(f"{indent}  not fresh: " + ", ".join(not_fresh[:SHOWN]) + (" ..." if len(not_fresh) > SHOWN else ""))
        audit = audit_unknown or _audit_state(r, audits.get(r.release), not_fresh)
        say(f"{indent}{'shard_audit':{16 - len(indent)}s} {audit}")
    dotenv = env_file(root)
    say(f"project root     {root}  ({'settings from .env there and the environment' if dotenv.is_file() else 'no .env'})")
    say(f"  raw root       {fs.redact(base.raw_root)}")
    if not named:
        say(f"  out root       {fs.redact(base.out_root)}")
    say(f"  catalog        {base.catalog}")
    say(f"  DAGSTER_HOME   {home}" + ("" if has_home else "  (no instance there yet: `imnet build` makes it)"))
    return 0


def _audit_state(s: Settings, recorded: str | None, not_fresh: list[str]) -> str:
    """The audit: fresh (its record in the catalog is the fingerprint of the shards as they are
    now), stale, or not built."""
    from imnet_assets.stages.audit import audit_fingerprint

    if recorded is None:
        return "not built"
    if not_fresh:
        return f"stale ({len(not_fresh)} shards not fresh)"
    if audit_fingerprint(s) == recorded:
        return "fresh"
    return ("stale (the shards, or _info.json, classes.tsv or README.md beside them, changed since it ran: "
            "`imnet build` audits again)")
