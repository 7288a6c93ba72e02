"""Whether `shard_audit` is due, as the audit sensor asks it each tick: every shard in (committed,
on storage as committed, fresh), and whether the audit's record in the catalog already covers the
shards as they are (the rule `imnet status` and `imnet build` use), without the catalog's integrity
read or a manifest load, so a tick stays cheap at 1,024 shards on S3."""

from __future__ import annotations

import hashlib
import os

from imnet_assets.release.freshness import OutRootLook, verdict
from imnet_assets.release.outroot import committed_as
from imnet_assets.release.plan import read_index
from imnet_assets.settings import Settings
from imnet_assets.stages.audit import (
    audit_fingerprint,
    look_at_release,
    plan_mismatch,
    shard_fingerprints,
    stray_shards,
)
from imnet_assets.storage.catalog import CatalogBusy, open_reader


def shards_as_they_are(settings: Settings) -> tuple[str | None, str]:
    """(a digest of every shard's commit, strays included, reason) once every shard is in: committed,
    on storage as committed and fresh; else (None, which shard is not in and why). Two listings
    and one concurrent batch of commit-record reads (`look_at_release`), whatever the shard count."""
    return looked_at_shards(settings)[:2]


def looked_at_shards(settings: Settings) -> tuple[str | None, str, OutRootLook | None]:
    """`shards_as_they_are`, and the look it took (None where there was no plan to look with)."""
    index = read_index(settings.out_root)
    expected = shard_fingerprints(settings, index)
    if not expected:
        return None, plan_mismatch(settings, index) or "no plan yet", None
    look = look_at_release(settings)
    commits = []
    for key in settings.partition_keys:
        shard = look.shards[key]
        state = verdict(settings.out_root, shard, expected.get(key))
        if state == "missing":
            return None, f"shard {key} is not in yet (missing)", look
        if state != "fresh":
            return None, (f"shard {key} is not in yet (stale: written from another plan or settings, "
                          "or changed on storage)"), look
        commits.append(committed_as(shard.state))
    # Stray shard files fail the audit, so they are part of what it is asked for with.
    commits += stray_shards(settings, look.names, look.manifests)
    return hashlib.sha256("".join(commits).encode()).hexdigest()[:32], "every shard is in", look


def audit_recorded_fresh(settings: Settings, look: OutRootLook | None = None) -> bool | None:
    """Whether shard_audit's record in the catalog is the fingerprint of the shards (and of the files
    it published) as they are now: the rule by which `imnet status` says "fresh" and `imnet build`
    "fresh, skipped". For the audit sensor's tick, so without the catalog's integrity read (seconds
    at the real size; the audit itself makes it): one read-only look at one row, no waiting. None
    when another process is writing the catalog (it may be this very audit); False without one.
    `look`: as `look_at_release` read it (else read now)."""
    if not os.path.exists(settings.catalog):
        return False
    try:
        with open_reader(settings.catalog, say=lambda _m: None, wait_s=0, intact=False) as cat:
            recorded = cat.stage_fingerprint("shard_audit", settings.release)
    except CatalogBusy:
        return None
    return recorded is not None and audit_fingerprint(settings, look) == recorded
