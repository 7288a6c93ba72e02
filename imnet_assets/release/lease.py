"""Leases: one holder at a time of a named thing under an out root (a local folder or an s3:// prefix).

Two things are leased (SPEC "Failure behaviour": one build at a time per out root): the out root's
build (`imnet build`) and each shard partition (its run, however it was started: CLI, UI,
schedule, sensor). A lease is a folder `<out root>/_locks/<name>/` of generation objects
`<n:08d>.json`, each naming its holder (what, host, pid namespace, pid, since, renewed); the
highest generation is the current one.

Taking a lease: list the folder; if the highest generation's holder may still be alive, refuse
(LeaseHeld names it). Otherwise create generation n+1 only if no such object exists (local: a
hard link to a complete temporary file, which fails where the name exists; S3: a PUT with
`If-None-Match: *`): of several takers at once exactly one creates it, and the others look
again (a create refused for an object that holds the taker's own token is its own: a retry of a
create whose reply was lost). The winner removes the older generations; releasing removes its own, and so
does the heartbeat for a take that failed after its create (its read back): only an object holding its
token. (An S3-compatible
store must honour `If-None-Match` on PUT, as AWS S3, MinIO and R2 do; the winner reads its object
back, which catches a store that ignores it unless two takers write within the same moment.)

Whether a holder may still be alive (`holder_alive`), as `atomic.remove_partials` judges an upload's
writer: a process of this host and pid namespace is asked (`host.pid_alive`, against number
reuse by its start time), so a holder killed with kill -9 is taken over at once; a holder of
another host or namespace cannot be asked, and counts as gone once it has not renewed its lease
for EXPIRE_SECONDS (a heartbeat thread renews every held lease each RENEW_SECONDS, by the
holder's clock). A lease this process holds is alive while it is held (two threads of one
process are two holders).

A generation object that is damaged (it does not parse, is not a holder's document, or is larger
than one can be: LEASE_MAX_BYTES) names no one, but its holder may be alive: it counts as
held by an unknown holder, renewed when the object was last written (`_damaged`), so a second build
still refuses (naming the damaged file) until it is EXPIRE_SECONDS old, then takes it over, removing
it; a live holder writes its own generation again at its next renewal, and the damage is gone.

A holder that finds, when renewing, a newer generation than its own (it was taken for gone: a
heartbeat that could not reach the storage for EXPIRE_SECONDS) marks its lease lost; `check()`
then raises LeaseLost, before anything is committed under it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from imnet_assets.runtime.host import pid_alive, pid_namespace
from imnet_assets.storage import atomic, fs

LOCKS_DIR = "_locks"
RENEW_SECONDS = 30.0  # how often a held lease is renewed
EXPIRE_SECONDS = 300.0  # a lease of another host not renewed for this long is taken over
TAKE_ATTEMPTS = 8  # looks at a lease whose generation others keep creating before giving up
LEASE_MAX_BYTES = 1 << 20  # a lease object is ~300 bytes: a larger one is damaged, never read whole
MOMENT_SECONDS = 30.0  # how long a shard's run waits out a holder of its lease that holds it for a moment
SETTLE_ATTEMPTS = 10  # rounds of the renewer that try to remove a failed take's object (_settle_all)
_GENERATION = re.compile(r"^(\d{8})\.json$")


class LeaseHeld(RuntimeError):
    """Someone else holds the lease; the message names the holder."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


class LeaseLost(RuntimeError):
    """The lease was taken over by another holder while this one held it."""


def lease_folder(out_root: str, name: str) -> str:
    return fs.join(out_root, LOCKS_DIR, name)


SHARD_LEASE_PREFIX = "shard-"


RUN_PREFIX = "run "  # a shard run's holder: `run <run id>` (defs/assets/wds_shards.py)


def writes_shard(holder: dict) -> bool:
    """Whether the holder of a shard's lease may be writing the shard: a run (`RUN_PREFIX`), or an
    unknown holder (its lease object damaged); not `imnet verify` or the audit removing its commit
    record (their `what` says so), which write no shard."""
    return bool(holder.get("damaged")) or str(holder.get("what", "")).startswith(RUN_PREFIX)


def shard_lease_name(key: str) -> str:
    """The lease of shard partition `key`'s run: <out root>/_locks/shard-<key>/."""
    return f"{SHARD_LEASE_PREFIX}{key}"


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def describe(holder: dict) -> str:
    """`run 1a2b3c4d (host h, pid 123, since 2026-12-06T13:55:02Z)`."""
    if holder.get("damaged"):
        return holder["what"]
    try:
        since = _utc(float(holder.get("since", 0)))
    except (TypeError, ValueError):
        since = "?"
    return (f"{holder.get('what', '?')} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"since {since})")


# ----------------------------------------------------------------------------- this process's leases

_held: dict[str, Lease] = {}  # token -> lease, for every lease this process holds
_unsettled: dict[str, Lease] = {}  # token -> a failed take's lease, whose object may be there (_settle)
_held_lock = threading.Lock()
_renewer: threading.Thread | None = None
_settler: threading.Thread | None = None  # removing failed takes' objects (_settle_all)
_wake = threading.Event()


def holder_alive(holder: dict | None, now: float | None = None) -> bool:
    """Whether the holder a lease names may still be alive (see the module's docstring)."""
    if not isinstance(holder, dict):
        return False  # no lease object
    now = time.time() if now is None else now
    if holder.get("damaged"):  # an unknown holder, renewed when its object was last written
        return now - holder["renewed"] < EXPIRE_SECONDS
    try:
        since, renewed, pid = float(holder["since"]), float(holder["renewed"]), int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if holder.get("host") == socket.gethostname() and holder.get("pid_namespace") == pid_namespace():
        if pid == os.getpid():
            with _held_lock:
                return holder.get("token") in _held
        return pid_alive(pid, started_by=since)
    return now - renewed < EXPIRE_SECONDS


@dataclass
class Lease:
    folder: str
    generation: int
    holder: dict
    lost: str | None = None
    taken: bool = False  # its object exists (until then it is in _held, but not renewed)
    settle_failures: int = 0  # failed tries at removing the object of a take that failed (_settle_all)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def url(self) -> str:
        return fs.join(self.folder, f"{self.generation:08d}.json")

    @property
    def token(self) -> str:
        return self.holder["token"]

    def check(self) -> None:
        """Raise LeaseLost if another holder took this lease over."""
        if self.lost:
            raise LeaseLost(self.lost)

    def renew(self) -> None:
        """Write this lease again with the time now, unless a newer generation exists or the
        object is no longer this holder's (then the lease is lost)."""
        with self._lock:
            if self.lost or not self.taken:
                return
            written = _listing(self.folder)
            newer = [g for g in written if g > self.generation]
            current = _holder_at(self.url, written[self.generation]) if self.generation in written else None
            # its own generation damaged, none newer: no one else writes it, so it is written again now
            if newer or current is None or (not current.get("damaged") and current.get("token") != self.token):
                taker = _holder_at(fs.join(self.folder, f"{max(newer):08d}.json"), written[max(newer)]) \
                    if newer else None
                self.lost = (f"the lease {self.url} was taken over"
                             + (f" by {describe(taker)}" if isinstance(taker, dict) else "")
                             + f" while {self.holder['what']} held it (not renewed for {EXPIRE_SECONDS:.0f}s?)")
                return
            self.holder["renewed"] = time.time()
            atomic.write_atomic(self.url, json.dumps(self.holder).encode())

    def release(self) -> None:
        """Give the lease up: its object is removed (if it is still this holder's)."""
        with _held_lock:
            _held.pop(self.token, None)
        with self._lock:
            if self.lost:
                return
            self.lost = "released"
            # A lease left behind would count while this process lives (a code server, a build
            # going on with other shards): tried a few times. One still left is taken over once
            # the process is gone (or, seen from another host, once it is not renewed).
            for wait in (0.5, 2.0, None):
                try:
                    current = _holder_at(self.url, time.time())
                    if current is not None and (current.get("damaged") or current.get("token") == self.token):
                        fs.remove(self.url)  # (damaged: its own generation, which no one else writes)
                    break
                except Exception:  # noqa: BLE001 - storage that does not answer: tried again
                    if wait is None:
                        break
                    time.sleep(wait)
            if not fs.is_remote(self.folder):  # no empty folders left behind (1,024 shards)
                for folder in (self.folder, fs.dirname(self.folder)):
                    with contextlib.suppress(OSError):  # not empty: another lease is there
                        os.rmdir(folder)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _generations(folder: str) -> list[int]:
    return sorted(_listing(folder))


def _listing(folder: str) -> dict[int, float]:
    """generation -> when its object was last written (by the storage's clock), from one listing."""
    return {int(m.group(1)): _written(e["mtime"]) for e in fs.listdir(folder) if (m := _GENERATION.match(e["name"]))}


def _written(mtime: str) -> float:
    """A listing's modification time (a local file's seconds; S3's LastModified) as seconds."""
    try:
        return float(mtime)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(mtime).timestamp()
    except ValueError:
        return time.time()  # unknown: as if written now (a damaged object counts as held)


def _holder_at(url: str, written: float) -> dict | None:
    """The holder document at `url` (None: no object there); a damaged one (see the module's
    docstring) as `_damaged`'s unknown holder. A storage that does not answer raises."""
    try:
        data = fs.read_bytes(url, limit=LEASE_MAX_BYTES, kind="a lease file")
    except FileNotFoundError:
        return None
    except fs.TooLarge:
        return _damaged(url, written, "larger than a lease file can be")
    return _holder_of(url, data, written)


def _holder_of(url: str, data: bytes, written: float) -> dict:
    try:
        doc = json.loads(data)
        float(doc["since"]), float(doc["renewed"]), int(doc["pid"])  # noqa: B018 - what holder_alive reads
        return doc
    except (KeyError, TypeError, ValueError):
        return _damaged(url, written, "not a lease holder's document (cut short or changed)")


def _damaged(url: str, written: float, why: str) -> dict:
    """An unknown holder standing for the damaged lease object at `url`: alive (holder_alive) until
    the object is EXPIRE_SECONDS old, as another host's holder that stopped renewing."""
    return {"what": f"an unknown holder (its lease {url} is damaged: {why}; a live holder writes it again "
                    f"within {RENEW_SECONDS:.0f}s, else it is taken over once {EXPIRE_SECONDS:.0f}s old, at "
                    f"{_utc(written + EXPIRE_SECONDS)}; remove it if no build is running)",
            "damaged": True, "since": written, "renewed": written}


def _create(url: str, data: bytes) -> bool:
    """Write `data` at `url` only if nothing is there; False if something was. On S3 a refused
    create is True as well: a create whose reply was lost (the connection reset after S3 carried
    it out) is retried and refused (412) for its own object, so whose object it is, the caller's
    read back says (`acquire`)."""
    if fs.is_remote(url):
        fsys, path = fs.filesystem(url)
        bucket, _, key = path.partition("/")
        try:
            fsys.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except FileExistsError:  # s3fs's translation of 412 PreconditionFailed
            return True
        except Exception as e:  # noqa: BLE001 - botocore's errors are not OSErrors
            text = f"{type(e).__name__}: {e}"
            if "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text:
                return True
            gone = fs.missing_bucket(url) if isinstance(e, FileNotFoundError) else None
            raise fs.StorageError(fs.redact(f"cannot create the lease {url}: {text}"
                                            + (f" ({gone}; the out root's bucket must exist)" if gone else ""))) from e
        return True
    folder, name = os.path.split(os.path.abspath(url))
    tmp = os.path.join(folder, f".{name}{atomic.TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    for _ in range(8):  # the folder may be removed by a holder releasing its lease (release)
        os.makedirs(folder, exist_ok=True)
        try:
            f = open(tmp, "xb")
            break
        except FileNotFoundError:
            continue
    else:
        raise FileNotFoundError(f"cannot create {tmp}: its folder keeps disappearing")
    with atomic.removed_on_error(f, tmp, url), f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, os.path.join(folder, name))  # complete when it appears; fails if the name exists
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def acquire(out_root: str, name: str, what: str) -> Lease:
    """Take the lease `name` under `out_root` for `what` (e.g. "imnet build", "run 1a2b3c4d"), or
    raise LeaseHeld naming the holder. Release it with `release()` (or use it as a context)."""
    folder = lease_folder(out_root, name)
    atomic.sweep_partials(folder)  # temporary files of takers killed mid-write (local folders)
    for _attempt in range(TAKE_ATTEMPTS):
        written = _listing(folder)
        gens = sorted(written)
        top = gens[-1] if gens else 0
        if top:
            holder = _holder_at(fs.join(folder, f"{top:08d}.json"), written[top])
            if holder is None:
                continue  # released meanwhile: look again
            if holder_alive(holder):
                raise LeaseHeld(f"{describe(holder)} holds it (lease {fs.join(folder, f'{top:08d}.json')})", holder)
        now = time.time()
        mine = {"what": what, "host": socket.gethostname(), "pid_namespace": pid_namespace(), "pid": os.getpid(),
                "since": now, "renewed": now, "token": uuid.uuid4().hex}
        lease = Lease(folder, top + 1, mine)
        with _held_lock:  # held from before it exists: this process never takes its own lease for gone
            _held[lease.token] = lease
        try:
            created = _create(lease.url, json.dumps(mine).encode())
            if created:
                # The object read back says which taker holds it: a store that ignores If-None-Match
                # lets a second taker overwrite the first, and on S3 a refused create may be the
                # retry of this taker's own whose reply was lost (_create).
                current = fs.read_json(lease.url)
                created = isinstance(current, dict) and current.get("token") == lease.token
        except BaseException:  # a take that failed: not this process's lease (never "held by itself")
            with _held_lock:
                _held.pop(lease.token, None)
                # its object, if this take made it (a create whose read back failed), would name this
                # live process to every other taker for as long as it lives: the renewer removes it
                # (_settle), starting now, not holding up the error
                _unsettled[lease.token] = lease
            _start_renewer()
            _wake.set()
            raise
        if not created:  # another taker created this generation first: look at it
            with _held_lock:
                _held.pop(lease.token, None)
            continue
        lease.taken = True
        for g in gens:  # the generations before: their holders are gone (or were superseded)
            with contextlib.suppress(Exception):
                fs.remove(fs.join(folder, f"{g:08d}.json"))
        _start_renewer()
        return lease
    holder = _holder_at(fs.join(folder, f"{max(_generations(folder) or [0]):08d}.json"), time.time()) or {}
    raise LeaseHeld(f"others keep taking it at once (the last: {describe(holder)})", holder)


def acquire_waiting(out_root: str, name: str, what: str, waits_for: Callable[[dict], bool],
                    seconds: float = MOMENT_SECONDS, poll: float = 0.5,
                    waiting: Callable[[str], None] | None = None) -> Lease:
    """acquire, waiting up to `seconds` (looking every `poll`) while the holder is one `waits_for`
    says holds the lease only for a moment (for a shard's lease: `imnet verify` or the audit removing
    its commit record, not writes_shard); any other holder raises LeaseHeld at once, and one that
    holds it past `seconds` raises it naming the holder and the wait. `waiting(line)` is told once
    when it starts to wait, naming the holder."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return acquire(out_root, name, what)
        except LeaseHeld as e:
            if not waits_for(e.holder):
                raise
            if time.monotonic() >= deadline:
                raise LeaseHeld(f"{e} (waited {seconds:.0f}s for it to let go)", e.holder) from None
            if waiting is not None:
                waiting(f"waiting up to {seconds:.0f}s for the lease {name}: {e}")
                waiting = None
        time.sleep(poll)


def holder_of(out_root: str, name: str) -> tuple[dict, str] | None:
    """The holder of lease `name` and its lease's URL while one may be alive, else None: a look
    (one listing, one read) that takes nothing."""
    folder = lease_folder(out_root, name)
    written = _listing(folder)
    if not written:
        return None
    url = fs.join(folder, f"{max(written):08d}.json")
    holder = _holder_at(url, written[max(written)])
    return (holder, url) if holder_alive(holder) else None


def held_leases(out_root: str, prefix: str = "") -> dict[str, dict]:
    """Lease name -> its holder, for each lease under `out_root` named `prefix...` whose holder
    may still be alive. One listing of `_locks/` (fs.find_files: on S3 one request per 1,000
    keys), then the current generations only, read at once (fs.read_json_many): as many reads as
    leases are present (the runs in flight, and those a killed run left), never one per shard."""
    top: dict[str, tuple[int, float]] = {}
    for f in fs.find_files(fs.join(out_root, LOCKS_DIR)):
        name, _, leaf = f["path"].rpartition("/")
        if (m := _GENERATION.match(leaf)) and name.startswith(prefix) and "/" not in name:
            top[name] = max(top.get(name, (0, 0.0)), (int(m.group(1)), _written(f["mtime"])))
    urls = {name: fs.join(lease_folder(out_root, name), f"{g:08d}.json") for name, (g, _) in top.items()}
    try:
        data = fs.read_many(list(urls.values()), limit=LEASE_MAX_BYTES, kind="a lease file") if urls else {}
        docs = {name: None if data[url] is None else _holder_of(url, data[url], top[name][1])
                for name, url in urls.items()}
    except fs.TooLarge:  # one is damaged so: each read on its own (rare)
        docs = {name: _holder_at(url, top[name][1]) for name, url in urls.items()}
    return {name: doc for name, doc in docs.items() if holder_alive(doc)}


def held_shard_leases(out_root: str) -> dict[str, dict]:
    """Shard partition key -> the holder of its run's lease, for the shards being built now."""
    return {name[len(SHARD_LEASE_PREFIX):]: holder
            for name, holder in held_leases(out_root, SHARD_LEASE_PREFIX).items()}


def _renew_all() -> None:
    while True:
        _wake.wait(RENEW_SECONDS)
        _wake.clear()
        with _held_lock:
            leases = list(_held.values())
        for lease in leases:
            with contextlib.suppress(Exception):  # storage down: tried again next time
                lease.renew()
        _start_settler()


def _settle_all() -> None:
    """One try at each failed take's object (`_settle`), in a thread of its own: a storage that keeps
    one retrying for minutes never holds up the renewals. One the storage refuses SETTLE_ATTEMPTS
    times (a try each RENEW_SECONDS) is given up with a line on stderr naming it."""
    with _held_lock:
        unsettled = list(_unsettled.values())
    for lease in unsettled:
        try:
            _settle(lease)
        except Exception as e:  # noqa: BLE001 - storage down or refusing: tried again next round
            lease.settle_failures += 1
            if lease.settle_failures < SETTLE_ATTEMPTS:
                continue
            print(fs.redact(f"warning: gave up removing {lease.url}, the lease object of a take that failed, "
                            f"after {SETTLE_ATTEMPTS} tries ({type(e).__name__}: {e}): it names this process "
                            f"(pid {os.getpid()}), which does not hold it, until the process ends (seen from "
                            f"another host: {EXPIRE_SECONDS:.0f}s); remove it to take the lease sooner"),
                  file=sys.stderr, flush=True)
        with _held_lock:
            _unsettled.pop(lease.token, None)


def _start_settler() -> None:
    global _settler
    with _held_lock:
        if _unsettled and (_settler is None or not _settler.is_alive()):
            _settler = threading.Thread(target=_settle_all, name="imnet-lease-settler", daemon=True)
            _settler.start()


def _settle(lease: Lease) -> None:
    """A take that failed after its create may have left its object (its read back failed): removed
    if the object there holds the take's token (it is this take's; another taker's is left alone),
    as a release removes its own. Raises while the storage does not answer."""
    current = fs.read_json(lease.url)
    if isinstance(current, dict) and current.get("token") == lease.token:
        fs.remove(lease.url)


def _start_renewer() -> None:
    global _renewer
    with _held_lock:
        if _renewer is None or not _renewer.is_alive() or _renewer.ident is None:
            _renewer = threading.Thread(target=_renew_all, name="imnet-lease-renewer", daemon=True)
            _renewer.start()
