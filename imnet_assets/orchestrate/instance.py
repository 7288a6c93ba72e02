"""The Dagster instance `imnet` records into: DAGSTER_HOME, made and given the project's
dagster.yaml, its storages created by one process at a time."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

INSTANCE_LOCK = ".imnet-instance.lock"  # in DAGSTER_HOME: one process at a time creates the instance's storage


def dagster_instance(prepare_out=None):
    """DagsterInstance.get() for DAGSTER_HOME, one process of this machine at a time: on a fresh
    home, the first look creates the SQLite storages and stamps their schema (alembic_version),
    and two processes doing that at once collide (sqlite3.IntegrityError). A file lock in the home
    holds every other `imnet` until the first has created them; later looks wait only for each
    other's few milliseconds. `prepare_out`: the home is made and given its dagster.yaml first
    (prepare_dagster_home, saying so there), inside the lock too: a second process must not read
    a dagster.yaml the first is still copying."""
    from dagster import DagsterInstance
    from filelock import FileLock

    from imnet_assets.orchestrate.dagster_quirks import finish_half_made_event_log
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
        instance = DagsterInstance.get()
        if finish_half_made_event_log(instance):
            print(f"imnet: the Dagster instance's event log at {home} was left half made (a process killed "
                  "while creating it): made again", file=sys.stderr, flush=True)
        # every storage made and migrated now, inside the lock (some are made on first use)
        instance.get_runs(limit=1)
        instance.event_log_storage  # noqa: B018
        instance.schedule_storage  # noqa: B018
    finally:
        lock.release()
    return instance



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

