"""The DuckDB catalog: opens the file and runs the statements kept in `sql/`.

No SQL text lives in Python: every statement is a file under `sql/`, run by name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import duckdb

from imnet_assets.runtime import host
from imnet_assets.storage import atomic

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
# An image that keeps the catalog on a volume names the volume's mount point in this file
# (deploy/docker/Dockerfile: /catalog). There a writer opens only a catalog on that mounted volume:
# a catalog step in a container or pod started without the volume fails at once, instead of
# indexing the raw release into a catalog that vanishes with the container. Elsewhere (no file)
# nothing changes.
CATALOG_VOLUME_NOTE = Path("/etc/imnet-assets/catalog-volume")
# DuckDB's share of the memory this process may hold (runtime.host.memory_limit: a cgroup's limit
# where there is one); the rest is Python's and the index's scan workers'. Exact dedup at 13M rows
# peaked at 5.5 GB with DuckDB's default limit (80% of the host's RAM, not the pod's).
MEMORY_SHARE = 0.5


def memory_limit_bytes() -> int:
    """The memory limit a catalog connection sets (sql/catalog_memory.sql)."""
    return int(host.memory_limit() * MEMORY_SHARE) >> 20 << 20


def held_to(wanted: int) -> str:
    """The memory limit a stage sets for its own work (sql/audit_memory.sql, plan_build.sql,
    plan_validation.sql, verify_memory.sql): what it wants, or the connection's share
    (memory_limit_bytes) where that is smaller, so a stage never raises DuckDB above what this
    process may hold (a pod limited to 4 GiB: 2 GiB, not the audit's 3 GB)."""
    return f"{min(wanted, memory_limit_bytes()) >> 20}MiB"


def spill_folder(path: str, read_only: bool = False) -> str:
    """Where a catalog's queries spill beyond their memory limit: beside the file (DuckDB's own
    default for a database file, named absolute: the same place whatever the working directory).
    A reader of a catalog whose folder it cannot write (a read-only mount: `imnet verify` in a pod
    given the catalog's volume read-only) spills under the system's temporary folder instead:
    beside the file, the first query to spill would fail. DuckDB names its files there by process,
    so readers in two processes share either folder; the one under the temporary folder is named
    by user too (DuckDB makes it 0755: another user's reader could not spill in it)."""
    beside = f"{os.path.abspath(path)}.tmp"
    if not read_only or os.access(os.path.dirname(beside), os.W_OK | os.X_OK) or os.access(beside, os.W_OK | os.X_OK):
        return beside
    digest = hashlib.sha256(beside.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"imnet-catalog-{os.geteuid()}-{digest}.tmp")


_UNITS = {"bytes": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def setting_bytes(text: str) -> int | None:
    """A size as DuckDB shows a setting ("18.8 GiB", "512.0 MiB"); None where it is not one."""
    found = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]+)\s*", text or "")
    return int(float(found.group(1)) * _UNITS[found.group(2)]) if found and found.group(2) in _UNITS else None


class CatalogVolumeMissing(RuntimeError):
    """The catalog's volume is not mounted where this image expects it."""


def check_catalog_volume(path: str, note: Path = CATALOG_VOLUME_NOTE) -> None:
    """Raise CatalogVolumeMissing if `note` names a volume and `path` is not on it, mounted."""
    if not note.exists():
        return
    volume = os.path.abspath(note.read_text().strip())
    target = os.path.abspath(path)
    if os.path.commonpath([volume, target]) != volume:
        raise CatalogVolumeMissing(
            f"catalog {target} (IMNET_CATALOG) is not on the catalog volume {volume} that this image "
            f"expects ({note}): point IMNET_CATALOG into {volume}"
        )
    if not os.path.ismount(volume):
        raise CatalogVolumeMissing(
            f"the catalog volume is not mounted at {volume} (named by {note}): this container has no "
            f"catalog, and a catalog written here would vanish with it. Run the catalog steps where the "
            f"volume is mounted (deploy/README.md: docker -v <volume>:{volume}, or the catalog Job on Kubernetes)"
        )


@cache
def sql(name: str) -> str:
    path = SQL_DIR / f"{name}.sql"
    if not path.exists():
        raise FileNotFoundError(f"no SQL statement {name!r} in {SQL_DIR}")
    return path.read_text()


def schema_tables() -> list[str]:
    """The tables sql/schema.sql makes."""
    return re.findall(r"^CREATE TABLE IF NOT EXISTS (\w+)", sql("schema"), re.MULTILINE)


def _statements(text: str) -> list[str]:
    # Our files hold plain statements separated by ';' at line ends (no procedural blocks).
    body = "\n".join(line for line in text.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in re.split(r";[ \t]*\n", body) if s.strip().strip(";").strip()]


# ----------------------------------------------------------------------------- damage

class CatalogDamaged(RuntimeError):
    """The catalog file is not a readable DuckDB database (cut short, its header overwritten, a
    block that fails its checksum, another file in its place). Its message is one line naming the
    file and the recovery."""


# What DuckDB says of a damaged file: a header that is not DuckDB's, a block whose checksum fails
# (DuckDB checks each block's as it loads it), a file shorter than its blocks, metadata that does
# not deserialize. (A lock held, a permission refused, a newer storage version: not damage.)
_DAMAGE_WORDS = re.compile(
    r"not a valid DuckDB database file|Corrupt database file|checksum|Could not read enough bytes|"
    r"deserializ|database has been invalidated|INTERNAL Error", re.IGNORECASE)


def damage_message(path: str, cause: str) -> str:
    where = os.path.abspath(path)
    move = f"mv {where} {where}.damaged"
    if os.path.exists(f"{where}.wal"):  # its write-ahead log goes with it: DuckDB would replay it
        move += f"; mv {where}.wal {where}.damaged.wal"
    return (f"catalog {where} is damaged ({cause}): move it aside ({move}) and run `imnet build`: it is "
            "rebuilt from the raw release and the shard manifests, and no shard is rewritten")


def as_damage(path: str, error: BaseException) -> CatalogDamaged | None:
    """`error`, raised reading the catalog at `path`, as CatalogDamaged when it says the file is
    damaged; None when it says something else."""
    kinds = (duckdb.SerializationException, duckdb.InternalException, duckdb.FatalException)
    if not isinstance(error, kinds) and not _DAMAGE_WORDS.search(str(error)):
        return None
    cause = " ".join(str(error).split())
    cause = cause if len(cause) <= 160 else cause[:157] + "..."
    return CatalogDamaged(damage_message(path, cause))


@contextlib.contextmanager
def _damage_named(path: str) -> Iterator[None]:
    """DuckDB errors that say the file is damaged, raised inside, leave as CatalogDamaged; a query
    interrupted by Ctrl-C or SIGTERM leaves as the KeyboardInterrupt it was."""
    try:
        yield
    except RuntimeError as e:
        if str(e) == QUERY_INTERRUPTED:
            raise KeyboardInterrupt from None
        raise
    except duckdb.Error as e:
        damage = as_damage(path, e)
        if damage is None:
            raise
        raise damage from None


# What DuckDB's Python client raises (a RuntimeError) when a signal handler raised while a query ran:
# it checks for signals as it executes, runs the handler (Ctrl-C's, or SIGTERM's: stop_on_signals)
# and drops the KeyboardInterrupt that handler raised. Unconverted, a stage stopped by Ctrl-C or
# SIGTERM inside a query reported "FAILED ... RuntimeError: Query interrupted", exit 1.
QUERY_INTERRUPTED = "Query interrupted"

# Files this process has read whole and found intact: path -> (device, inode, size, mtime) of the
# file and its write-ahead log then. A check of an unchanged file is not made again.
_found_intact: dict[str, tuple] = {}


def _file_state(path: str) -> tuple:
    def one(p: str):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    return (one(path), one(path + ".wal"))


def _made_here(path: str) -> tuple | None:
    """Make the catalog file at `path` when there is none: an empty database made under a name of
    this process's, then linked to `path`, which fails where a file is (another writer made it
    meanwhile). Returns the file made here as it was made (_file_state's); None when another process
    made it, or the folder takes no hard links (DuckDB's connect then makes it, as before). A failure
    to make it (a full disk) removes what was made and raises. What a maker killed while making one
    left is swept first, the catalog there or not: one killed after its link left a second name of
    the catalog, which nothing else removes."""
    folder, name = os.path.split(os.path.abspath(path))
    atomic.sweep_partials(folder)
    if os.path.exists(path):
        return None
    new = os.path.join(folder, f".{name}{atomic.TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with _damage_named(new):
            duckdb.connect(new).close()
        made = _file_state(new)[0]
        os.link(new, path)
        return made
    except FileExistsError:
        return None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):  # no hard links
            raise
        return None
    finally:
        _unmade(new)


def _unmade(path: str, made: tuple | None = None) -> None:
    """Remove the file (and log) at `path` that this process made and failed to write whole (a full
    disk: DuckDB leaves an empty or cut file, which every later open took for a damaged catalog, and
    no build ran again until it was moved aside by hand). Nothing was in it. With `made`
    (_made_here's): only while the file there is that one, as it was made (no other writer wrote
    into it)."""
    if made is not None and _file_state(path)[0] != made:
        return
    for p in (path, f"{path}.wal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


class Catalog:
    """A connection to the catalog file. Writers create the schema; readers open read-only.

    DuckDB errors that say the file is damaged leave as CatalogDamaged (one line: the file and the
    recovery) from opening it and from `run`, `rows`, `dicts`, `one` and `transaction`."""

    def __init__(self, path: str, read_only: bool = False, retries: float = 30.0):
        self.path, self.read_only = path, read_only
        if not read_only:
            check_catalog_volume(path)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        elif not os.path.exists(path):
            raise FileNotFoundError(f"catalog {path} does not exist yet: run `imnet build` first")
        deadline = time.monotonic() + retries
        # a catalog this writer makes is made here first, then opened: which file it made is known,
        # whatever another writer makes meanwhile (never removed: _unmade)
        made = _made_here(path) if not read_only else None
        while True:
            unlinked = not read_only and made is None and not os.path.exists(path)  # (no hard links there)
            try:
                with _damage_named(path):
                    self.con = duckdb.connect(path, read_only=read_only)
                break
            except duckdb.IOException as e:
                # Another process holds the write lock (e.g. an audit in progress): wait for it.
                if "lock" not in str(e).lower():
                    if made is not None or unlinked:
                        _unmade(path, made)
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        if read_only and (self._made_before_releases() or self._schema_unmade()):
            # made before releases, or its schema never made whole: a writer migrates it once
            # (Catalog.migrate_releases) or makes its schema, then this reader opens it as it is now
            self.con.close()
            Catalog(path, retries=retries).close()
            with _damage_named(path):
                self.con = duckdb.connect(path, read_only=True)
        try:
            with _damage_named(path):
                self.con.execute("SET enable_progress_bar = false")
                self._hold_memory()
                if not read_only:
                    with self.transaction():  # all of it or none: see _schema_unmade
                        self.run("schema")
                    self.migrate_releases()
        except BaseException:
            self.close()
            raise

    def _hold_memory(self) -> None:
        """Set DuckDB's memory limit (memory_limit_bytes) and where it spills (spill_folder). Both
        are the database's, shared by every connection of this process to it: a lower limit a
        stage set meanwhile (sql/audit_memory.sql, verify_memory.sql) is kept, and the spill
        folder is set only while DuckDB has not spilled (it refuses to move one it used)."""
        limit, now = memory_limit_bytes(), self.one("catalog_settings")
        held = setting_bytes(now["memory_limit"])  # (None: not a size this reads, e.g. "16383.9 PiB": none)
        if held is None or held > limit:
            self.run("catalog_memory", {"memory_limit": f"{limit >> 20}MiB"})
        spill = spill_folder(self.path, self.read_only)
        if now["temp_directory"] != spill:
            with contextlib.suppress(duckdb.NotImplementedException):  # spilled already: where it did
                self.run("catalog_spill", {"temp_directory": spill})

    def _looked_up(self, name: str) -> list[tuple]:
        """The rows of sql/<name>.sql, asked while opening: on any error the connection is closed."""
        try:
            with _damage_named(self.path):
                return self.con.execute(sql(name)).fetchall()
        except BaseException:
            self.close()
            raise

    def _made_before_releases(self) -> bool:
        return bool(self._looked_up("catalog_before_releases")[0][0])

    def _schema_unmade(self) -> bool:
        """Whether a table that sql/schema.sql makes is missing: the file of a writer killed (kill -9,
        SIGTERM) after DuckDB created it and before its schema was committed (an empty file; or,
        from versions that made the schema statement by statement, some of its tables). Every
        reader would fail on a missing table (`stages`) for good, `imnet build` first."""
        return not set(schema_tables()) <= {t for (t,) in self._looked_up("catalog_tables")}

    def run(self, name: str, params: dict | None = None):
        """Run every statement of `sql/<name>.sql`; returns the cursor of the last one."""
        result = None
        with _damage_named(self.path):
            for stmt in _statements(sql(name)):
                used = {k: v for k, v in (params or {}).items() if re.search(rf"\${re.escape(k)}\b", stmt)}
                result = self.con.execute(stmt, used) if used else self.con.execute(stmt)
        return result

    def rows(self, name: str, params: dict | None = None) -> list[tuple]:
        cur = self.run(name, params)
        with _damage_named(self.path):
            return cur.fetchall()

    def dicts(self, name: str, params: dict | None = None) -> list[dict]:
        cur = self.run(name, params)
        cols = [d[0] for d in cur.description]
        with _damage_named(self.path):
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    def check_intact(self) -> None:
        """Read every row of every table (sql/catalog_intact.sql): DuckDB verifies the checksum of
        each block it loads, so damage anywhere in the tables' data raises CatalogDamaged here,
        before a command vouches for what the catalog holds. Made once per state of the file in
        a process. Cost, measured: 3.3-3.5 s for a 2.4 GB catalog of 13M rows in each of `images`,
        `plan` and `shard_samples` (the real release's size; page cache warm, 2 busy cores: DuckDB
        reads in parallel, so more cores take less), 0.25-0.45 s at 1M rows."""
        key = os.path.abspath(self.path)
        state = _file_state(self.path)
        if _found_intact.get(key) == state:
            return
        for (table,) in self.rows("catalog_tables"):
            self.rows("catalog_intact", {"table": table})
        _found_intact[key] = state

    def one(self, name: str, params: dict | None = None) -> dict:
        found = self.dicts(name, params)
        return found[0] if found else {}

    def made_before_releases(self) -> bool:
        """Whether the catalog's tables predate releases (issue 25): the first writer that opens
        it migrates it (migrate_releases)."""
        return bool(self.rows("catalog_before_releases")[0][0])

    def migrate_releases(self) -> None:
        """Give a catalog made before releases its release columns (sql/schema_releases.sql:
        `stages` and `shards` rebuilt, a few thousand rows; the others gained theirs by ALTER in
        schema.sql): one transaction, once. Every existing row is the default release's."""
        if not self.made_before_releases():
            return
        with self.transaction():
            self.run("schema_releases")

    # A stage's record: `release` names a release's own stage (shuffled_plan, shard_audit); the
    # shared stages (raw_tars, synset_manifest, filtered_index) and the default release use ''.
    def stage_fingerprint(self, stage: str, release: str = "") -> str | None:
        row = self.rows("stage_get", {"stage": stage, "release": release})
        return row[0][0] if row else None

    def set_stage(self, stage: str, fingerprint: str, run_id: str, release: str = "") -> None:
        self.run("stage_set", {"stage": stage, "fingerprint": fingerprint, "run_id": run_id, "release": release})

    def clear_stage(self, stage: str, release: str = "") -> None:
        self.run("stage_clear", {"stage": stage, "release": release})

    def clear_stage_every_release(self, stage: str) -> None:
        self.run("stage_clear_every_release", {"stage": stage})

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Statements run inside are committed together or not at all: a process killed inside
        leaves the catalog as it was before (DuckDB replays only committed transactions)."""
        with _damage_named(self.path):
            self.con.begin()
        try:
            yield
        except BaseException:
            with contextlib.suppress(duckdb.Error):  # (a damaged file may refuse this too)
                self.con.rollback()
            raise
        with _damage_named(self.path):
            self.con.commit()

    def close(self) -> None:
        if getattr(self, "con", None) is not None:
            self.con.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- readers and the lock

# DuckDB's words when another process holds the file (a writer, or readers when we would write):
# 'IO Error: Could not set lock on file "...": Conflicting lock is held in <exe> (PID <n>). ...'
_LOCK_HELD = re.compile(r"Conflicting lock is held in (?P<exe>.*?) \(PID (?P<pid>\d+)\)")
LOCK_NOTE_EVERY = 60.0  # seconds between "still waiting" notes


class CatalogBusy(RuntimeError):
    """The catalog is being written by another process, and the caller would not wait longer."""


def lock_holder(error: BaseException) -> str | None:
    """Who holds the catalog's lock, from DuckDB's error ("pid 4242: imnet build"), or None when
    `error` is not a lock conflict."""
    m = _LOCK_HELD.search(str(error))
    if m is None:
        return None
    pid = int(m["pid"])
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        what = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(argv[:4]))
    except OSError:  # gone since, or another machine's process on a shared file system
        what = os.path.basename(m["exe"])
    return f"pid {pid}: {what}"[:120]


def reading(path: str, catalog: Catalog | None = None):
    """A context for reading the catalog: `catalog` itself when the caller holds one open (the
    audit's own connection: DuckDB lets no second connection in beside a writer), left open;
    else a read-only connection to `path`, closed at the block's end."""
    return contextlib.nullcontext(catalog) if catalog is not None else Catalog(path, read_only=True)


def open_reader(path: str, say: Callable[[str], None] | None = None, wait_s: float | None = None,
                poll_s: float = 0.5, intact: bool = True) -> Catalog:
    """The catalog opened read-only, waiting while another process writes it (`imnet build` in
    `filtered_index` or the audit holds DuckDB's lock for as long as the stage runs; DuckDB lets
    no reader in meanwhile). Says once that it waits, and for whom, then again every minute.
    `wait_s`: give up after this long with CatalogBusy (None: wait until the writer is done).
    `intact`: read it whole first (Catalog.check_intact): CatalogDamaged if it is damaged."""
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.monotonic()
    noted = None
    while True:
        try:
            cat = Catalog(path, read_only=True, retries=0)
            if intact:
                try:
                    cat.check_intact()
                except BaseException:
                    cat.close()
                    raise
            return cat
        except duckdb.IOException as e:
            holder = lock_holder(e)
            if holder is None:
                raise
            waited = time.monotonic() - started
            if wait_s is not None and waited >= wait_s:
                raise CatalogBusy(f"catalog {path} is being written by another process ({holder})") from None
            if noted is None or time.monotonic() - noted >= LOCK_NOTE_EVERY:
                more = f" (waited {waited:.0f}s so far)" if noted is not None else ""
                say(f"catalog {path} is being written by another process ({holder}); waiting...{more}")
                noted = time.monotonic()
            time.sleep(poll_s)
