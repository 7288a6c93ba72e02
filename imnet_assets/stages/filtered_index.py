"""filtered_index: every raw member's row (probe, hashes, exclusions), new or changed tars scanned in
parallel, committed a batch of whole tars at a time."""


from __future__ import annotations

import time

from imnet_assets.release import changed_sources
from imnet_assets.settings import Settings
from imnet_assets.stages.csvstage import staged_csv
from imnet_assets.stages.decontam import settle_index
from imnet_assets.stages.fingerprints import (
    INDEX_VERSION,
    Log,
    listing_fingerprints,
    merged_markers,
    pending_markers,
)
from imnet_assets.stages.index import FIELDS, ReadShort, check_accounted
from imnet_assets.stages.scan_pool import scan_tars
from imnet_assets.stages.staged_encodes import STAGED_FIELDS, StagedCodec
from imnet_assets.storage import atomic
from imnet_assets.storage.catalog import Catalog
from imnet_assets.storage.inventory import list_raw

# Rows are committed IMNET_INDEX_BATCH_ROWS at a time (200,000 by default), or every
INDEX_BATCH_SECONDS = 60.0  # at most, so that a kill costs at most about a minute of scanning
SCAN_FIELDS = ["tar", "size", "mtime", "num_records", "index_version", "accounted_bytes", "damaged_bytes"]


def build_filtered_index(settings: Settings, run_id: str, log: Log = print,
                         marker_roots: list[str] | None = None, codecs: tuple[StagedCodec, ...] = ()) -> dict:
    """Scan new or changed tars (in parallel processes); unchanged tars keep their rows.

    Changed also means marked by a shard run that found a tar's bytes changed in place (same size
    and mtime: release/changed_sources.py); those markers are removed once the new rows are in.
    Each tar's walk must account for exactly its listed size (index.check_accounted): a read that
    came back short fails the stage naming the tar, and nothing is recorded for it.

    Crash safety: a tar's rows and its scan record (`tar_scans`, and its member count in
    `raw_tars`) are committed in one transaction, batch by batch, so a process killed at any
    moment leaves only whole tars recorded as scanned; the next run scans the others again.

    `marker_roots`: the out roots whose markers of changed sources it acts on (every release's, issue
    25; default: settings.out_root); each root's markers are removed from that root. `codecs`: the
    scan encodes each kept image for these too (staged_encodes.staging_plan of the releases); a
    tar's staged encodes are committed with its rows.
    """
    listing = list_raw(settings.raw_root)
    per_root = pending_markers(settings, marker_roots)
    changed = merged_markers(per_root)
    started = time.perf_counter()
    with Catalog(settings.catalog) as cat:
        with cat.transaction():  # version 3's scans of tars with JPEGs alone stand as version 4's
            cat.run("index_version_upgrade", {"version": INDEX_VERSION})
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
        staged: list[tuple] = []
        done_bytes = 0
        flushed = time.monotonic()
        for codec in codecs:  # a kill during an earlier pass leaves a staged file's temporary behind
            for leftover in atomic.sweep_partials(codec.root):
                log(f"removed leftover of an interrupted run: {leftover}")
        if codecs and todo:
            log(f"encoding each kept image as it is read, for {', '.join(c.identity for c in codecs)}: the shard "
                "runs take them from there")
        for n, (url, records) in enumerate(scan_tars(by_url, settings.workers, log=log, codecs=codecs,
                                                     sizes={u: t["size"] for u, t in by_url.items()},
                                                     time_limit=settings.image_timeout), 1):
            t = by_url[url]
            try:
                check_accounted(t["name"], records, t["size"])
            except ReadShort:
                if rows:
                    _commit_scans(cat, rows, scans, staged)  # the tars before it were read whole
                raise
            rows.extend(records)
            staged.extend(records.staged)
            scans.append((t["name"], t["size"], t["mtime"], len(records), INDEX_VERSION,
                          records.counted.structure, records.counted.damaged))
            done_bytes += t["size"]
            if (len(rows) >= settings.index_batch_rows or n == len(todo)
                    or time.monotonic() - flushed >= INDEX_BATCH_SECONDS):
                _commit_scans(cat, rows, scans, staged)
                rows, scans, staged, flushed = [], [], [], time.monotonic()
                log(f"indexed {n}/{len(todo)} tars")
        with cat.transaction():
            # issue 17: eval overlaps, duplicate_of, repeated keys, dedup
            overlaps = settle_index(cat, settings, run_id, log)
            cat.run("index_count_kept")
            # recorded as it will be once the markers acted on are removed (below)
            cat.set_stage("filtered_index", listing_fingerprints(listing, settings)["filtered_index"], run_id)
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


def _commit_scans(cat: Catalog, rows: list[tuple], scans: list[tuple], staged: list[tuple]) -> None:
    """Load these tars' rows (and their staged encodes) and record them as scanned, all or nothing."""
    with staged_csv(FIELDS, rows) as rows_path, staged_csv(SCAN_FIELDS, scans) as scans_path, \
            staged_csv(STAGED_FIELDS, staged) as staged_path, cat.transaction():
        cat.run("index_load", {"path": rows_path})
        cat.run("index_record_scans", {"path": scans_path})
        if staged:
            cat.run("staged_load", {"path": staged_path})
