"""shard_audit: reconcile the plan against the committed shards and publish `_info.json`.

The audit is the only process that writes shard facts into the catalog: it reads every shard's
manifest from the out root (local or S3), loads them with one SQL statement, and checks that
every planned image is in its shard or recorded as excluded, none twice, none misplaced.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from imnet_assets.image.encode import encode_settings
from imnet_assets.release import card, changed_sources
from imnet_assets.release.freshness import OutRootLook, look_at_shards
from imnet_assets.release.info import info_document, info_url, render_info
from imnet_assets.release.outroot import (
    MANIFEST_DIR,
    committed_as,
    forget_commit_unless_held,
    manifest_limits,
    manifest_url,
    read_manifests,
    stray_problem,
    what_changed,
    written_elsewhere,
)
from imnet_assets.release.plan import read_index
from imnet_assets.settings import Settings, validation_pattern
from imnet_assets.stages.published import classes_url, read_info, render_classes, sealed
from imnet_assets.stages.shard import fingerprint
from imnet_assets.storage import atomic, fs
from imnet_assets.storage.catalog import Catalog, held_to


class PlanOutdated(RuntimeError):
    """The published plan was made for another shard layout than the settings ask for."""


def plan_mismatch(settings: Settings, index: dict | None) -> str | None:
    """Why the published plan (its index) is not the plan these settings make, as far as the
    settings alone tell (seed and shard count; a changed raw input takes a catalog to see), or None.
    Shards cut from such a plan are not what the settings ask for, whatever their state. (The
    holdout only names splits in `_info.json`: shards do not depend on it.)"""
    if index is None:
        return None
    had = (index.get("seed"), index.get("num_shards"))
    want = (settings.seed, settings.num_shards)
    # issue 25: a release's selection and validation (an index without them: the default release's)
    had_release = (index.get("synsets", "all"), index.get("val_per_class", 0))
    want_release = (settings.synsets, settings.val_per_class)
    if had_release != want_release and had == want:
        return (f"the plan under {fs.redact(settings.out_root)} was made for synsets {had_release[0]!r} with "
                f"{had_release[1]} validation images a class; the settings ask for {want_release[0]!r} with "
                f"{want_release[1]}: materialize shuffled_plan (`imnet build` does) before any shard")
    if had == want:
        return None
    return (f"the plan under {fs.redact(settings.out_root)} was made with seed {had[0]}, {had[1]} shards; the "
            f"settings ask for seed {want[0]}, {want[1]} shards (IMNET_SEED, IMNET_NUM_SHARDS): materialize "
            "shuffled_plan (`imnet build` does) before any shard")


def require_current_plan(settings: Settings) -> dict:
    """The published plan's index; raises FileNotFoundError when there is none, PlanOutdated when it
    does not match the settings (see plan_mismatch)."""
    index = read_index(settings.out_root)
    if index is None:
        raise FileNotFoundError(f"no plan under {fs.redact(settings.out_root)}: materialize shuffled_plan first")
    if why := plan_mismatch(settings, index):
        raise PlanOutdated(why)
    return index


def expected_shard_fingerprints(settings: Settings) -> dict[str, str]:
    """Partition key -> the fingerprint a fresh shard carries under the current plan and settings
    (none when the plan is missing or made for other settings: then no shard is fresh)."""
    return shard_fingerprints(settings, read_index(settings.out_root))


def shard_fingerprints(settings: Settings, index: dict | None) -> dict[str, str]:
    if index is None or plan_mismatch(settings, index):
        return {}
    enc = encode_settings(settings)
    return {k: fingerprint(d, enc) for k, d in index["digests"].items()}


IMAGE_BUCKET = 64  # pixels of source short side per bucket of the image size distribution


@dataclass
class AuditReport:
    totals: dict
    reconcile: dict
    per_shard: list[dict]
    reasons: list[dict]
    class_sizes: list[tuple]
    image_sizes: list[tuple]
    missing: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    bad_files: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)
    conservation: list[str] = field(default_factory=list)  # sql/audit_conservation.sql
    changed_sources: list[str] = field(default_factory=list)  # raw tars a shard run found changed
    info_written: bool = False
    lengths: dict[str, int] = field(default_factory=dict)  # shard key -> samples, from its manifest
    class_bucket: int = 1  # width of class_sizes' buckets (samples per class): bucket b is b .. b+width-1
    image_bucket: int = IMAGE_BUCKET  # width of image_sizes' buckets (pixels of short side)

    @property
    def problems(self) -> list[str]:
        out = []
        r = self.reconcile
        for name in ("lost", "duplicated", "misplaced", "unplanned"):
            if r.get(name):
                extra = f" e.g. {r['lost_examples']}" if name == "lost" else ""
                out.append(f"{r[name]} planned images {name}{extra}")
        if self.missing:
            out.append(f"{len(self.missing)} shards missing: {self.missing[:10]}")
        if self.stale:
            out.append(f"{len(self.stale)} shards stale (written from another plan or settings): {self.stale[:10]}")
        out.extend(self.bad_files)
        if self.stray:
            out.append(stray_problem(self.stray))
        out.extend(self.conservation)
        out.extend(f"{c}: the index is stale (`imnet build` indexes it again)" for c in self.changed_sources)
        return out


def look_at_release(settings: Settings) -> OutRootLook:
    """Every shard's commit record and tar under the out root (two listings, one concurrent batch
    of small reads: see release.freshness)."""
    keys = settings.partition_keys
    return look_at_shards(settings.out_root, keys, [settings.shard_name(k) for k in keys])


def run_audit(settings: Settings, run_id: str, log: Callable[[str], None] = print) -> AuditReport:
    for leftover in atomic.sweep_partials(settings.out_root):
        log(f"removed leftover of an interrupted run: {leftover}")
    # One look at every shard's tar and commit record, taken before the manifests are loaded.
    look = look_at_release(settings)
    audit_inputs = _audit_inputs(settings, look)
    index = require_current_plan(settings)
    expected = shard_fingerprints(settings, index)
    limits = manifest_limits(settings.partition_keys, index)  # a larger manifest is damaged: never read whole
    with Catalog(settings.catalog) as cat:
        cat.check_intact()  # the audit vouches for the whole catalog: damage raises CatalogDamaged
        cat.run("audit_memory", {"memory_limit": held_to(3 << 30)})
        if fs.is_remote(settings.out_root):  # the fallback's audit_load reads the manifests there
            cat.con.register_filesystem(fs.filesystem(settings.out_root)[0])
        heads = _load_manifests(cat, settings, limits)
        # a manifest DuckDB could not load: each one is read in Python instead
        manifests = read_manifests(settings.out_root, limits) if heads is None else heads
        present, missing, stale, bad = [], [], [], []
        lengths: dict[str, int] = {}
        for key in settings.partition_keys:
            url, manifest = manifest_url(settings.out_root, key), manifests.get(key)
            on_storage, state = look.shards[key].tar, look.shards[key].state
            replaced = state and on_storage and what_changed(state, on_storage, look.shards[key].manifest)
            if manifest is not None and heads is not None and _not_as_looked(manifest["read"], look.shards[key].manifest,
                                                                             state):
                replaced = "its manifest"  # replaced since the look: what was loaded is not the committed one
            if manifest is None or on_storage is None or replaced == "its manifest":  # not the committed one: not loaded
                missing.append(key)
                if on_storage is not None and forget_commit_unless_held(settings.out_root, key, state,
                                                                           f"the audit of run {run_id}"):
                    why = (f"holds more than {limits[key]:,} bytes, more than a manifest of its planned samples can"
                           if (look.shards[key].manifest or (0,))[0] > limits[key] else
                           "does not parse, or its size or stamp is not the committed one's")
                    bad.append(f"shard {key}: its manifest {fs.redact(url)} is missing or damaged ({why}): its "
                               "commit record is removed, so `imnet build` builds the shard again")
                continue
            if manifest.get("fingerprint") != expected.get(key):
                stale.append(key)
                continue
            size, _stamp = on_storage
            if size != manifest["bytes"]:
                bad.append(f"shard {key}: {size} bytes on storage, manifest says {manifest['bytes']}")
            elif changed := _changed_in_place(key, state, on_storage):
                bad.append(changed)
            present.append(url)
            lengths[key] = manifest["num_samples"]
        # Every catalog write below is one transaction: an audit killed at any moment leaves the
        # catalog as the last complete audit left it (the manifests' temp table is not part of it).
        cat.con.begin()
        release = {"release": settings.release}  # the catalog holds every release's shard rows
        if present:
            if heads is None:
                cat.run("audit_load", {"files": present})
            else:  # keep the rows of the files loaded for these shards, by the names DuckDB gave them
                keep = {heads[k]["filename"] for k in lengths}
                cat.run("audit_keep", {"files": sorted(keep)})
            cat.run("audit_replace", release)
            _mark_repaired(cat, settings.release)
            cat.run("audit_mark_excluded")
        else:
            cat.run("audit_clear", release)
        reconcile = cat.one("audit_reconcile", release)
        totals = cat.one("audit_totals", release)
        class_bucket = _bucket_width(totals)
        report = AuditReport(
            totals=totals,
            reconcile=reconcile,
            per_shard=cat.dicts("audit_per_shard", release),
            reasons=cat.dicts("audit_reasons", release),
            class_sizes=cat.rows("audit_class_sizes", {"width": class_bucket, **release}),
            image_sizes=cat.rows("audit_image_sizes", {"width": IMAGE_BUCKET, **release}),
            missing=missing, stale=stale, bad_files=bad, stray=stray_shards(settings, look.names, look.manifests),
            conservation=conservation_problems(cat, settings.release), lengths=lengths, class_bucket=class_bucket,
            changed_sources=[m.describe() for m in changed_sources.pending(settings.out_root).values()],
        )
        if report.problems:
            cat.clear_stage("shard_audit", settings.release)  # only a clean audit is fresh: this one is done again
        cat.con.commit()
        # timm and users take _info.json as "this release is complete": only a clean audit writes
        # it, and the audit is recorded as done only once it and the card are written (a kill in
        # between: the next build audits again). The same connection reads what was just committed
        # (one opening of the catalog for the whole audit, ~0.1 s of CPU less than four).
        if not report.problems:
            info = info_document(settings, lengths, cat)
            atomic.write_atomic(info_url(settings), render_info(info))
            report.info_written = True
            atomic.write_atomic(classes_url(settings), render_classes(cat.rows("classes_tsv", release)))
            card.write_card(settings, report, cat, info)  # issue 17: the dataset card, <out>/README.md
            if audit_inputs:  # recorded with the files as written: damage to one of them is not fresh
                cat.set_stage("shard_audit", sealed(settings, audit_inputs), run_id, settings.release)
    if report.problems:
        log(f"_info.json not written: {'; '.join(report.problems)[:500]}")
    return report


CONSERVATION_SHOWN = 50  # differences named; the rest are counted


def conservation_problems(cat: Catalog, release: str = "") -> list[str]:
    """Every raw member accounted for (SPEC: Failure behaviour): per tar, images rows = members
    counted from its headers; kept (of the release's synsets) = the release's planned; per written
    shard of the release, planned = samples + encode-time exclusions. Each difference names its tar
    or shard; empty when everything adds up."""
    found = [p for (p,) in cat.rows("audit_conservation", {"release": release})]
    if len(found) > CONSERVATION_SHOWN:
        found = found[:CONSERVATION_SHOWN] + [f"... and {len(found) - CONSERVATION_SHOWN} more conservation differences"]
    return found


def _changed_in_place(key: str, state: dict | None, size_stamp: tuple[int, str]) -> str | None:
    """A problem when the shard file (of the manifest's size) is not the one its run committed
    (`state`, its commit record): another stamp (edited in place, or copied without keeping
    times; see outroot.what_changed)."""
    if state is None or what_changed(state, size_stamp, None) != "the shard file":
        return None
    return (f"shard {key}: the file on storage is not the one run {state.get('run_id')} committed (its mtime or "
            "ETag changed: edited in place, or copied without keeping times): `imnet build` writes it again")


SPOOL_PREFIX = ".audit-manifests-"


def _load_manifests(cat: Catalog, settings: Settings, limits: dict[str, int] | None = None) -> dict[str, dict] | None:
    """Load every manifest present under the out root into the `manifests` temp table with one
    SQL statement, and return the fields the audit checks per manifest, by shard key.

    Parsing the manifests once in DuckDB rather than once more in Python saves ~40 s at the real
    release's size. On S3 the manifests are first copied into a spool folder next to the catalog,
    128 GETs in flight (`fs.read_many`; DuckDB reading them through fsspec kept 2 in flight: 110 s
    for 1,024 manifests at 20 ms a request), one GET each; the spool (~2.6 GB at the real size)
    is deleted once they are loaded, and a leftover of a killed audit at the next audit.
    Returns None when a manifest cannot be loaded that way (unreadable, not the layout shard runs
    write): the caller then reads each manifest in Python, as `read_manifest` does, so a damaged
    manifest counts as a missing shard either way. `limits`: shard key -> the most bytes its
    manifest can hold (outroot.manifest_limits); one listed or read larger is not loaded (damaged).
    Each head's `read`: what was loaded (`size`, and the `sha256` of the spooled bytes on S3, or the
    `stamp` of the local file once loaded: one replaced before the load has another; `_not_as_looked`).
    """
    limits = limits or manifest_limits(settings.partition_keys, None)
    sizes = {e["name"]: e["size"] for e in fs.listdir(fs.join(settings.out_root, MANIFEST_DIR))}
    keys = [k for k in settings.partition_keys if f"{k}.json" in sizes and sizes[f"{k}.json"] <= limits[k]]
    if not keys:
        return {}
    folder = Path(settings.catalog).resolve().parent
    for leftover in folder.glob(f"{SPOOL_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    spool = Path(tempfile.mkdtemp(prefix=SPOOL_PREFIX, dir=folder)) if fs.is_remote(settings.out_root) else None
    read: dict[str, dict] = {}
    try:
        files = _spool_manifests(settings, keys, spool, limits, read) if spool else [manifest_url(settings.out_root, k)
                                                                                for k in keys]
        if not files:
            return {}
        cat.run("audit_load", {"files": files})
        rows = cat.rows("audit_manifest_heads")
    except duckdb.Error:
        return None
    finally:
        if spool:
            shutil.rmtree(spool, ignore_errors=True)
    heads = {fs.basename(filename)[: -len(".json")]: {"fingerprint": fp, "bytes": size, "num_samples": n,
                                                       "filename": filename}
             for filename, fp, size, n in rows}
    if len(rows) != len(files) or set(heads) != {fs.basename(f)[: -len(".json")] for f in files}:  # one object per file
        return None
    for key, head in heads.items():
        if spool is None:  # DuckDB read the file in place: as it is once loaded (a stat, no request)
            try:
                size, stamp = fs.stat(head["filename"])
            except FileNotFoundError:
                size = stamp = None
            read[key] = {"size": size, "stamp": stamp}
        head["read"] = read.get(key, {})
    return heads


def _not_as_looked(read: dict, looked: tuple[int, str] | None, state: dict | None) -> bool:
    """Whether a manifest as loaded (`read`: _load_manifests's) is not the one the audit's look listed
    (`looked`: size and stamp) and its commit record `state` committed (`manifest_sha256`): replaced
    in between. What a read did not give is not compared."""
    if looked is None:
        return False  # none was listed: the look's own verdict
    if "size" in read and read["size"] != looked[0] or "stamp" in read and read["stamp"] != looked[1]:
        return True
    committed = state.get("manifest_sha256") if isinstance(state, dict) else None
    return bool(committed and read.get("sha256") and read["sha256"] != committed)


SPOOL_BATCH = 128  # manifests in flight, and held in memory at once (~330 MB at the real size)


def _spool_manifests(settings: Settings, keys: list[str], spool: Path, limits: dict[str, int],
                     read: dict[str, dict]) -> list[str]:
    """Copy the keys' manifests from the out root into `spool` (`<key>.json`); the local paths of
    those that are there (one gone since the listing, or over its limit now: a missing shard).
    `read`: filled with each one's size and sha256, as copied."""
    files = []
    for i in range(0, len(keys), SPOOL_BATCH):
        urls = {manifest_url(settings.out_root, k): k for k in keys[i:i + SPOOL_BATCH]}
        for url, data in fs.read_many(list(urls), limit={u: limits[k] for u, k in urls.items()},
                                      kind="a shard's manifest", too_large_as_none=True).items():
            if data is not None:
                path = spool / f"{urls[url]}.json"
                path.write_bytes(data)
                files.append(str(path))
                read[urls[url]] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return files


def _mark_repaired(cat: Catalog, release: str = "", batch: int = 64) -> None:
    """audit_mark_repaired over ranges of `batch` shards of the release (one UPDATE of every image is slow)."""
    shards = [shard for (shard,) in cat.rows("audit_sample_shards", {"release": release})]
    for chunk in (shards[i:i + batch] for i in range(0, len(shards), batch)):
        cat.run("audit_mark_repaired", {"first": chunk[0], "last": chunk[-1], "release": release})


def _bucket_width(total: dict) -> int:
    """The class-size histogram's bucket width from the release's totals (sql/audit_totals.sql)."""
    per_class = (total.get("samples") or 0) / max(total.get("synsets") or 1, 1)
    return max(1, int(per_class // 10) or 1)


def check_info(settings: Settings, lengths: dict[str, int] | None = None) -> list[str]:
    """`_info.json` is exactly the document the shards' manifests give (names, order, splits,
    lengths, totals). `lengths`: shard key -> samples as the audit loaded them from the manifests
    (AuditReport.lengths), so that no manifest is read twice; else the manifests are read (at once)."""
    doc, problems = read_info(settings)  # (one larger than this release's can be: read no further)
    if problems:
        return problems
    if lengths is None or set(lengths) != set(settings.partition_keys):
        docs = read_manifests(settings.out_root, manifest_limits(settings.partition_keys, read_index(settings.out_root)))
        lengths = {}
        for key, manifest in docs.items():
            if manifest is None:
                return [f"shard {key} has no manifest (or a damaged one): _info.json cannot be checked against it"]
            lengths[key] = manifest["num_samples"]
    return info_differences(doc, info_document(settings, lengths))


def info_differences(doc, expected: dict) -> list[str]:
    """How an `_info.json` document differs from the expected one (empty when they are equal)."""
    if doc == expected:
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("splits"), dict):
        return ["_info.json has no 'splits' object"]
    problems = []
    if doc.get("name") != expected["name"]:
        problems.append(f"_info.json name {doc.get('name')!r}, expected {expected['name']!r}")
    got, want = doc["splits"], expected["splits"]
    problems += [f"_info.json split {n!r} is not one of this release's splits {sorted(want)}"
                 for n in sorted(set(got) - set(want))]
    problems += [f"_info.json split {n!r} is missing" for n in sorted(set(want) - set(got))]
    for name in [n for n in want if n in got]:
        g, w = got[name], want[name]
        if not isinstance(g, dict):
            problems.append(f"_info.json split {name!r} is not an object")
            continue
        for key in ("name", "filenames", "shard_lengths", "num_samples"):
            if g.get(key) != w[key]:
                problems.append(f"_info.json split {name!r}: {key} {_list_difference(g.get(key), w[key])}")
    if set(doc) - {"name", "splits"}:
        problems.append(f"_info.json has fields the audit does not write: {sorted(set(doc) - {'name', 'splits'})}")
    return problems or ["_info.json differs from the document the audit writes"]


def _list_difference(got, want) -> str:
    if not isinstance(got, list) or not isinstance(want, list):
        return f"is {json.dumps(got)[:80]}, expected {json.dumps(want)[:80]}"
    if len(got) == len(want) and sorted(map(str, got)) == sorted(map(str, want)):
        at = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        return f"same entries in another order (first at position {at}: {got[at]!r}, expected {want[at]!r})"
    if len(got) != len(want):
        detail = f"{len(got)} entries, expected {len(want)}"
    else:
        at = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        detail = f"entry {at} is {got[at]!r}, expected {want[at]!r}"
    extra = [x for x in got if x not in want][:3]
    lacking = [x for x in want if x not in got][:3]
    if extra and all(isinstance(x, str) for x in extra):
        detail += f"; not expected: {extra}"
    if lacking and all(isinstance(x, str) for x in lacking):
        detail += f"; missing: {lacking}"
    return detail


def stray_shards(settings: Settings, names: list[str] | None = None, manifests: list[str] | None = None) -> list[str]:
    """Files beside the shards, named like shards, that are no shard of this release: left by a build
    with more shards, or written under another IMNET_SHARD_PATTERN (earlier commit records name them:
    outroot.written_elsewhere). A glob of the folder (`hf upload`) reads their images twice.
    `names`, `manifests`: the out root's and its manifests folder's file names when already listed."""
    if names is None:
        names = [e["name"] for e in fs.listdir(settings.out_root)]
    patterns = [settings.shard_pattern]
    if settings.validation_shards:  # a release's validation shards have a pattern of their own
        patterns.append(validation_pattern(settings.shard_pattern))
    ours = {settings.shard_name(k) for k in settings.partition_keys}
    found = []
    for pattern in patterns:
        named = re.compile(r"(\d{4})".join(map(re.escape, pattern.format(shard="\0").split("\0"))))
        found += [n for n in names if (m := named.fullmatch(n)) and n not in ours and n not in found
                  and pattern.format(shard=m.group(1)) == n]
    elsewhere = written_elsewhere(settings.out_root, list(settings.partition_keys), manifests) & set(names)
    return found + sorted(elsewhere - ours - set(found))


def audit_fingerprint(settings: Settings, look: OutRootLook | None = None) -> str | None:
    """The audit's record when it is fresh: what its output depends on (`_audit_inputs`), sealed
    with the files it published as they are on storage now (`sealed`), so that a damaged, cut or
    emptied `_info.json`, `classes.tsv` or card is not fresh and the next build audits again and
    writes them anew (no shard rewritten). `look`: as `look_at_release` read it (else read now)."""
    inputs = _audit_inputs(settings, look)
    return None if inputs is None else sealed(settings, inputs)


def _audit_inputs(settings: Settings, look: OutRootLook | None = None) -> str | None:
    """What the audit's output depends on: every shard's committed sha256 and the run that wrote it
    (the catalog's lineage names it, so a rebuild of the same bytes is audited again), and the plan.
    `look`: the commit records as `look_at_release` read them (else they are read, at once)."""
    index = read_index(settings.out_root)
    if index is None:
        return None
    look = look_at_release(settings) if look is None else look
    parts = [index["fingerprint"], settings.shard_pattern, json.dumps(settings.holdout)]
    for key in settings.partition_keys:
        state = look.shards[key].state
        parts.append(committed_as(state) if state else "-")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()
