"""The out root's layout, one place for each fact: where a shard's manifest and commit record live
(`<out>/_manifests/<key>.json`, `<key>.state.json`), what a commit record says was committed, whether
a shard's file and manifest on storage are still the ones committed, and how a shard's tar ends. Shard runs
(shard.py), the check (verify.py), freshness, the audit and changed-source markers all read it here.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import tarfile

from imnet_assets.release.plan import per_shard
from imnet_assets.storage import fs

MANIFEST_DIR = "_manifests"
# The most a commit record or a changed-source marker can hold (each is a few hundred bytes): a read
# of one refuses a larger object (fs.TooLarge naming it), never fetched whole (lease.py's objects:
# LEASE_MAX_BYTES).
RECORD_MAX_BYTES = 1 << 20
# A shard's manifest holds a head (the encode settings, counts: ~1 KB) and one row per planned
# sample: a sample (~260 bytes: its key, sizes, a sha256) or an exclusion (its key and reason). The
# plan bounds it (manifest_limit): MANIFEST_ROW_MAX_BYTES a planned row, MANIFEST_BASE_BYTES for the
# head; a larger manifest is damaged, never read whole. MANIFEST_MAX_BYTES where the plan is not
# known (DuckDB's maximum_object_size in sql/audit_load.sql).
MANIFEST_ROW_MAX_BYTES = 4096
MANIFEST_BASE_BYTES = 1 << 20
MANIFEST_MAX_BYTES = 1 << 28
STATE_SUFFIX = ".state.json"
SUPERSEDED_SUFFIX = ".superseded.json"  # <key>.superseded.json: names the shard had before (note_superseded)


def manifest_url(out_root: str, shard_key: str) -> str:
    return fs.join(out_root, MANIFEST_DIR, f"{shard_key}.json")


def state_url(out_root: str, shard_key: str) -> str:
    return fs.join(out_root, MANIFEST_DIR, f"{shard_key}{STATE_SUFFIX}")


def committed_as(state: dict) -> str:
    """What a commit record says was committed: the tar's sha256 and the run that wrote it (a
    rebuild of the same bytes is another commit: the catalog's lineage names its run)."""
    return f"{state['sha256']}:{state.get('run_id', '')}"


def forget_commit(out_root: str, shard_key: str, state: dict | None, what: str) -> bool:
    """Remove a shard's commit record, the one `state` that was read, so the shard is not fresh and
    the next build writes it again (the audit, for a shard whose manifest is gone or damaged: the
    manifest is what a catalog is rebuilt from; `imnet verify`, for a shard it failed). A record
    another run wrote since is left alone: the look and the remove are made holding the shard's
    lease (`what` names this holder), so no run of the shard can write it again in between (a remove
    that storage throttles for minutes would otherwise take the new commit away). A run holding the
    lease now (writing the shard again) raises LeaseHeld naming it, and the record is left to it."""
    from imnet_assets.release.lease import acquire, shard_lease_name

    if state is None:
        return False
    with acquire(out_root, shard_lease_name(shard_key), what):
        url = state_url(out_root, shard_key)
        now = fs.read_json(url, limit=RECORD_MAX_BYTES, kind="a commit record")
        if not isinstance(now, dict) or committed_as(now) != committed_as(state):
            return False
        fs.remove(url)
        return True


def forget_commit_unless_held(out_root: str, shard_key: str, state: dict | None, what: str) -> bool:
    """forget_commit, False (the record left) while a run of the shard holds its lease."""
    from imnet_assets.release.lease import LeaseHeld

    try:
        return forget_commit(out_root, shard_key, state, what)
    except LeaseHeld:
        return False


def manifest_limit(planned: int | None) -> int:
    """The most bytes the manifest of a shard of `planned` samples can hold (None: not known)."""
    return MANIFEST_MAX_BYTES if planned is None else MANIFEST_BASE_BYTES + MANIFEST_ROW_MAX_BYTES * planned


def manifest_limits(keys: list[str], index: dict | None) -> dict[str, int]:
    """Shard key -> manifest_limit of its planned samples, from the plan's index (its
    `shard_lengths`, plan.per_shard); MANIFEST_MAX_BYTES for a key it does not say."""
    planned = per_shard(index, "shard_lengths")
    return {key: manifest_limit(planned.get(key)) for key in keys}


def read_manifests(out_root: str, limits: dict[str, int]) -> dict[str, dict | None]:
    """Shard key -> its manifest, for every key of `limits` (read at once); None where it is absent,
    does not parse or holds more than its limit (damaged: read no further)."""
    urls = {key: manifest_url(out_root, key) for key in limits}
    docs = fs.read_json_many(list(urls.values()), limit={urls[k]: limits[k] for k in urls},
                             kind="a shard's manifest", too_large_as_none=True)
    return {key: docs[url] if isinstance(docs[url], dict) else None for key, url in urls.items()}


def read_manifest(out_root: str, shard_key: str, planned: int | None = None) -> dict | None:
    """A shard's manifest; None when it is absent, does not parse, or holds more bytes than one of
    `planned` samples can (damaged: read no further)."""
    try:
        return fs.read_json(manifest_url(out_root, shard_key), limit=manifest_limit(planned),
                            kind="a shard's manifest")
    except fs.TooLarge:
        return None


def unchanged_on_storage(url: str, state: dict, size_stamp: tuple[int, str] | None = None, *,
                         manifest: tuple[int, str] | None) -> bool:
    """Whether the shard at `url` is still the one its commit record describes (`what_changed` is None)."""
    return what_changed(state, size_stamp or fs.stat(url), manifest) is None


def what_changed(state: dict, tar: tuple[int, str], manifest: tuple[int, str] | None) -> str | None:
    """None while a shard on storage is still the one its commit record `state` describes, else what
    is not: "the shard file" or "its manifest". `tar` and `manifest`: the (size, stamp) of each as
    listed (None: the manifest is not there). The one place for the rule (freshness, the audit).

    The tar: the same size and stamp (mtime, or ETag on S3) as when it was committed. An edit in
    place changes the stamp; so does a copy that does not keep times (`cp` without -p): such a
    shard is built again rather than hashed on every look (1024 x 140 MB). A record without a stamp
    (older ones) is held to its size.

    The manifest (what the audit loads, and what a damaged catalog is rebuilt from): there, and of
    the size and stamp listed right after it was committed (`manifest_bytes`, `manifest_stamp`). A
    record written before these were kept is held only to the manifest being there: making it stale
    would rewrite every shard of an existing release (a full re-encode at real size is ~128
    core-hours) for a check `imnet verify` makes anyway (it parses such a manifest against the
    catalog: verify_runs.manifest_problems), and the next build of each shard records them."""
    size, stamp = tar
    if size != state.get("bytes") or state.get("stamp", stamp) != stamp:
        return "the shard file"
    if manifest is None:
        return "its manifest"
    if "manifest_bytes" in state and (manifest[0] != state["manifest_bytes"]
                                      or manifest[1] != state.get("manifest_stamp")):
        return "its manifest"
    return None


def tar_end(offset: int) -> bytes:
    """What closes a tar of `offset` bytes: two zero blocks, then zeros to a whole record (tarfile's)."""
    offset += 2 * tarfile.BLOCKSIZE
    return tarfile.NUL * (2 * tarfile.BLOCKSIZE + -offset % tarfile.RECORDSIZE)


def sample_digest(sample, webp_digest: bytes, webp_bytes: int) -> str:
    """What a shard run records for one sample's bytes (`sample`: its three members, headers and
    padding included), and what its read-back checks them against: the sha256 of those bytes with
    the stored image's payload (the last member, WebP or JPEG: `webp_bytes` long) replaced by
    `webp_digest`, that payload's sha256. A change of any byte changes it, as with a sha256 of all
    of them, but the encode worker hashes its image once (for the manifest), not twice."""
    at = len(sample) - webp_bytes - (-webp_bytes % tarfile.BLOCKSIZE)
    sha = hashlib.sha256(sample[:at])
    sha.update(webp_digest)
    sha.update(sample[at + webp_bytes:])
    return sha.hexdigest()


def superseded_url(out_root: str, shard_key: str) -> str:
    return fs.join(out_root, MANIFEST_DIR, f"{shard_key}{SUPERSEDED_SUFFIX}")


def note_superseded(out_root: str, shard_key: str, name: str) -> None:
    """Before a shard is written as `name`: when its last commit record names another file (the
    shard pattern changed since), keep that name in `<key>.superseded.json`, so that the file this
    project wrote there, still beside the new one, is named by the audit (`written_elsewhere`) after
    the record is replaced. Called by the run holding the shard's lease: one writer per file."""
    old = fs.read_json(state_url(out_root, shard_key), limit=RECORD_MAX_BYTES, kind="a commit record")
    path = old.get("path") if isinstance(old, dict) else None
    if not isinstance(path, str) or not path or path == name:
        return
    url = superseded_url(out_root, shard_key)
    had = fs.read_json(url, limit=RECORD_MAX_BYTES, kind="a list of a shard's earlier names")
    names = [n for n in had if isinstance(n, str)] if isinstance(had, list) else []
    if path not in names:
        from imnet_assets.storage import atomic

        atomic.write_atomic(url, json.dumps(sorted([*names, path])).encode())


def written_elsewhere(out_root: str, keys: list[str], listed: list[str] | None = None) -> set[str]:
    """Shard files this project wrote under the out root by other names than the release's shards
    have now: the names kept by note_superseded, and those in the commit records of shards that are
    no longer the release's (`keys`: its shard keys now; num_shards lowered). One listing of the
    manifests folder (`listed`: its file names, when already listed); only those few records are read."""
    if listed is None:
        listed = [e["name"] for e in fs.listdir(fs.join(out_root, MANIFEST_DIR))]
    current = set(keys)
    urls = [fs.join(out_root, MANIFEST_DIR, n) for n in listed if n.endswith(SUPERSEDED_SUFFIX)
            or (n.endswith(STATE_SUFFIX) and n[: -len(STATE_SUFFIX)] not in current)]
    names: set[str] = set()
    for doc in (fs.read_json_many(urls, limit=RECORD_MAX_BYTES, kind="a commit record") if urls else {}).values():
        if isinstance(doc, dict):
            doc = [doc.get("path")]
        names.update(n for n in (doc or []) if isinstance(n, str) and n and "/" not in n)
    return names


def stray_problem(stray: list[str]) -> str:
    return (f"{len(stray)} files named like shards are not shards of this release "
            f"(left by a build with more shards, or under another shard pattern): {stray[:10]}"
            f"{' ...' if len(stray) > 10 else ''}; they repeat images this release holds: delete them "
            f"(in the out root: `rm -- {' '.join(map(shlex.quote, stray[:10]))}{' ...' if len(stray) > 10 else ''}`"
            "; on S3 `aws s3 rm` each)")
