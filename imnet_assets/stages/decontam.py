"""Eval-set decontamination and exact duplicates, settled by the filtered index before the plan.

IMNET_EVAL_EXCLUDE names a folder or s3:// prefix of evaluation images (nested any way; any file
Pillow opens, and tars of them). Each eval image is hashed once (sha256 of its bytes and the 64-bit
pHash of image/perceptual.py, in the worker pool: stages/eval_pool.py) into the catalog table
`eval_images` (`no_phash`: why an image has none), and the parts of eval tars that are no member
into `eval_damage` (their images could not be hashed: the dataset card says so); the tables are
hashed again only when the eval set's listing (names, sizes, stamps) changes. Raw images got their pHash when their
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
from collections.abc import Callable, Iterator

from imnet_assets.image.perceptual import NEAR_DUPLICATE_BITS
from imnet_assets.release.card import no_phash_said
from imnet_assets.stages.csvstage import staged_csv
from imnet_assets.stages.eval_pool import hash_eval
from imnet_assets.storage import fs

EVAL_STAGE = "eval_images"  # the stages row naming the eval set `eval_images` holds
DECONTAM_VERSION = "1"  # bump when the hash or the matching rule changes
# bump when what `eval_images` and `eval_damage` record of an eval set changes (its images are hashed again;
# the filtered index's own fingerprint, index_inputs, does not change): 2, eval_damage recorded
EVAL_RECORD_VERSION = "2"
# bump when which row of a repeated key stays changes: 2, the one in the key's own synset (a file
# misplaced in another synset's tar no longer takes the key; sql/index_duplicates.sql)
KEY_RULE_VERSION = "2"
BANDS = 4
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
    listing's digest), the dedup mode, and the version of the rule for repeated keys (KEY_RULE_VERSION:
    an index settled by an earlier rule is settled again, no tar read again)."""
    parts: tuple = ("keys", KEY_RULE_VERSION)
    if settings.eval_exclude:
        entries = [(e["name"], e["size"], e["stamp"]) for e in eval_listing(settings.eval_exclude)]
        parts += ("eval", DECONTAM_VERSION, NEAR_DUPLICATE_BITS,
                  hashlib.sha256(json.dumps(entries).encode()).hexdigest())
    if settings.dedup != "off":
        # 2: repeated keys and later copies settled together (settle_keys_and_copies): an index
        # settled by the earlier rule is settled again (no tar is read again)
        parts += ("dedup", settings.dedup, "2")
    return parts


def eval_fingerprint(listing: list[dict]) -> str:
    entries = [(e["name"], e["size"], e["stamp"]) for e in listing]
    return hashlib.sha256(json.dumps([DECONTAM_VERSION, EVAL_RECORD_VERSION, entries]).encode()).hexdigest()


def hash_eval_set(listing: list[dict], workers: int, log: Log = print, time_limit: float | None = None,
                  damaged: list | None = None) -> Iterator[tuple[str, str, int | None, str | None]]:
    """(file, sha256, phash, why no pHash) per eval image; phash is None for a file Pillow cannot
    decode (it still matches raw images byte for byte), or whose decoding crashed its worker
    process twice once the control image of its kind got its pHash; MachineryFault when a
    known-good image of its kind cannot be hashed either (perceptual.grey_thumbnail). Read and
    hashed in the shared worker pool, never in this process, under the index's failure rules
    (stages/eval_pool.py): a transport fault, a kill, a hang or a MemoryError is retried, then fails
    the stage naming the file, never a missing pHash or a wrong sha256. `damaged` gets (eval tar,
    at byte, bytes, reason) per part of an eval tar that is no member: its images are not hashed."""
    yield from hash_eval(listing, workers, log, time_limit, damaged)


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
        damaged: list = []
        rows = [(f, s, "" if p is None else p, why or "")
                for f, s, p, why in hash_eval_set(listing, settings.workers, log, settings.image_timeout, damaged)]
        with staged_csv(["file", "sha256", "phash", "no_phash"], rows) as path:
            cat.run("eval_load", {"path": path})
        with staged_csv(["file", "at_byte", "bytes", "reason"], damaged) as path:
            cat.run("eval_damage_load", {"path": path})
        cat.set_stage(EVAL_STAGE, fp, run_id)
    facts = cat.one("eval_summary")
    if facts.get("no_phash"):
        log(f"{no_phash_said(facts)}: they match raw images by sha256 only (catalog eval_images.no_phash says why, "
            "per file)")
    return facts


def settle_index(cat, settings, run_id: str, log: Log = print) -> dict:
    """The exclusions the index settles after every tar is scanned and before the plan: eval
    overlaps, `duplicate_of`, repeated keys and (IMNET_DEDUP=exact) later copies. Idempotent: earlier results
    of these rules are undone first. Returns facts for the asset's metadata."""
    eval_facts = refresh_eval_images(cat, settings, run_id, log)
    cat.run("overlaps_settle", {"threshold": NEAR_DUPLICATE_BITS, "radius": NEAR_DUPLICATE_BITS // BANDS})
    if settings.dedup == "exact":
        settle_keys_and_copies(cat)
    else:
        cat.run("index_duplicates")
    facts = {**{f"eval_{k}": v for k, v in eval_facts.items()}, **cat.one("overlaps_summary")}
    facts["duplicate_groups_top"] = cat.dicts("duplicate_groups_top")
    if settings.eval_exclude:
        facts["eval_threshold_bits"] = NEAR_DUPLICATE_BITS
        log(f"eval overlaps: {facts['eval_overlaps_exact']} byte-identical, {facts['eval_overlaps_near']} near "
            f"(pHash within {NEAR_DUPLICATE_BITS} bits)")
    return facts


def settle_keys_and_copies(cat) -> None:
    """IMNET_DEDUP=exact: repeated keys and later copies of the same bytes, decided together, so
    that every exclusion names a row that stays. Settled one at a time in (key, own synset first,
    tar, offset) order (sql/index_keys_copies.sql), a row is excluded when a row kept before it
    holds its key ("duplicate key: also in ..."; of one key the one in its own synset's tar or
    folder stays, else the first by tar, offset, as index_duplicates.sql decides without dedup) or
    its bytes ("duplicate of <key>": the first copy by key stays). Decided apart, the first copy of
    some bytes could lose its key to another file and every copy be gone."""
    keys: dict[str, tuple[str, str, int]] = {}
    copies: dict[str, str] = {}
    excluded = []
    for key, tar, offset, member, sha in cat.rows("index_keys_copies"):
        if key in keys:
            t, m, o = keys[key]
            where = t + m if t.endswith("/") else f"{t} at byte {o}"  # a synset folder: its file
            excluded.append((key, tar, offset, f"duplicate key: also in {where}"))
        elif sha is not None and sha in copies:
            excluded.append((key, tar, offset, f"duplicate of {copies[sha]}"))
        else:
            keys[key] = (tar, member, offset)
            if sha is not None:
                copies[sha] = key
    if excluded:
        with staged_csv(["key", "tar", "offset", "reason"], excluded) as path:
            cat.run("index_keys_copies_apply", {"path": path})
