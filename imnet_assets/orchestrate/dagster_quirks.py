"""What Dagster 1.13 (as pinned in pyproject.toml) does that `imnet build`, running shard runs
on threads of one process, has to work around. One function per behaviour; each behaviour is
pinned by tests/test_dagster_quirks.py, which fails if a Dagster upgrade changes it."""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def console_kept_through_output_capture(build):
    """Keeps `build.out` (the command's progress lines) on the terminal while shard runs execute
    in threads. Dagster 1.13 captures a step's output for the UI by pointing file descriptors 1
    and 2 at the step's log file for as long as the step runs, process-wide
    (dagster._core.execution.compute_logs.redirect_stream: os.dup2), and points them back at what
    it found when the step began: with two runs at once, a step that began while the other's
    capture was on points them, when it ends, at the other's file for good. So progress lines go
    to a copy of the terminal's descriptor taken before, and 1 and 2 are put back when the runs
    are done."""
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    out = build.out
    if out is sys.stdout:
        sys.stdout.flush()
        build.out = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    try:
        yield
    finally:
        if build.out is not out:
            build.out.close()
            build.out = out
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def skip_per_run_logging_config(instance) -> bool:
    """Lets Dagster runs execute in several threads of this process at once; False when they
    may not. Dagster 1.13 calls logging.config.dictConfig at the start of every run of an
    instance with settings (a dagster.yaml), even when it configures no handlers
    (DagsterInstance.get_handlers -> get_yaml_python_handlers): that closes every logging handler
    of the process under logging's module lock, and deadlocks against a run in another thread
    emitting an event (each holds the lock the other waits for). With no
    python_logs.dagster_handler_config, that call yields no handlers: skipping it changes nothing
    else, so it is skipped for this instance (this process's only). With handlers configured,
    the runs must go one at a time."""
    if instance is None:
        return True
    if instance.get_python_log_dagster_handler_config():
        return False
    instance.get_yaml_python_handlers = list  # -> []: what the skipped call returns here
    return True


def one_engine_per_sqlite_storage(instance) -> None:
    """Makes this instance's SQLite storages keep one SQLAlchemy engine each. Dagster 1.13's
    SqliteRunStorage.connect, SqliteScheduleStorage.connect and
    ConsolidatedSqliteEventLogStorage._connect make a new engine for every connection
    (`create_engine(..., poolclass=NullPool)`), and an engine's compiled-statement cache goes with
    it: every query and insert is compiled again, ~1 ms of CPU each, some 50 per shard run (its
    events, run records, asset records). Each is given one engine, so a statement is compiled once
    per process, whose connections are kept for the next use (QueuePool, SQLAlchemy's own choice
    for a SQLite file) instead of opened and closed for each: a shard run's ~80 uses cost 0.5 ms of
    CPU each in sqlite3.connect and close (the audit's run: 0.36 -> 0.27 s of CPU; the `imnet`
    process over a 4-shard build: 2.45 -> 2.2-2.4 CPU-s, quiet machine, 4 builds each). The same busy
    timeout; a connection returned to the pool is rolled back, so none holds a lock between uses;
    the storage's `dispose` closes them. Storages of any other kind (Postgres: one pooled engine
    already) are left alone."""
    if instance is None:
        return
    from dagster._core.storage.event_log.sqlite.consolidated_sqlite_event_log import (
        SQLITE_BUSY_TIMEOUT_SECONDS,
        ConsolidatedSqliteEventLogStorage,
    )
    from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
    from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage

    for storage, kind, method, connect_args in (
            (instance.run_storage, SqliteRunStorage, "connect", {}),
            (instance.schedule_storage, SqliteScheduleStorage, "connect", {}),
            (instance.event_log_storage, ConsolidatedSqliteEventLogStorage, "_connect",
             {"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})):
        if type(storage) is kind and method not in vars(storage):
            engine = _engine(storage._conn_string, connect_args)
            setattr(storage, method, _connect_with(engine))
            storage.dispose = _disposing(storage.dispose, engine)


POOLED_CONNECTIONS = 4  # kept per SQLite storage: a build's shard runs at once, the main thread, the lease


def _engine(conn_string: str, connect_args: dict):
    from sqlalchemy import create_engine
    from sqlalchemy.pool import QueuePool

    # check_same_thread off: a pooled connection serves one thread at a time, but not always the same one
    return create_engine(conn_string, poolclass=QueuePool, pool_size=POOLED_CONNECTIONS, max_overflow=16,
                         connect_args={**connect_args, "check_same_thread": False})


def _disposing(dispose, engine):
    def both() -> None:
        engine.dispose()
        dispose()

    return both


def _connect_with(engine):
    @contextlib.contextmanager
    def connect():  # as Dagster's: a connection in a transaction, committed when the block ends
        with engine.connect() as conn, conn.begin():
            yield conn

    return connect


def capture_without_mirror(instance) -> None:
    """Keeps a step's captured output (the run's stdout/stderr in the UI) without Dagster's
    mirror of it. Dagster 1.13's LocalComputeLogManager.capture_logs points descriptors 1 and 2
    at the step's log files and, to copy them back to the terminal as they grow, starts per
    stream a `tail -F` and a Python process watching for its orphaning: four processes per run,
    ~50 ms of CPU. `imnet build` names failures itself and shows Dagster's own messages only
    with -v (which keeps the mirror), so here the same files are written, and the same marker of
    a finished capture, with no process started. Other compute log managers are left alone."""
    from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager

    manager = instance.compute_log_manager if instance is not None else None
    if type(manager) is not LocalComputeLogManager or "capture_logs" in vars(manager):
        return
    from dagster._core.execution.compute_logs import redirect_to_file
    from dagster._core.storage.compute_log_manager import CapturedLogContext, ComputeIOType
    from dagster._core.storage.local_compute_log_manager import IO_TYPE_EXTENSION
    from dagster._utils import ensure_file, touch_file

    @contextlib.contextmanager
    def capture_logs(log_key):  # LocalComputeLogManager.capture_logs less mirror_stream_to_file's tails
        outpath = manager.get_captured_local_path(log_key, IO_TYPE_EXTENSION[ComputeIOType.STDOUT])
        errpath = manager.get_captured_local_path(log_key, IO_TYPE_EXTENSION[ComputeIOType.STDERR])
        ensure_file(outpath)
        ensure_file(errpath)
        with redirect_to_file(sys.stdout, outpath), redirect_to_file(sys.stderr, errpath):
            yield CapturedLogContext(log_key)
        touch_file(manager.complete_artifact_path(log_key))

    manager.capture_logs = capture_logs


def materialize_keeping_interrupts(assets, **kwargs):
    """dagster.materialize in the main thread, where a stop signal (Ctrl-C, or SIGTERM: stop_on_signals)
    during the run always ends as KeyboardInterrupt. Dagster 1.13 runs it under capture_interrupts,
    whose handler only notes a signal, raised at its next checkpoint (a step's start, the teardown of
    the run's resources: the run then fails, named an interrupt), and on leaving forgets it: a signal
    while Dagster records the run's success was lost (the build went on to its next stage, or exited
    0 as if never told to stop). The note is kept here (Dagster's own flag, read through), and a run
    that saw one raises KeyboardInterrupt, whatever its result. In other threads Dagster captures
    nothing: a plain call."""
    import threading

    from dagster import materialize
    from dagster._utils import interrupts

    if threading.current_thread() is not threading.main_thread():
        return materialize(assets, **kwargs)

    class Noting(dict):
        seen = False

        def __setitem__(self, key, value):
            if key == "received" and value:
                Noting.seen = True
            super().__setitem__(key, value)

    flag = interrupts._received_interrupt
    interrupts._received_interrupt = Noting(flag)
    try:
        result = materialize(assets, **kwargs)
    finally:
        interrupts._received_interrupt = flag
    if Noting.seen:
        raise KeyboardInterrupt
    return result


def finish_half_made_event_log(instance) -> bool:
    """Completes an event log database whose creation was cut short; True when it did. Dagster
    1.13's ConsolidatedSqliteEventLogStorage creates its tables only when its file does not exist
    yet: a process killed while creating them (kill -9, a container stopped during a first `imnet
    build`) leaves a file with some tables, and every later run then fails on a missing table
    (sqlalchemy NoSuchTableError: asset_keys). Told by the tables and indexes Dagster makes
    (SqlEventLogStorageMetadata), not by the schema stamp: that creation never commits the stamp
    (alembic_version stays empty in a whole file). A file missing some was never finished, so it
    holds no event: it is made again in place (the same creation, which makes only what is
    missing). A file with events is of an older schema, left to Dagster's migration. Called under
    the instance lock."""
    import sqlite3
    from pathlib import Path

    from dagster._core.storage.event_log.schema import SqlEventLogStorageMetadata
    from dagster._core.storage.event_log.sqlite.consolidated_sqlite_event_log import (
        ConsolidatedSqliteEventLogStorage,
    )

    storage = instance.event_log_storage
    if type(storage) is not ConsolidatedSqliteEventLogStorage:
        return False
    tables = SqlEventLogStorageMetadata.tables.values()
    made = {t.name for t in tables} | {i.name for t in tables for i in t.indexes}
    # through a URI: the path percent-encoded (as_uri), so that a `#` or `?` in it stays in it.
    # Read-write (the instance lock is held): a kill inside one of the creation's transactions
    # leaves a hot journal, which only a writer rolls back (read-only: "attempt to write a
    # readonly database", from every later command)
    uri = f"{Path(storage.get_db_path()).absolute().as_uri()}?mode=rw"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        found = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
        if made <= found:
            return False
        if "event_logs" in found and db.execute("SELECT 1 FROM event_logs LIMIT 1").fetchone():
            return False  # it holds events: an older schema, for Dagster's own migration
    storage._init_db()  # noqa: SLF001 - Dagster's own creation, which it skips for an existing file
    return True


# The SQLite storages whose schema Dagster stamps (alembic_version), where the default dagster.yaml puts them
STAMPED_SQLITE_FILES = ("history/runs.db", "schedules/schedules.db")


def one_schema_stamp_each(home) -> list[str]:
    """Mends the run and schedule storages of DAGSTER_HOME `home` left with two schema stamps by two
    creations at once; the files it mended. Dagster 1.13 (SqliteRunStorage.from_local,
    SqliteScheduleStorage) makes a fresh file's tables, then stamps it with the head revision; a
    second process that looks between the two finds the tables without a stamp, takes the file for one
    made before stamps were kept, and stamps LAST_KNOWN_STAMPED_SQLITE_ALEMBIC_REVISION beside the
    head: every later open of the instance then fails ("alembic.util.exc.CommandError: Version table
    'alembic_version' has more than one head present"), in imnet and in Dagster's own processes. The
    tables are the head's (made by the first process's creation), so the older stamp is the one
    removed. A file with one stamp is left alone. Called under the instance lock (instance.py), when
    opening the instance failed so, and after an open that made the files (another process may have
    stamped one meanwhile)."""
    import sqlite3
    from pathlib import Path

    from dagster._core.storage.sqlite import LAST_KNOWN_STAMPED_SQLITE_ALEMBIC_REVISION as OLDER

    mended = []
    for name in STAMPED_SQLITE_FILES:
        path = Path(home) / name
        if not path.is_file():
            continue
        with contextlib.closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True)) as db:
            try:
                stamps = {v for (v,) in db.execute("SELECT version_num FROM alembic_version")}
            except sqlite3.OperationalError:  # no alembic_version yet: nothing stamped twice
                continue
            if len(stamps) > 1 and OLDER in stamps:
                with db:
                    db.execute("DELETE FROM alembic_version WHERE version_num = ?", (OLDER,))
                mended.append(str(path))
    return mended
