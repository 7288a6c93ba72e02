"""`imnet verify`'s shards, checked in worker processes that may die without a false verdict.

Each shard is one ShardCheckJob (verify.verify_catalog_shard in a worker of a WorkerPool of this
process). A worker that dies while checking a shard (killed from outside: the OOM killer, a cgroup
limit, preemption; a crash; out of memory) is no fact about the shard's bytes: the pool replaces
it and the shard is checked again from the start in a fresh worker, up to CHECK_DEATHS deaths
(HELD_DEATHS for deaths while the shard only waited in the worker's queue). Then the shard is
reported not checked, naming it and the deaths, never as bad: a verdict comes only from its bytes
(SPEC "Failure behaviour"). So is a shard whose bytes the storage did not give within the retries
(StorageError: throttling, broken connections past IMNET_STORAGE_RETRY_SECONDS), or a local read
error (ReadBackFailed: EIO, EACCES). So is a shard with problems that a run wrote again while it
was checked, or since the catalog recorded it (`changed_while_checking`: its commit record, read
before its bytes and again after, changed, or names another commit than the catalog's, or a run
holds its lease): its differences from the catalog are that run's doing, not damage, and its new
commit is left to it. The command still fails (verify is non-zero when a shard could not be checked).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from imnet_assets.release.lease import LeaseHeld, describe, holder_of, shard_lease_name, writes_shard
from imnet_assets.release.outroot import (
    RECORD_MAX_BYTES,
    committed_as,
    forget_commit,
    manifest_limit,
    manifest_url,
    state_url,
)
from imnet_assets.release.verify import ReadBackFailed, verify_catalog_shard
from imnet_assets.runtime.procpool import preload
from imnet_assets.runtime.workerpool import WorkerDied, WorkerPool
from imnet_assets.storage import fs

preload(__name__)  # the forkserver imports this module once for all workers

CHECK_DEATHS = 4  # deaths of the worker checking one shard before it is reported not checked
HELD_DEATHS = 8  # deaths of a worker that held the shard queued, not yet checking it
# What `imnet verify` names itself as, holding a shard's lease while it removes its commit record
FORGETTING = "imnet verify (removing the commit record of a shard it failed)"


@dataclass
class ShardCheckJob:
    """One shard of `imnet verify`, for a pool worker: the file at `url` against its catalog record
    and rows (verify.verify_catalog_shard; an unreadable file is a problem, storage that does not
    answer a StorageError), and its manifest under `out_root` (manifest_problems)."""

    url: str
    shard: dict
    rows: list[tuple]
    decode: bool
    ext: str = "webp"
    out_root: str | None = None  # its manifest is checked there too (manifest_problems)

    def prefetch(self, readers) -> None:
        return None

    def run(self, _state, mark) -> list[str] | Changed:
        mark(0)  # a death from here on was this shard's check
        before = record_now(self.out_root, self.shard["shard"]) if self.out_root else None
        problems = verify_catalog_shard(self.url, self.shard, self.rows, self.decode, self.ext)
        if not self.out_root:
            return problems
        problems += manifest_problems(self.out_root, self.shard)
        why = changed_while_checking(self.out_root, self.shard, before) if problems else None
        return Changed(why) if why else problems


@dataclass
class Changed:
    """A shard that a run wrote again while verify checked it (or since the catalog recorded it):
    what verify read is not the commit the catalog describes, so its problems are no verdict on
    the shard (SPEC "Failure behaviour": nothing is damaged that a run changed meanwhile)."""

    why: str


def record_now(out_root: str, key: str) -> bytes | str | None:
    """The bytes of shard `key`'s commit record as they are now (None: there is none; a string for
    what is there but cannot be one). A read the machinery fails raises (no verdict)."""
    url = state_url(out_root, key)
    try:
        return fs.read_bytes(url, limit=RECORD_MAX_BYTES, kind="a commit record")
    except FileNotFoundError:
        return None
    except fs.TooLarge:
        return "too large"
    except fs.StorageError:
        raise
    except (IsADirectoryError, NotADirectoryError):
        return "not a file"
    except OSError as e:  # EIO, EACCES: the machinery's read
        raise ReadBackFailed(f"cannot read {fs.redact(url)}: {type(e).__name__}: {fs.redact(str(e))}") from None


def changed_while_checking(out_root: str, shard: dict, before: bytes | str | None) -> str | None:
    """Why the problems verify found in `shard` (its catalog record) may be a run's doing rather than
    damage, or None: its commit record changed since `before` (read before its bytes were), the record
    is another commit than the catalog's (written again since the catalog recorded it: the audit of
    the build that wrote it records it), or a run holds its lease (writing it now). Looked at only for
    a shard with problems: a shard verify passes is the catalog's commit, whatever runs meanwhile."""
    key = shard["shard"]
    now = record_now(out_root, key)
    if now != before:
        return "its commit record is not the one read before its bytes: a run wrote the shard again meanwhile"
    try:
        record = json.loads(now) if isinstance(now, bytes) else None
    except ValueError:
        record = None
    if isinstance(record, dict) and isinstance(record.get("sha256"), str) and (
            record["sha256"] != shard["sha256"]
            or (shard.get("run_id") and record.get("run_id") != shard["run_id"])):
        return (f"its commit record is of another commit (run {record.get('run_id') or '?'}) than the catalog's "
                f"(run {shard.get('run_id') or '?'}): a run wrote the shard again since the catalog recorded it, "
                "and the audit of the build that wrote it records it in the catalog")
    held = holder_of(out_root, shard_lease_name(key))
    if held is not None and writes_shard(held[0]):
        return f"{describe(held[0])} holds its lease: it is writing the shard again"
    return None


@dataclass
class Checked:
    """A shard's outcome: `problems` (empty: it is correct), or `lost`, why it could not be checked
    (its workers kept dying, the storage did not give its bytes): no verdict on its bytes. `done`:
    what verify did about a failed shard (forget_failed), each a line of its own, not a problem."""

    shard: dict
    problems: list[str]
    lost: str | None = None
    done: list[str] = field(default_factory=list)


_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def verify_pool(jobs: int) -> WorkerPool:
    """This process's pool of `jobs` verify workers: each holds one shard at a time (depth 1: a
    death costs one shard's check, and at most jobs + 2 shards' rows are in memory)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = WorkerPool(jobs, threads=1, depth=1)
        elif _pool.size != jobs:
            _pool.resize(jobs)
        return _pool


def checked_shards(jobs: int, tasks: Iterator[tuple[dict, str, list[tuple]]], decode: bool, ext: str,
                   first_done: Callable, out_root: str | None = None) -> Iterator[Checked]:
    """A Checked per task (shard record, url, catalog rows), as they finish, checked in `jobs`
    worker processes. `first_done(futures)`: the done ones, waiting until one is (the CLI's, which
    stays responsive to Ctrl-C). `out_root`: each shard's manifest is checked there too
    (`manifest_problems`), and a shard its bytes or its manifest fail loses its commit record there
    (`forget_failed`), so the next build writes it again."""
    pool = verify_pool(max(jobs, 1))
    pending: dict = {}  # future -> (job, deaths while checking it, deaths while it was held)

    def settle(fut) -> Checked | None:
        job, deaths, held = pending.pop(fut)
        try:
            problems = fut.result()
            if isinstance(problems, Changed):  # a run's doing, not damage: no verdict, its commit left to it
                return Checked(job.shard, [], f"it changed while it was checked: {problems.why}; no verdict on its "
                                              "bytes: run verify again once the build writing it is done")
            return Checked(job.shard, problems, done=forget_failed(out_root, job.shard) if problems and out_root else [])
        except (fs.StorageError, ReadBackFailed) as e:  # the storage, not the shard: no verdict on its bytes
            return Checked(job.shard, [], f"{fs.redact(str(e))}; run verify again")
        except WorkerDied as died:
            if died.culprit is None:
                held.append(died.named)
            else:
                deaths.append(died.named)
            if len(deaths) >= CHECK_DEATHS or len(held) >= HELD_DEATHS:
                return Checked(job.shard, [], (
                    f"the process checking it died {len(deaths) + len(held)} times "
                    f"({', '.join(deaths + held)}), each time in a fresh process; no verdict on its bytes: "
                    "give verify more memory or fewer --jobs, and run it again"))
            pending[pool.submit(job)] = (job, deaths, held)  # from the start, in a fresh worker
            return None

    def drain(limit: int) -> Iterator[Checked]:
        while len(pending) > limit:
            for fut in first_done(list(pending)):
                done = settle(fut)
                if done is not None:
                    yield done

    for sh, url, rows in tasks:
        job = ShardCheckJob(url, sh, rows, decode, ext, out_root)
        del rows
        pending[pool.submit(job)] = (job, [], [])
        yield from drain(jobs + 1)
    yield from drain(0)


def forget_failed(out_root: str, shard: dict) -> list[str]:
    """A shard whose bytes failed verify is not fresh: its commit record, while it still names the
    commit the catalog recorded and verify checked (another run's is left alone, and none can write
    one while it is looked at: outroot.forget_commit holds the shard's lease), is removed, and the
    next `imnet build` writes the shard again. Freshness trusts a shard's size and stamp (its bytes
    are not hashed on every look), so a byte that rots with the stamp unchanged is found only here.
    What it did is said in a line (none when the record was not that commit's)."""
    key = shard["shard"]
    try:
        gone = forget_commit(out_root, key, {"sha256": shard["sha256"], "run_id": shard.get("run_id") or ""},
                             FORGETTING)
    except LeaseHeld as e:  # a run writing the shard again (its commit is its own), or another verify
        return [f"commit record left alone: {e}"]
    except (fs.StorageError, OSError) as e:  # read-only credentials: the verdict stands, unmarked
        return [f"commit record not removed ({fs.redact(str(e))}): move the shard aside and run `imnet build`"]
    return ["commit record removed: the next `imnet build` writes this shard again"] if gone else []


def manifest_problems(out_root: str, shard: dict) -> list[str]:
    """`imnet verify`'s check of a shard's manifest against the commit the catalog records
    (`shard`: its catalog record, `sha256` and `run_id` among it): the sha256 of its bytes against
    the one its commit record carries (`manifest_sha256`), when the record is that commit's and
    carries one; else it is parsed and its head (shard, bytes, sha256, run, number of samples, the
    samples it lists) compared to the catalog's. An empty list: the manifest is that commit's.
    Storage that does not answer raises StorageError (no verdict)."""
    key = shard["shard"]
    url, limit = manifest_url(out_root, key), manifest_limit(shard.get("planned"))  # (its planned samples)
    try:
        data = fs.read_bytes(url, limit=limit, kind="a shard's manifest")
    except FileNotFoundError:
        return [f"its manifest {fs.redact(url)} is missing"]
    except fs.TooLarge:
        return [f"its manifest {fs.redact(url)} is damaged (over {limit:,} bytes, more than a manifest of its "
                "planned samples can hold)"]
    except fs.StorageError:
        raise
    except (IsADirectoryError, NotADirectoryError):
        return [f"its manifest {fs.redact(url)} is not a file"]
    except OSError as e:  # the machinery's read (EIO, EACCES), not the manifest's bytes: no verdict
        raise ReadBackFailed(f"cannot read {fs.redact(url)}: {type(e).__name__}: {fs.redact(str(e))}") from None
    try:
        record = fs.read_json(state_url(out_root, key), limit=RECORD_MAX_BYTES, kind="a commit record")
    except fs.TooLarge:  # not a record: the manifest is parsed instead
        record = None
    if (isinstance(record, dict) and "manifest_sha256" in record
            and committed_as(record) == committed_as({"sha256": shard["sha256"], "run_id": shard.get("run_id") or ""})):
        if hashlib.sha256(data).hexdigest() == record["manifest_sha256"]:
            return []
        return [f"its manifest {fs.redact(url)} is damaged (its sha256 is not the one committed)"]
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    want = {"shard": key, "bytes": shard["bytes"], "sha256": shard["sha256"], "num_samples": shard["num_samples"]}
    if (not isinstance(doc, dict) or any(doc.get(k) != v for k, v in want.items())
            or (shard.get("run_id") and doc.get("run_id") != shard["run_id"])
            or not isinstance(doc.get("samples"), list) or len(doc["samples"]) != shard["num_samples"]):
        return [f"its manifest {fs.redact(url)} is damaged (does not parse, or is not the commit the catalog records)"]
    return []
