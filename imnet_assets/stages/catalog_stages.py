"""The four catalog stages before the shards, as plain functions over Settings and the catalog.

Each returns a dict of facts (shown as Dagster metadata by the thin asset layer) and records the
input fingerprint it was built from, so `imnet build` can tell a fresh stage from a stale one.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable

from imnet_assets.release import changed_sources, selection
from imnet_assets.release.plan import (
    PLAN_DIR,
    PLAN_VERSION,
    publish_slices,
    release_splits,
    render_slice,
    shard_sizes,
    write_index,
)
from imnet_assets.settings import Settings
from imnet_assets.stages.csvstage import staged_csv
from imnet_assets.stages.decontam import index_inputs, settle_index
from imnet_assets.stages.index import FIELDS, ReadShort, check_accounted, scan_tars
from imnet_assets.stages.synsets import read_text_file
from imnet_assets.storage import atomic, fs
from imnet_assets.storage.catalog import Catalog, check_catalog_volume
from imnet_assets.storage.inventory import RawLayoutError, RawListing, inventory, list_raw

# 2: hostile member names get safe keys; truncated candidates trial-decoded; a pHash per kept image
# 3: each tar's bytes accounted for by its walk (tar_scans.accounted_bytes, damaged_bytes)
INDEX_VERSION = "3"
Log = Callable[[str], None]
# Stages each release has of its own (recorded under its name in `stages`); the others are shared.
RELEASE_STAGES = ("shuffled_plan", "shard_audit")


def _h(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def expected_fingerprints(settings: Settings, unpack: bool = False, log: Log = print,
                          marker_roots: list[str] | None = None) -> dict[str, str]:
    """The input fingerprint each stage would record if built now (cheap: a listing of the raw root,
    and one of the out roots' markers of changed sources). `marker_roots`: the out roots whose
    markers the shared index answers for (every release's, issue 25; default: this settings' own)."""
    listing = list_raw(settings.raw_root, unpack=unpack, log=log)
    return _fingerprints(listing, settings, _merged(_pending_markers(settings, marker_roots)))


def _pending_markers(settings: Settings, marker_roots: list[str] | None) -> dict[str, dict[str, changed_sources.Marker]]:
    """Out root -> its markers of changed sources (shard runs of each release write under its own
    out root; the index they make stale is shared)."""
    return {root: changed_sources.pending(root) for root in dict.fromkeys(marker_roots or [settings.out_root])}


def _merged(per_root: dict[str, dict[str, changed_sources.Marker]]) -> dict[str, changed_sources.Marker]:
    merged: dict[str, changed_sources.Marker] = {}
    for markers in per_root.values():
        for tar, marker in markers.items():
            merged.setdefault(tar, marker)
    return merged


def _fingerprints(listing: RawListing, settings: Settings,
                  changed: dict[str, changed_sources.Marker] | None = None) -> dict[str, str]:
    """Each stage's input fingerprint for this listing: what a stage records when it is built, and
    what `stale_stages` compares that record with. `changed`: the markers of tars whose bytes a
    shard run found changed since indexing (core/changed_sources.py): while there is one, the
    index (and so the plan) is stale, though the listing is the same."""
    # Each from what it reads: a words.txt or gloss.txt edit makes only the synset manifest stale.
    raw = _h("raw_tars", listing.tars_fingerprint)
    synsets = _h("synset_manifest", listing.fingerprint)
    # issue 17: + the eval set's listing digest and the dedup mode (nothing under the defaults)
    marks = changed_sources.digest(changed or {})
    index = _h("filtered_index", listing.tars_fingerprint, INDEX_VERSION, *index_inputs(settings), *([marks] if marks else []))
    plan = _h("shuffled_plan", index, settings.seed, settings.num_shards, settings.holdout, PLAN_VERSION,
              *release_plan_inputs(settings))
    return {"raw_tars": raw, "synset_manifest": synsets, "filtered_index": index, "shuffled_plan": plan}


def release_plan_inputs(settings: Settings) -> list:
    """What a release's plan depends on beyond the default release's inputs (issue 25): its synset
    list (the bytes of a named list) and val_per_class; nothing for the default selection (all
    synsets, no validation), so the default release's fingerprint is the one before releases. The
    codec and its settings are not here: they make only the shards stale (their fingerprints)."""
    digest = selection.list_digest(settings.synsets)
    return [digest, settings.val_per_class] if digest or settings.val_per_class else []


def stale_stages(settings: Settings, log: Log = print, marker_roots: list[str] | None = None) -> list[str]:
    """Stages whose recorded input differs from the current one (or whose output is gone): the shared
    stages, and the plan of settings.release. `marker_roots`: as expected_fingerprints."""
    from imnet_assets.release.plan import read_index

    # No unpacking here: a root holding only winter21_whole.tar.gz (or a half-unpacked one) lists
    # no (or other) tars, so raw_tars is stale and unpacks it when it runs, as the first stage.
    want = expected_fingerprints(settings, log=log, marker_roots=marker_roots)
    if not fs.exists(settings.catalog):
        return list(want)
    with Catalog(settings.catalog, read_only=True) as cat:  # a reader: never the write lock
        # what the stages' records vouch for is read whole first: damage raises CatalogDamaged
        cat.check_intact()
        have = {stage: cat.stage_fingerprint(stage, settings.release if stage in RELEASE_STAGES else "")
                for stage in want}
    stale = [s for s in want if have[s] != want[s]]
    index = read_index(settings.out_root)
    if "shuffled_plan" not in stale and (index is None or index.get("fingerprint") != want["shuffled_plan"]):
        stale.append("shuffled_plan")
    # No cascade: each fingerprint already holds its upstream's input (the plan's holds the index's,
    # which holds the tars'), so a stage whose own fingerprint matches reads what it was built from.
    return [s for s in want if s in stale]


def build_raw_tars(settings: Settings, run_id: str, log: Log = print) -> dict:
    check_catalog_volume(settings.catalog)  # before unpacking a release into a throwaway container
    listing = list_raw(settings.raw_root, unpack=True, log=log)
    if not listing.tars:
        raise RawLayoutError(listing.no_synsets(settings.raw_root))
    wanted = "<wnid>/ folders" if listing.layout == "folders" else "<wnid>.tar"
    for name in [*listing.ignored, *(f"{f}/" for f in listing.ignored_folders)]:
        log(f"ignoring {name} under the raw root (not {wanted}, words.txt or gloss.txt)")
    with Catalog(settings.catalog) as cat:
        with staged_csv(["tar", "wnid", "size", "mtime"], inventory(listing)) as path, cat.transaction():
            cat.run("raw_tars_stage", {"path": path})
            cat.run("raw_tars_replace")
            cat.set_stage("raw_tars", _fingerprints(listing, settings)["raw_tars"], run_id)
        facts = cat.one("raw_tars_summary")
    facts["ignored_files"] = len(listing.ignored)
    facts["layout"] = listing.layout
    facts["fingerprint"] = listing.tars_fingerprint
    return facts


def build_synset_manifest(settings: Settings, run_id: str, log: Log = print) -> dict:
    listing = list_raw(settings.raw_root)
    words = read_text_file(settings.raw_root, "words.txt", "words.txt" in listing.texts)
    gloss = read_text_file(settings.raw_root, "gloss.txt", "gloss.txt" in listing.texts)
    with Catalog(settings.catalog) as cat, staged_csv(["wnid", "text"], sorted(words.items())) as w, \
            staged_csv(["wnid", "text"], sorted(gloss.items())) as g:
        with cat.transaction():
            cat.run("synsets_stage_text", {"words": w, "gloss": g})
            cat.run("synsets_replace")
            cat.set_stage("synset_manifest", _fingerprints(listing, settings)["synset_manifest"], run_id)
        return cat.one("synsets_summary")


# Rows are committed IMNET_INDEX_BATCH_ROWS at a time (200,000 by default), or every
INDEX_BATCH_SECONDS = 60.0  # at most, so that a kill costs at most about a minute of scanning
SCAN_FIELDS = ["tar", "size", "mtime", "num_records", "index_version", "accounted_bytes", "damaged_bytes"]


def build_filtered_index(settings: Settings, run_id: str, log: Log = print,
                         marker_roots: list[str] | None = None) -> dict:
    """Scan new or changed tars (in parallel processes); unchanged tars keep their rows.

    Changed also means marked by a shard run that found a tar's bytes changed in place (same size
    and mtime: core/changed_sources.py); those markers are removed once the new rows are in.
    Each tar's walk must account for exactly its listed size (index.check_accounted): a read that
    came back short fails the stage naming the tar, and nothing is recorded for it.

    Crash safety: a tar's rows and its scan record (`tar_scans`, and its member count in
    `raw_tars`) are committed in one transaction, batch by batch, so a process killed at any
    moment leaves only whole tars recorded as scanned; the next run scans the others again.

    `marker_roots`: the out roots whose markers of changed sources it acts on (every release's, issue
    25; default: settings.out_root); each root's markers are removed from that root.
    """
    listing = list_raw(settings.raw_root)
    per_root = _pending_markers(settings, marker_roots)
    changed = _merged(per_root)
    started = time.perf_counter()
    with Catalog(settings.catalog) as cat:
        scanned = {t: (s, m, v) for t, s, m, v in cat.rows("index_scanned")}
        todo = [t for t in listing.tars
                if scanned.get(t["name"]) != (t["size"], t["mtime"], INDEX_VERSION) or t["name"] in changed]
        for tar in sorted(changed):
            log(f"{changed[tar].describe()}: indexing it again")
        with staged_csv(["tar"], [(t["name"],) for t in todo]) as path, cat.transaction():
            cat.run("index_stage_rescan", {"path": path})
            cat.run("index_forget_tars")
        log(f"indexing {len(todo)} of {len(listing.tars)} tars ({len(listing.tars) - len(todo)} unchanged)")
        by_url = {t["url"]: t for t in todo}
        rows: list[tuple] = []
        scans: list[tuple] = []
        done_bytes = 0
        flushed = time.monotonic()
        for n, (url, records) in enumerate(scan_tars(by_url, settings.workers, log=log,
                                                              sizes={u: t["size"] for u, t in by_url.items()}), 1):
            t = by_url[url]
            try:
                check_accounted(t["name"], records, t["size"])
            except ReadShort:
                if rows:
                    _commit_scans(cat, rows, scans)  # the tars before it were read whole
                raise
            rows.extend(records)
            scans.append((t["name"], t["size"], t["mtime"], len(records), INDEX_VERSION,
                          records.counted.structure, records.counted.damaged))
            done_bytes += t["size"]
            if (len(rows) >= settings.index_batch_rows or n == len(todo)
                    or time.monotonic() - flushed >= INDEX_BATCH_SECONDS):
                _commit_scans(cat, rows, scans)
                rows, scans, flushed = [], [], time.monotonic()
                log(f"indexed {n}/{len(todo)} tars")
        with cat.transaction():
            overlaps = settle_index(cat, settings, run_id, log)  # issue 17: eval overlaps, duplicate_of, dedup
            cat.run("index_duplicates")
            cat.run("index_count_kept")
            # recorded as it will be once the markers acted on are removed (below)
            cat.set_stage("filtered_index", _fingerprints(listing, settings)["filtered_index"], run_id)
            # The plan is made from these rows. Its fingerprint holds the index's input, which a tar
            # scanned again for a marker leaves as it was: so the plan is made again, whatever it holds.
            cat.clear_stage_every_release("shuffled_plan")
        # after the commit: a kill before this leaves the markers, and the tars are scanned once more
        for root, markers in per_root.items():
            changed_sources.clear(root, markers)
        facts = cat.one("index_summary")
        facts["reasons"] = cat.rows("index_reasons")
        facts.update(overlaps)  # issue 17
    seconds = time.perf_counter() - started
    facts.update(tars_scanned=len(todo), seconds=round(seconds, 2),
                 scan_mb_per_s=round(done_bytes / 1e6 / seconds, 1) if seconds > 0 else 0.0)
    return facts


def _commit_scans(cat: Catalog, rows: list[tuple], scans: list[tuple]) -> None:
    """Load these tars' rows and record them as scanned, all or nothing."""
    with staged_csv(FIELDS, rows) as rows_path, staged_csv(SCAN_FIELDS, scans) as scans_path, cat.transaction():
        cat.run("index_load", {"path": rows_path})
        cat.run("index_record_scans", {"path": scans_path})


def build_shuffled_plan(settings: Settings, run_id: str, log: Log = print,
                        marker_roots: list[str] | None = None) -> dict:
    """The release's plan (settings.release; '' the default): its synsets and labels
    (release/selection.py), the validation choice (val_per_class), the seeded shuffle cut into
    balanced shards, and one slice file per shard published under the release's out root (shard
    runs read only that: labels and all). Other releases' plans in the catalog are not touched.
    `marker_roots`: as expected_fingerprints (the index's input, which the plan's fingerprint holds)."""
    fps = expected_fingerprints(settings, marker_roots=marker_roots)
    started = time.perf_counter()
    for leftover in atomic.sweep_partials(fs.join(settings.out_root, PLAN_DIR)):
        log(f"removed leftover of an interrupted run: {leftover}")
    splits = release_splits(settings)  # (a holdout split named validation beside val_per_class: an error)
    keys = settings.partition_keys
    params = {"release": settings.release, "seed": settings.seed, "num_shards": settings.num_shards,
              "validation_shards": settings.validation_shards, "val_per_class": settings.val_per_class}
    with Catalog(settings.catalog) as cat:
        chosen = selection.select(settings.synsets, [w for (w,) in cat.rows("synsets_wnids")])
        if note := chosen.note():
            log(note)
        cat.clear_stage("shuffled_plan", settings.release)  # a kill below: the plan is made again
        with staged_csv(["wnid", "label"], chosen.rows) as path, cat.transaction():
            cat.run("release_synsets_replace", {"release": settings.release, "path": path})
            cat.run("plan_validation", params)
            cat.run("plan_build", params)
        digests = publish_slices(cat, settings.out_root, keys, release=settings.release)
        facts = cat.one("plan_summary", params)
        planned = dict(cat.rows("plan_shard_lengths", params))
        short = cat.rows("plan_validation_short", {**params, "first_validation": keys[settings.num_shards]}) \
            if settings.validation_shards else []
        cat.set_stage("shuffled_plan", fps["shuffled_plan"], run_id, settings.release)
    if set(planned) - set(keys):
        raise AssertionError(f"plan rows for shards outside the partition keys: {sorted(set(planned) - set(keys))[:5]}")
    lengths = [planned.get(k, 0) for k in keys]
    train = lengths[:settings.num_shards]
    validation = lengths[settings.num_shards:]
    for name, part, count in (("train", train, settings.num_shards), ("validation", validation, settings.validation_shards)):
        if count and part != shard_sizes(sum(part), count):
            raise AssertionError(f"plan {name} shard sizes {part[:8]}... are not balanced for {sum(part)} samples")
    n = sum(lengths)
    index = {
        "fingerprint": fps["shuffled_plan"], "seed": settings.seed, "num_shards": settings.num_shards,
        "num_samples": n, "shard_lengths": lengths, "holdout": [list(h) for h in settings.holdout],
        "digests": digests, "empty_slice_digest": hashlib.sha256(render_slice([])).hexdigest(),
    }
    if settings.release or settings.synsets != selection.ALL or settings.val_per_class:
        # issue 25: what plan_mismatch compares beyond seed and shard count (absent: the default release's)
        index.update(release=settings.release, synsets=settings.synsets, val_per_class=settings.val_per_class,
                     validation_shards=settings.validation_shards, splits=splits)
    write_index(settings.out_root, index)
    # Slices of shards this layout no longer has (IMNET_NUM_SHARDS lowered): no run may read them.
    ours = {f"{k}.csv" for k in keys}
    for e in fs.listdir(fs.join(settings.out_root, PLAN_DIR)):
        if re.fullmatch(r"\d{4}\.csv", e["name"]) and e["name"] not in ours:
            fs.remove(e["url"])
            log(f"removed the slice of a shard this plan does not have: {e['name']}")
    facts.update(seconds=round(time.perf_counter() - started, 2), num_shards=settings.num_shards,
                 seed=settings.seed)
    if settings.release or settings.synsets != selection.ALL or settings.val_per_class:
        facts.update(release=settings.release, synsets=settings.synsets, classes=len(chosen.wnids),
                     absent_synsets=len(chosen.absent))
    if settings.val_per_class:
        facts.update(validation_samples=sum(validation), validation_shards=settings.validation_shards,
                     val_per_class=settings.val_per_class, validation_short_classes=len(short))
        if short:
            wnid, have, val = short[0]
            log(f"{len(short)} classes have too few images for {settings.val_per_class} validation images (one stays "
                f"in train), e.g. {wnid}: {have} planned, {val} to validation")
    return facts
