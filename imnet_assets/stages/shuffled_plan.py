"""shuffled_plan: each release's plan (its selection, labels, validation split, the seeded shuffle into
balanced shards) in the catalog and as one slice per shard under its out root."""


from __future__ import annotations

import hashlib
import re
import time

from imnet_assets.release import selection
from imnet_assets.release.plan import (
    DAMAGED_SUFFIX,
    PLAN_DIR,
    publish_slices,
    release_splits,
    render_slice,
    shard_sizes,
    write_index,
)
from imnet_assets.settings import Settings
from imnet_assets.stages.csvstage import staged_csv
from imnet_assets.stages.fingerprints import Log, expected_fingerprints
from imnet_assets.stages.staged_encodes import LOOKUP_SUFFIX, publish_lookups
from imnet_assets.storage import atomic, fs
from imnet_assets.storage.catalog import Catalog, held_to


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
              "validation_shards": settings.validation_shards, "val_per_class": settings.val_per_class,
              "memory_limit": held_to(3 << 30), "slices_memory_limit": held_to(2 << 30)}
    with Catalog(settings.catalog) as cat:
        chosen = selection.select(settings.synsets, [w for (w,) in cat.rows("synsets_wnids")])
        if note := chosen.note():
            log(note)
        cat.clear_stage("shuffled_plan", settings.release)  # a kill below: the plan is made again
        with staged_csv(["wnid", "label"], chosen.rows) as path, cat.transaction():
            cat.run("release_synsets_replace", {"release": settings.release, "path": path})
            cat.run("plan_validation", params)
            cat.run("plan_build", params)
        sizes: dict[str, int] = {}
        digests = publish_slices(cat, settings.out_root, keys, release=settings.release, sizes=sizes)
        staged = publish_lookups(cat, settings, keys, log)  # issue 25: images the index encoded for it
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
        "num_samples": n, "shard_lengths": lengths, "slice_bytes": [sizes[k] for k in sorted(digests)],
        "holdout": [list(h) for h in settings.holdout],
        "digests": digests, "empty_slice_digest": hashlib.sha256(render_slice([])).hexdigest(),
    }
    if settings.release or settings.synsets != selection.ALL or settings.val_per_class:
        # issue 25: what plan_mismatch compares beyond seed and shard count (absent: the default release's)
        index.update(release=settings.release, synsets=settings.synsets, val_per_class=settings.val_per_class,
                     validation_shards=settings.validation_shards, splits=splits)
    write_index(settings.out_root, index)
    # Slices of shards this layout no longer has (IMNET_NUM_SHARDS lowered): no run may read them.
    ours = {f"{k}{suffix}" for k in keys for suffix in (".csv", LOOKUP_SUFFIX)}
    for e in fs.listdir(fs.join(settings.out_root, PLAN_DIR)):
        if re.fullmatch(rf"\d{{4}}(\.csv|{re.escape(LOOKUP_SUFFIX)})", e["name"]) and e["name"] not in ours:
            fs.remove(e["url"])
            log(f"removed the slice of a shard this plan does not have: {e['name']}")
        elif e["name"].endswith(DAMAGED_SUFFIX):  # a shard run found it damaged: written anew above
            fs.remove(e["url"])
            log(f"removed the damaged slice a shard run moved aside: {e['name']}")
    facts.update(seconds=round(time.perf_counter() - started, 2), num_shards=settings.num_shards,
                 seed=settings.seed)
    if staged:
        facts.update(staged_images=staged)
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
