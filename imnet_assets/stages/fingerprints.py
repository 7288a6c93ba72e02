"""What each catalog stage is built from, as a fingerprint: the stage records it when it is built,
and `stale_stages` compares the record with what it would be now (a listing of the raw root, the
out roots' markers of changed sources, the settings each stage reads). The stage modules sit on it.
"""


from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from imnet_assets.release import changed_sources, selection
from imnet_assets.release.plan import (
    PLAN_VERSION,
)
from imnet_assets.settings import Settings
from imnet_assets.stages.decontam import index_inputs
from imnet_assets.storage import fs
from imnet_assets.storage.catalog import Catalog
from imnet_assets.storage.inventory import RawListing, list_raw

# 2: hostile member names get safe keys; truncated candidates trial-decoded; a pHash per kept image
# 3: each tar's bytes accounted for by its walk (tar_scans.accounted_bytes, damaged_bytes)
# 4: the trial decode refuses a cut-short PNG, GIF, ... of which under 5% of the rows decode (as the
#    encoder does since ENCODER_VERSION 3), and decodes TIFF, BMP, ... (no end marker) to know; a tar
#    scanned by version 3 that holds JPEGs alone is not read again (sql/index_version_upgrade.sql)
INDEX_VERSION = "4"
# the synset manifest's: 2, a wnid words.txt / gloss.txt lacks gets the shipped table's text
SYNSETS_VERSION = "2"
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
    return listing_fingerprints(listing, settings, merged_markers(pending_markers(settings, marker_roots)))


def pending_markers(settings: Settings, marker_roots: list[str] | None) -> dict[str, dict[str, changed_sources.Marker]]:
    """Out root -> its markers of changed sources (shard runs of each release write under its own
    out root; the index they make stale is shared)."""
    return {root: changed_sources.pending(root) for root in dict.fromkeys(marker_roots or [settings.out_root])}


def merged_markers(per_root: dict[str, dict[str, changed_sources.Marker]]) -> dict[str, changed_sources.Marker]:
    merged: dict[str, changed_sources.Marker] = {}
    for markers in per_root.values():
        for tar, marker in markers.items():
            merged.setdefault(tar, marker)
    return merged


def listing_fingerprints(listing: RawListing, settings: Settings,
                  changed: dict[str, changed_sources.Marker] | None = None) -> dict[str, str]:
    """Each stage's input fingerprint for this listing: what a stage records when it is built, and
    what `stale_stages` compares that record with. `changed`: the markers of tars whose bytes a
    shard run found changed since indexing (release/changed_sources.py): while there is one, the
    index (and so the plan) is stale, though the listing is the same."""
    # Each from what it reads: a words.txt or gloss.txt edit makes only the synset manifest stale.
    raw = _h("raw_tars", listing.tars_fingerprint)
    synsets = _h("synset_manifest", listing.fingerprint, SYNSETS_VERSION)
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
    from imnet_assets.release.plan import read_index, slices_missing

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
    if "shuffled_plan" not in stale and (index is None or index.get("fingerprint") != want["shuffled_plan"]
                                         or slices_missing(settings.out_root, index)):
        stale.append("shuffled_plan")  # also when a shard run moved a damaged slice aside (plan.read_slice)
    # No cascade: each fingerprint already holds its upstream's input (the plan's holds the index's,
    # which holds the tars'), so a stage whose own fingerprint matches reads what it was built from.
    return [s for s in want if s in stale]
