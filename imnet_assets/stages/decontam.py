"""Eval-set decontamination and exact duplicates, settled by the filtered index before the plan.

IMNET_EVAL_EXCLUDE names a folder or s3:// prefix of evaluation images (nested any way; any file
Pillow opens, and tars of them). Each eval image is hashed once (sha256 of its bytes and the 64-bit
pHash of image/perceptual.py) into the catalog table `eval_images`; the table is hashed again only
when the eval set's listing (names, sizes, stamps) changes. Raw images got their pHash when their
tar was scanned (stages/index.py), so a changed eval set costs a SQL step, not a rescan.

Matching (sql/overlaps_settle.sql) is a DuckDB join, never an all-pairs loop: a raw image whose
sha256 equals an eval image's is an exact copy; for near copies the 64-bit hashes are cut into four
16-bit bands (multi-index hashing), candidates share a band (or, for thresholds over 3, a band one
bit away), and the exact Hamming distance `bit_count(xor(a, b))` decides. By the pigeonhole
principle a pair within NEAR_DUPLICATE_BITS differs by at most NEAR_DUPLICATE_BITS // 4 bits in
some band, so the join finds every pair within the threshold.

Exact duplicates: `images.duplicate_of` is the first key (sorted) with the same sha256. With
IMNET_DEDUP=exact the later copies of each kept image are excluded ("duplicate of <key>").
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from imnet_assets.image.guard import MachineryFault
from imnet_assets.image.perceptual import NEAR_DUPLICATE_BITS, image_hash
from imnet_assets.stages.csvstage import staged_csv
from imnet_assets.storage import fs, prefetch

EVAL_STAGE = "eval_images"  # the stages row naming the eval set `eval_images` holds
DECONTAM_VERSION = "1"  # bump when the hash or the matching rule changes
BANDS = 4
TAR_SUFFIXES = (".tar",)
Log = Callable[[str], None]


def eval_listing(root: str) -> list[dict]:
    """Every file under `root`, recursively: `name` (relative to root), `url`, `size`, `stamp`."""
    filesystem, base = fs.filesystem(root)
    if not filesystem.exists(base):
        raise FileNotFoundError(f"IMNET_EVAL_EXCLUDE={fs.redact(root)} does not exist")
    if filesystem.isfile(base):
        raise NotADirectoryError(f"IMNET_EVAL_EXCLUDE={fs.redact(root)} is a file, not a folder or prefix")
    filesystem.invalidate_cache(base)
    base = base.rstrip("/")
    out = []
    for path, info in filesystem.find(base, detail=True).items():
        if info.get("type") != "file":
            continue
        name = posixpath.relpath(path, base) if not fs.is_remote(root) else path[len(base):].lstrip("/")
        out.append({"name": name, "url": fs.join(root, name), "size": int(info.get("size") or 0),
                    "stamp": fs._stamp(info)})
    return sorted(out, key=lambda e: e["name"])


def index_inputs(settings) -> tuple:
    """What the filtered index's exclusions depend on beyond the raw tars: the eval set (its
    listing's digest) and the dedup mode. Empty under the defaults, so a build without these
    settings keeps the fingerprint it had."""
    parts: tuple = ()
    if settings.eval_exclude:
        entries = [(e["name"], e["size"], e["stamp"]) for e in eval_listing(settings.eval_exclude)]
        parts += ("eval", DECONTAM_VERSION, NEAR_DUPLICATE_BITS,
                  hashlib.sha256(json.dumps(entries).encode()).hexdigest())
    if settings.dedup != "off":
        parts += ("dedup", settings.dedup)
    return parts


def eval_fingerprint(listing: list[dict]) -> str:
    entries = [(e["name"], e["size"], e["stamp"]) for e in listing]
    return hashlib.sha256(json.dumps([DECONTAM_VERSION, entries]).encode()).hexdigest()


def _hash_row(name: str, data: bytes) -> tuple[str, str, int | None]:
    try:
        phash = image_hash(data)
    except MachineryFault as e:  # a known-good image gets no pHash either: the stage fails (image/guard.py)
        raise MachineryFault(f"{e} (met on eval file {name})") from e
    return name, hashlib.sha256(data).hexdigest(), phash


def _tar_rows(entry: dict) -> list[tuple[str, str, int | None]]:
    """One row per regular member of an eval tar, named `<tar>/<member>`."""
    rows = []
    with prefetch.open_read(entry["url"]) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            if info.isreg():
                data = tar.extractfile(info).read()
                rows.append(_hash_row(f"{entry['name']}/{info.name}", data))
    return rows


def _file_rows(entry: dict) -> list[tuple[str, str, int | None]]:
    if entry["name"].lower().endswith(TAR_SUFFIXES):
        try:
            return _tar_rows(entry)
        except tarfile.TarError:
            pass  # not a readable tar after all: hashed as a file below
    return [_hash_row(entry["name"], fs.read_bytes(entry["url"]))]


def hash_eval_set(listing: list[dict], workers: int, log: Log = print) -> Iterator[tuple[str, str, int | None]]:
    """(file, sha256, phash) per eval image; phash is None for a file Pillow cannot decode (it
    still matches raw images byte for byte), MachineryFault when a known-good image of its kind
    cannot be hashed either (perceptual.grey_thumbnail). Files are read and hashed in threads (Pillow's
    decoders and hashlib release the GIL)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        done = 0
        for rows in pool.map(_file_rows, listing):
            yield from rows
            done += 1
            if done % 5000 == 0:
                log(f"hashed {done}/{len(listing)} eval files")


def refresh_eval_images(cat, settings, run_id: str, log: Log = print) -> dict:
    """Make the catalog's `eval_images` hold the current eval set (hashing it only when its listing
    changed since it was last hashed); no eval set empties it."""
    if not settings.eval_exclude:
        if cat.stage_fingerprint(EVAL_STAGE) is not None:
            cat.run("eval_clear")
            cat.clear_stage(EVAL_STAGE)
        return {}
    listing = eval_listing(settings.eval_exclude)
    fp = eval_fingerprint(listing)
    if cat.stage_fingerprint(EVAL_STAGE) != fp:
        log(f"hashing {len(listing)} eval files under {fs.redact(settings.eval_exclude)}")
        rows = [(f, s, "" if p is None else p) for f, s, p in hash_eval_set(listing, settings.workers, log)]
        with staged_csv(["file", "sha256", "phash"], rows) as path:
            cat.run("eval_load", {"path": path})
        cat.set_stage(EVAL_STAGE, fp, run_id)
    facts = cat.one("eval_summary")
    if facts.get("undecodable"):
        log(f"{facts['undecodable']} eval files do not decode as images: they match raw images by sha256 only")
    return facts


def settle_index(cat, settings, run_id: str, log: Log = print) -> dict:
    """The exclusions the index settles after every tar is scanned and before the plan: eval
    overlaps, `duplicate_of`, and (IMNET_DEDUP=exact) later copies. Idempotent: earlier results
    of these rules are undone first. Returns facts for the asset's metadata."""
    eval_facts = refresh_eval_images(cat, settings, run_id, log)
    cat.run("overlaps_settle", {"threshold": NEAR_DUPLICATE_BITS, "radius": NEAR_DUPLICATE_BITS // BANDS,
                                "dedup": settings.dedup})
    facts = {**{f"eval_{k}": v for k, v in eval_facts.items()}, **cat.one("overlaps_summary")}
    facts["duplicate_groups_top"] = cat.dicts("duplicate_groups_top")
    if settings.eval_exclude:
        facts["eval_threshold_bits"] = NEAR_DUPLICATE_BITS
        log(f"eval overlaps: {facts['eval_overlaps_exact']} byte-identical, {facts['eval_overlaps_near']} near "
            f"(pHash within {NEAR_DUPLICATE_BITS} bits)")
    return facts
