"""One shard: read its plan slice, range-read each source from its raw tar, encode in parallel,
write the WebDataset tar in plan order, and commit it and its manifest atomically.

The encoding is stages/shard_jobs.py (jobs for the worker pool); a sample's tar members are
release/sample_tar.py; where the out root keeps manifests and commit records, and how a tar ends,
release/outroot.py. Here: the coordinator, which writes the samples in plan order, commits the tar,
checks it and records the manifest and the commit record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from imnet_assets.image.encode import ENCODER_VERSION, EncodeSettings
from imnet_assets.release.changed_sources import SourceChanged, mark
from imnet_assets.release.freshness import remember
from imnet_assets.release.outroot import manifest_url, note_superseded, state_url, tar_end
from imnet_assets.release.plan import SliceRow, read_slice
from imnet_assets.release.verify import check_committed
from imnet_assets.runtime.workerpool import (
    next_priority,
)
from imnet_assets.stages.shard_jobs import prepared_samples
from imnet_assets.stages.staged_encodes import read_lookup
from imnet_assets.storage import atomic, fs

# Bump when the bytes a shard holds for the same input would change (encoding rules, tar layout,
# JSON fields). Part of every shard's fingerprint, so a bump makes every shard stale.


def fingerprint(plan_digest: str, settings: EncodeSettings) -> str:
    """What a shard's bytes depend on: its plan slice, the encoder version and the settings."""
    text = json.dumps(
        # issue 17: alt_labels counts only when set, so shards built without it keep their fingerprint
        # issue 25: the codec's fields (EncodeSettings.image_fields): WebP's as before, so existing shards stay fresh
        {"plan": plan_digest, "encoder": ENCODER_VERSION,
         "settings": {**settings.image_fields(), **({"alt_labels": settings.alt_labels} if settings.alt_labels else {})}},
        sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def code_version(settings: EncodeSettings) -> str:
    if settings.codec != "webp":
        return f"enc{ENCODER_VERSION}-{settings.codec}-q{settings.quality}-s{settings.max_short}"
    return f"enc{ENCODER_VERSION}-q{settings.quality}-m{settings.method}-s{settings.max_short}"


@dataclass
class ShardResult:
    shard: str
    path: str
    planned: int
    num_samples: int
    bytes: int
    sha256: str
    seconds: float
    repaired: int
    excluded: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the shard check's; none: committed and fresh
    check_seconds: float = 0.0
    fingerprint: str = ""  # the manifest's (what makes the shard fresh under a plan and settings)
    staged: int = 0  # stored images taken from the index's staged encodes (stages/staged_encodes.py)

    @property
    def images_per_second(self) -> float:
        return self.num_samples / self.seconds if self.seconds > 0 else 0.0


class ShardChangedDuringCheck(RuntimeError):
    """The committed tar changed on storage (another size or stamp) between its commit and the end
    of its check: the check may not have read the bytes now there, so no commit record vouches
    for them, and the run fails naming the shard."""


# ----------------------------------------------------------------------------- tar layout


class _HashingWriter:
    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, b) -> int:
        self._f.write(b)
        self.sha.update(b)
        self.count += len(b)
        return len(b)


def build_shard(
    *,
    out_root: str,
    raw_root: str,
    shard_key: str,
    shard_name: str,
    settings: EncodeSettings,
    workers: int,
    run_id: str,
    log: Callable[[str], None] = lambda _m: None,
    decode_every: int = 16,
    encode: Callable | None = None,
    after_commit: Callable[[str], None] | None = None,
    after_check: Callable[[str], None] | None = None,
    ahead=None,
    plan_index: dict | None = None,
) -> ShardResult:
    """Encode, commit and check one shard and its manifest. Bad images become recorded exclusions.

    The commit record (`state_url`, what freshness reads) is removed first and written last, only
    once the check of the committed tar passed: a shard whose check failed is never fresh, so the
    next build, schedule or sensor builds it again. `result.problems` holds the check's findings;
    a read-back the storage does not give (StorageError, verify.check_committed) is raised: the run
    fails naming the tar, with no check failed against it, and the shard is not committed.

    Safe to call from several threads of one process at once (each for its own shard): they share
    the process's worker pool (`workerpool.shared_pool`). `decode_every`: IMNET_CHECK_DECODE_EVERY.
    `encode`: the codec (bench/scaleup.py's null codec); `after_commit(url)`: a test hook called
    between the commit and the check; `after_check(url)`: one called once the check passed, before
    the tar's stamp is looked at again (tests change the tar there). `ahead`: this shard's first
    jobs, submitted before the run started (shard_ahead.take), whose results the run takes over.
    `plan_index`: the plan's index the run read (its slice is checked against it; None: read here).

    The commit record's stamp (size and mtime / ETag) is the one read right after the commit,
    before the check; it is read again once the check passed, and if it changed the record is
    not written and ShardChangedDuringCheck names the shard. The manifest's size and stamp (as its
    write gave them: on S3 the PUT's ETag) and its sha256 (for `imnet verify`) are recorded too: a
    manifest removed or changed is not fresh either.
    """
    started = time.perf_counter()
    final = fs.join(out_root, shard_name)
    mf_url = manifest_url(out_root, shard_key)
    st_url = state_url(out_root, shard_key)
    for leftover in [gone for url in (final, mf_url, st_url) for gone in atomic.remove_partials(url, warn=log)]:
        log(f"removed leftover of an interrupted run: {leftover}")
    rows, plan_digest = read_slice(out_root, shard_key, index=plan_index)  # the run's index, when it read one
    staged = read_lookup(out_root, shard_key, rows, settings, log)  # issue 25: encoded by the index's pass
    # runs sharing the worker pool are served oldest first; a run encoded ahead (shard_ahead.Ahead)
    # keeps the place its first jobs took
    priority = ahead.priority if ahead is not None else next_priority()
    note_superseded(out_root, shard_key, shard_name)  # written under another name before: the audit names it
    fs.remove(st_url)  # from here until the check passed, this shard is not fresh
    samples: list[dict] = []
    spans: list[dict] = []  # where each sample's bytes went, and their sha256 (the read-back checks them)
    excluded: list[dict] = []
    problems: list[str] = []
    took_staged = 0  # stored images taken from the index's staged encodes
    with _marking_changed_sources(out_root, shard_key, rows, run_id, log), atomic.atomic_open(final) as raw_out:
        out = _HashingWriter(raw_out)
        for row, prepared in prepared_samples(rows, raw_root, settings, workers, decode_every, log, encode, priority,
                                            ahead.jobs if ahead is not None else None, staged):
            if prepared[0] != "ok":
                excluded.append({"key": row.key, "position": row.position, "reason": prepared[1]})
                log(f"excluded {row.key} ({row.tar}@{row.offset}): {prepared[1]}")
                continue
            _, blob, record, problem, blob_digest, from_staged = prepared
            took_staged += from_staged
            spans.append({"offset": out.count, "sample_size": len(blob), "sample_digest": blob_digest})
            out.write(blob)
            samples.append(record)
            if problem:
                problems.append(f"shard {shard_key} sample {row.key}: {problem}")
        out.write(tar_end(out.count))
    if staged is not None:  # a staged image missing or damaged was encoded here from its source instead
        usable = sum(1 for ref in staged if ref is not None and ref.reason is None)
        if took_staged < usable:
            log(f"shard {shard_key}: {usable - took_staged} of {usable} staged images could not be read back exact "
                "(missing, damaged, unreadable): encoded from their sources instead")
    committed = fs.stat(final)  # (size, stamp) of the tar the check is about to read
    encoded = time.perf_counter() - started
    manifest = {
        "shard": shard_key,
        "path": shard_name,
        "fingerprint": fingerprint(plan_digest, settings),
        "plan_digest": plan_digest,
        "code_version": code_version(settings),
        "settings": asdict(settings),
        "planned": len(rows),
        "num_samples": len(samples),
        "bytes": out.count,
        "sha256": out.sha.hexdigest(),
        "run_id": run_id,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(encoded, 3),
        "samples": samples,
        "excluded": excluded,
    }
    manifest_data = json.dumps(manifest, separators=(",", ":")).encode()
    # (size, stamp) of the manifest as written (on S3 the PUT's reply has its ETag: no HEAD): a change
    # to it from here on, during the check or after, is not fresh (outroot.what_changed compares it)
    mf_committed = atomic.write_stamped(mf_url, manifest_data)
    if after_commit is not None:
        after_commit(final)
    planned = {r.key: r for r in rows}
    expected = [dict(s, **span, label=planned[s["key"]].label, wnid=planned[s["key"]].wnid,
                     source_sha256=planned[s["key"]].sha256) for s, span in zip(samples, spans)]
    problems += [f"shard {shard_key}: {p}" for p in
                 check_committed(final, expected, manifest["sha256"], True, decode_every=decode_every, workers=workers,
                                 priority=priority, ext=settings.extension)]
    if not problems:
        if after_check is not None:
            after_check(final)
        # The tar only: the check read its bytes, which must be the ones whose stamp is recorded. The
        # manifest's stamp is recorded as it was written; one changed since (during the check or
        # after the record) is caught by every look at the shard (freshness, the audit, verify), so
        # a look at it here would cost a HEAD and catch nothing they do not.
        now = fs.stat(final)
        if now != committed:
            raise ShardChangedDuringCheck(
                f"shard {shard_key}: {final} changed on storage while it was being checked (size and stamp "
                f"{committed[0]} {committed[1]} at the commit, {now[0]} {now[1]} after the check): not recorded "
                "as committed; another writer? Build the shard again")
        state = {k: manifest[k] for k in ("shard", "path", "fingerprint", "bytes", "sha256", "num_samples", "run_id")}
        state["stamp"] = committed[1]  # the checked bytes' stamp: an edit in place changes it (freshness.verdict)
        # the manifest's, likewise (freshness), and its sha256 (`imnet verify`: verify_runs.manifest_problems)
        state.update(manifest_bytes=mf_committed[0], manifest_stamp=mf_committed[1],
                     manifest_sha256=hashlib.sha256(manifest_data).hexdigest())
        seen = atomic.write_stamped(st_url, json.dumps(state, sort_keys=True).encode())
        remember(out_root, shard_key, state, seen)
    else:
        log(f"shard {shard_key}: the check failed, not recorded as committed: {'; '.join(problems[:5])}")
    return ShardResult(
        shard_key, final, len(rows), len(samples), out.count, manifest["sha256"], encoded,
        sum(1 for s in samples if s["repaired"]), excluded, problems, time.perf_counter() - started - encoded,
        manifest["fingerprint"], took_staged,
    )


@contextlib.contextmanager
def _marking_changed_sources(out_root: str, shard_key: str, rows: list[SliceRow], run_id: str,
                             log: Callable[[str], None]) -> Iterator[None]:
    """A SourceChanged raised inside leaves its tar's marker under the out root (for the index's
    freshness and `imnet status`, release/changed_sources.py) on its way out: the run fails."""
    try:
        yield
    except SourceChanged as e:
        row = next((r for r in rows if r.tar == e.tar and r.member == e.member), None)
        url = mark(out_root, e, row.offset if row else -1, row.size if row else -1, row.sha256 if row else "",
                   shard_key, run_id)
        log(f"shard {shard_key}: {e}; marked in {url}")
        raise


# ----------------------------------------------------------------------------- freshness & checks


