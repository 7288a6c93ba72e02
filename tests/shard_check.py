"""A whole-shard check from the out root alone (the shard's plan slice and manifest), for tests
and bench/encode.py. The rules are the package's: `verify.read_back` (the sequential read that
`imnet verify` makes, applying `check_sample` to each sample), fed the samples the plan slice and
the manifest say the shard must hold, where `imnet verify` feeds it the catalog's rows."""

from __future__ import annotations

from imnet_assets.image.encode import CODEC_EXTENSIONS
from imnet_assets.release.outroot import read_manifest
from imnet_assets.release.plan import read_slice
from imnet_assets.release.verify import ExpectedSample, read_back
from imnet_assets.storage import fs


def expected_from_plan(out_root: str, shard_key: str, manifest: dict) -> tuple[list[ExpectedSample], list[str]]:
    """The samples a committed shard must hold, from its plan slice and its manifest: every
    planned key, in plan order, less the manifest's encode-time exclusions, with the manifest's
    record of each (its image member the codec's the manifest was written with); and the problems
    of the manifest against the plan."""
    problems: list[str] = []
    ext = CODEC_EXTENSIONS[(manifest.get("settings") or {}).get("codec", "webp")]
    rows, digest = read_slice(out_root, shard_key)
    if manifest.get("plan_digest") != digest:
        problems.append(f"written from another plan ({str(manifest.get('plan_digest'))[:12]}), "
                        f"the plan slice is {digest[:12]}")
    excluded = {e["key"] for e in manifest.get("excluded", [])}
    recorded = {s["key"]: s for s in manifest.get("samples", [])}
    expected = []
    for r in rows:
        if r.key in excluded:
            continue
        rec = recorded.get(r.key, {})
        expected.append(ExpectedSample(
            key=r.key, label=r.label, wnid=r.wnid, webp_sha256=rec.get("webp_sha256"),
            webp_bytes=rec.get("webp_bytes"), width=rec.get("width"), height=rec.get("height"),
            orig_width=rec.get("orig_width"), orig_height=rec.get("orig_height"),
            source_sha256=r.sha256, repaired=bool(rec.get("repaired")), ext=ext,
        ))
    return expected, problems


def check_committed_shard(out_root: str, shard_key: str, shard_name: str, decode_every: int = 1) -> list[str]:
    """Problems of a committed shard against its plan slice and its manifest (each prefixed with
    the shard). Every planned key is in the tar, in plan order, or recorded as excluded; nothing
    else is in it; each sample passes `check_sample`; the file's bytes, re-read, have the sha256
    and size the manifest records."""
    manifest = read_manifest(out_root, shard_key)
    if manifest is None:
        return [f"shard {shard_key}: no manifest"]
    expected, problems = expected_from_plan(out_root, shard_key, manifest)
    url = fs.join(out_root, shard_name)
    try:
        problems += read_back(
            url, expected, record="manifest", source="plan",
            tar_sha256=manifest.get("sha256"), tar_bytes=manifest.get("bytes"), decode_every=decode_every)
    except FileNotFoundError:
        problems.append(f"missing: no file at {fs.redact(url)}")
    return [f"shard {shard_key}: {p}" for p in problems]
