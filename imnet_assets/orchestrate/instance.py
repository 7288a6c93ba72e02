"""The Dagster instance `imnet` records into: DAGSTER_HOME, made and given the project's
dagster.yaml, its storages created by one process at a time."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

INSTANCE_LOCK = ".imnet-instance.lock"  # in DAGSTER_HOME: one process at a time creates the instance's storage
# Opening the instance again after its storage's creation collided with another process's (below):
# waits of 0.25, 0.5, 1, 2, 4 s, then the error stands.
CREATION_TRIES = 6


def dagster_instance(prepare_out=None):
    """DagsterInstance.get() for DAGSTER_HOME, one process of this machine at a time: on a fresh
    home, the first look creates the SQLite storages and stamps their schema (alembic_version),
    and two processes doing that at once collide (sqlite3.IntegrityError). A file lock in the home
    holds every other `imnet` until the first has created them; later looks wait only for each
    other's few milliseconds. `prepare_out`: the home is made and given its dagster.yaml first
    (prepare_dagster_home, saying so there), inside the lock too: a second process must not read
    a dagster.yaml the first is still copying. Dagster's own processes (`dagster dev`, the webserver,
    the daemon) create the same storages without that lock: a creation that collided with theirs
    (`_collided`) is tried again once theirs is done, not a failed command."""
    from dagster import DagsterInstance
    from filelock import FileLock

    from imnet_assets.orchestrate.dagster_quirks import STAMPED_SQLITE_FILES
    from imnet_assets.settings import dagster_home

    if prepare_out is not None:
        home = dagster_home()
        with contextlib.suppress(OSError):  # prepare_dagster_home says what it cannot do
            home.mkdir(parents=True, exist_ok=True)
    else:
        home = Path(os.environ["DAGSTER_HOME"])
    lock = FileLock(os.path.join(home, INSTANCE_LOCK))
    try:
        lock.acquire()
    except OSError:  # a home this user may not write (a read-only `imnet status`): nothing to create there
        if prepare_out is not None:
            prepare_dagster_home(prepare_out)
        return DagsterInstance.get()
    try:
        if prepare_out is not None:
            prepare_dagster_home(prepare_out)
        fresh = not all((home / name).exists() for name in STAMPED_SQLITE_FILES)
        for attempt in range(1, CREATION_TRIES + 1):
            try:
                instance = _made(home)
                if fresh:  # made just now, maybe beside another process's creation (see _collided)
                    _one_stamp_each(home)
                return instance
            except Exception as e:  # noqa: BLE001 - told apart by _collided
                if attempt == CREATION_TRIES or not _collided(e):
                    raise
                if "more than one head" in str(e):
                    _one_stamp_each(home)
                print(f"imnet: another process was creating the Dagster instance's storage at {home} at the same "
                      f"time (dagster dev, the webserver or the daemon, which do not take imnet's lock: "
                      f"{str(e).splitlines()[0][:200]}); opening it again", file=sys.stderr, flush=True)
                time.sleep(0.25 * 2 ** (attempt - 1))
    finally:
        lock.release()


def _one_stamp_each(home: Path) -> None:
    from imnet_assets.orchestrate.dagster_quirks import one_schema_stamp_each

    for path in one_schema_stamp_each(home):
        print(f"imnet: {path} was stamped with two schema versions by two processes creating it at once: the "
              "older stamp removed", file=sys.stderr, flush=True)


def _made(home: Path):
    """The instance of DAGSTER_HOME `home`, every storage of it made and migrated (some are made on
    first use)."""
    from dagster import DagsterInstance

    from imnet_assets.orchestrate.dagster_quirks import finish_half_made_event_log

    instance = DagsterInstance.get()
    try:
        if finish_half_made_event_log(instance):
            print(f"imnet: the Dagster instance's event log at {home} was left half made (a process killed "
                  "while creating it): made again", file=sys.stderr, flush=True)
        instance.get_runs(limit=1)
        instance.event_log_storage  # noqa: B018
        instance.schedule_storage  # noqa: B018
    except BaseException:
        instance.dispose()
        raise
    return instance


def _collided(error: BaseException) -> bool:
    """Whether creating the instance's SQLite storage failed because another process created the same
    tables or stamped the same schema version meanwhile: Dagster 1.13 makes each file's tables (and
    stamps alembic_version) unless it finds them, not atomically, and `dagster dev`, its webserver
    and its daemon each do that on a fresh DAGSTER_HOME without imnet's lock. Once the other is done,
    the storage is whole, and opening it again finds it so; a file the two stamped with two schema
    versions is mended first (dagster_quirks.one_schema_stamp_each)."""
    import sqlite3

    from alembic.util.exc import CommandError
    from sqlalchemy.exc import IntegrityError, NoSuchTableError, OperationalError

    text = str(error)
    return (isinstance(error, NoSuchTableError)
            or (isinstance(error, CommandError) and "more than one head" in text)
            or (isinstance(error, OperationalError | sqlite3.OperationalError)
                and ("already exists" in text or "no such table" in text or "database is locked" in text))
            or (isinstance(error, IntegrityError | sqlite3.IntegrityError) and "alembic_version" in text))



def dagster_yaml_source() -> Path | None:
    """The project's dagster.yaml: the project root's, else the one beside this package's source."""
    from imnet_assets.settings import project_root

    for folder in (project_root(), Path(__file__).resolve().parents[2]):
        if (folder / "dagster.yaml").is_file():
            return folder / "dagster.yaml"
    return None


def prepare_dagster_home(out=sys.stdout) -> Path:
    """DAGSTER_HOME for this process (set when only `.env` or the default named it), the folder
    made, and the project's dagster.yaml copied into it when it has none (its run queue, limits
    and `telemetry: false`)."""
    import shutil

    from imnet_assets.settings import dagster_home

    home = dagster_home()
    os.environ["DAGSTER_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if not target.exists():
        source = dagster_yaml_source()
        try:
            if source is not None:
                shutil.copyfile(source, target)
            else:
                target.write_text("telemetry:\n  enabled: false\n")
        except OSError as e:  # a read-only home: Dagster's defaults, as before
            print(f"imnet: no dagster.yaml in DAGSTER_HOME {home}, and none could be put there ({e})",
                  file=out, flush=True)
        else:
            print(f"imnet: Dagster instance at {home} (DAGSTER_HOME), with {source or 'a minimal dagster.yaml'}",
                  file=out, flush=True)
    return home


def unwritable(error: BaseException) -> str | None:
    """One line for `error` when it says the Dagster instance's SQLite storage (event_log.db, runs.db,
    ... in DAGSTER_HOME) could not be written: a full disk ("database or disk is full"), a disk I/O
    error; None for any other error. A fault of the machinery, never the build's: nothing is recorded
    done that was not (SPEC "Failure behaviour"), and the next build goes on from where this one was."""
    import sqlite3

    cause = getattr(error, "orig", None)  # sqlalchemy's wrapper of the driver's error
    if not isinstance(cause, sqlite3.OperationalError) or not isinstance(error, Exception):
        return None
    home = os.environ.get("DAGSTER_HOME", "DAGSTER_HOME")
    return (f"the Dagster instance at {home} could not be written ({cause}): free space there and run "
            "`imnet build` again; it goes on from where this build stopped")

