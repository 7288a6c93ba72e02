"""The Dagster 1.13 behaviours that imnet_assets/orchestrate/dagster_quirks.py and interrupts.py
work around, shown on a real instance with a dagster.yaml: if a Dagster upgrade changes one,
its test here fails, and the workaround is to be looked at again (kept, changed or dropped)."""

from __future__ import annotations

import contextlib
import logging.config
import os
import signal
import sqlite3
import sys

import pytest

pytest.importorskip("dagster")

from dagster import AssetKey, AssetMaterialization, DagsterInstance, asset, materialize  # noqa: E402

from imnet_assets.orchestrate.dagster_quirks import (  # noqa: E402
    capture_without_mirror,
    console_kept_through_output_capture,
    finish_half_made_event_log,
    materialize_keeping_interrupts,
    one_engine_per_sqlite_storage,
    skip_per_run_logging_config,
)
from imnet_assets.orchestrate.interrupts import stop_on_signals  # noqa: E402
from tests.conftest import REPO, environ  # noqa: E402

SEEN: dict[str, object] = {}


@asset
def fd_witness() -> None:
    """Records where file descriptors 1 and 2 point while the step runs."""
    SEEN["fds"] = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in (1, 2)}


@asset
def child_witness() -> None:
    """Records the mirroring processes (`tail`, Dagster's watch_orphans) this process has started
    while the step runs (other tests' forkservers may be children too), and prints a line."""
    me = str(os.getpid())
    children = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = f.read().rsplit(")", 1)[1].split()[1]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = [os.path.basename(a.decode()) for a in f.read().split(b"\0")]
        except (OSError, IndexError):
            continue
        if ppid == me and ("tail" in cmd[:1] or "watch_orphans.py" in cmd):
            children.append(cmd[0])
    SEEN["children"] = children
    print("a line for the step's captured output", flush=True)


CONSOLIDATED = ("telemetry:\n  enabled: false\nevent_log_storage:\n  module: dagster.core.storage.event_log\n"
                "  class: ConsolidatedSqliteEventLogStorage\n  config:\n    base_dir: {home}\n")


def _instance(home, yaml: str) -> DagsterInstance:
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml)
    return DagsterInstance.from_config(str(home))


@pytest.fixture
def instance(tmp_path):
    with _instance(tmp_path / "home", "telemetry:\n  enabled: false\n") as inst:
        yield inst


def _run(instance) -> None:
    result = materialize([fd_witness], instance=instance, raise_on_error=True)
    assert result.success


def _counting_dict_config(monkeypatch) -> list:
    calls: list = []
    real = logging.config.dictConfig

    def spy(config):  # calls through: the real reconfiguration happens, and is counted
        calls.append(config)
        return real(config)

    monkeypatch.setattr(logging.config, "dictConfig", spy)
    return calls


def test_a_run_of_an_instance_with_a_dagster_yaml_reconfigures_logging_unless_skipped(instance, monkeypatch):
    """The reason for skip_per_run_logging_config: every run calls logging.config.dictConfig
    (through the instance's get_yaml_python_handlers) although the dagster.yaml configures no
    handlers; with the workaround applied, a run no longer does."""
    calls = _counting_dict_config(monkeypatch)
    _run(instance)
    assert calls, "a run no longer calls logging.config.dictConfig: the workaround may be dropped"
    # ... configuring no handler at all (so skipping the call changes nothing else)
    assert all(not list(c.get("handlers", {})) for c in calls), calls
    assert instance.get_yaml_python_handlers() == []
    calls.clear()
    assert skip_per_run_logging_config(instance) is True
    _run(instance)
    assert calls == []  # the call skipped: runs in several threads no longer close each other's handlers


def test_an_instance_with_python_log_handlers_keeps_them_and_runs_go_one_at_a_time(tmp_path, monkeypatch):
    yaml = ("telemetry:\n  enabled: false\npython_logs:\n  dagster_handler_config:\n    handlers:\n"
            "      mine:\n        class: logging.NullHandler\n")
    with _instance(tmp_path / "home", yaml) as inst:
        calls = _counting_dict_config(monkeypatch)
        assert skip_per_run_logging_config(inst) is False
        _run(inst)
        assert calls and all("mine" in c["handlers"] for c in calls)  # the user's handlers, as Dagster does


def test_a_steps_output_capture_repoints_file_descriptors_1_and_2_process_wide(instance, monkeypatch):
    """The reason for console_kept_through_output_capture: while a step runs, Dagster points the
    process's descriptors 1 and 2 (not only sys.stdout) at the step's log file under the
    instance, and points them back after it."""
    # as in `imnet`: sys.stdout and sys.stderr are the streams of descriptors 1 and 2 (pytest's
    # capture replaces them with streams of other descriptors)
    monkeypatch.setattr(sys, "stdout", sys.__stdout__)
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    before = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in (1, 2)}
    _run(instance)
    inside = SEEN["fds"]
    for fd in (1, 2):
        assert inside[fd] != before[fd], (fd, inside, before)
        assert inside[fd].startswith(str(instance.root_directory)), (fd, inside[fd])
    assert {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in (1, 2)} == before


def test_console_kept_writes_to_the_terminal_and_puts_descriptors_1_and_2_back(tmp_path):
    """A capture left pointing 1 and 2 at a log file (the overlapping runs' case): the build's
    lines still reach what 1 was before, and 1 and 2 point there again afterwards."""

    class Out:
        out = sys.stdout

    terminal = tmp_path / "terminal"
    log = tmp_path / "step.log"
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with open(terminal, "w") as term:
            for fd in (1, 2):
                os.dup2(term.fileno(), fd)
        before = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in (1, 2)}
        build = Out()
        with console_kept_through_output_capture(build):
            with open(log, "w") as step_log:  # a step's capture, never pointed back
                for fd in (1, 2):
                    os.dup2(step_log.fileno(), fd)
            print("[1/2] shard 0000: 40 samples", file=build.out, flush=True)
        after = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in (1, 2)}
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
    assert build.out is sys.stdout
    assert after == before
    assert terminal.read_text() == "[1/2] shard 0000: 40 samples\n"
    assert log.read_text() == ""


def test_a_run_in_the_main_thread_points_sigterm_at_sigints_handler(instance):
    """The reason for stop_on_signals: when a run in the main thread ends, Dagster gives SIGTERM
    whatever handles SIGINT, so a process started with SIGINT ignored would ignore SIGTERM too;
    with stop_on_signals first, both raise KeyboardInterrupt."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _run(instance)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        stop_on_signals()
        _run(instance)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("moment", ["STEP_SUCCESS", "RUN_SUCCESS"])
def test_a_stop_signal_while_dagster_records_a_runs_end_is_kept(instance, monkeypatch, moment):
    """The reason for materialize_keeping_interrupts: Dagster notes a SIGTERM that comes while it
    records a step's success and raises it at the teardown of the run's resources (the run fails),
    but one that comes while it records the run's success is forgotten (the run succeeds, nothing
    raised, nothing said); kept, both are KeyboardInterrupt."""
    from dagster import DagsterEventType

    real = instance.handle_new_event

    def handle(event, *args, **kwargs):  # the real write, then the signal, as if it came during it
        real(event, *args, **kwargs)
        if event.dagster_event is not None and event.dagster_event.event_type == DagsterEventType[moment]:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(instance, "handle_new_event", handle)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop_on_signals()
        assert materialize([fd_witness], instance=instance, raise_on_error=False).success is (moment == "RUN_SUCCESS")
        stop_on_signals()
        with pytest.raises(KeyboardInterrupt):
            materialize_keeping_interrupts([fd_witness], instance=instance, raise_on_error=False)
        from dagster._utils import interrupts

        assert type(interrupts._received_interrupt) is dict and not interrupts._received_interrupt["received"]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _engines(instance) -> list:
    """The engine each SQLite storage's connections come from, for two connections each."""
    engines = []
    for connect in (instance.run_storage.connect, instance.schedule_storage.connect,
                    instance.event_log_storage._connect):
        for _ in range(2):
            with connect() as conn:
                engines.append(conn.engine)
    return engines


def test_sqlite_storages_make_an_engine_per_connection_unless_given_one(tmp_path):
    """The reason for one_engine_per_sqlite_storage: each connection of the run storage, the
    schedule storage and the consolidated event log comes from a new engine (so no compiled
    statement is reused); once applied, each storage keeps one, and runs are recorded as before."""
    home = tmp_path / "home"
    with _instance(home, CONSOLIDATED.format(home=home)) as inst:
        before = _engines(inst)
        assert all(a is not b for a, b in zip(before[::2], before[1::2])), \
            "a storage reuses its engine: the workaround may be dropped"
        one_engine_per_sqlite_storage(inst)
        after = _engines(inst)
        assert all(a is b for a, b in zip(after[::2], after[1::2]))
        assert len({id(e) for e in after}) == 3
        one_engine_per_sqlite_storage(inst)  # once only
        assert _engines(inst)[0] is after[0]
        _run(inst)
        _run(inst)
        runs = inst.get_runs()
        assert len(runs) == 2 and all(r.is_success for r in runs)
        assert all(inst.all_logs(r.run_id) for r in runs)
        # the connections are kept for the next use (none opened per use), and closed on dispose
        with inst.run_storage.connect() as conn:
            first = conn.connection.dbapi_connection
        with inst.run_storage.connect() as conn:
            assert conn.connection.dbapi_connection is first
        pools = [e.pool for e in after[::2]]  # the run storage's, the schedule storage's, the event log's
        assert all(p.checkedin() >= 1 for p in pools)
    # the instance's dispose closed the run storage's and the event log's (Dagster disposes no
    # schedule storage: its connections close when it is collected)
    assert [pools[0].checkedin(), pools[2].checkedin()] == [0, 0]


def test_a_steps_output_capture_starts_tail_processes_unless_without_mirror(tmp_path, monkeypatch):
    """The reason for capture_without_mirror: while a step runs, Dagster's local compute log
    manager keeps `tail -F` processes (and Python watchers of them) copying its captured output
    to the terminal; without the mirror, none is started, and the step's output is captured in the
    same files (what the UI shows) with the same marker of a finished capture."""
    monkeypatch.setattr(sys, "stdout", sys.__stdout__)  # as in `imnet` (see above)
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    with _instance(tmp_path / "home", "telemetry:\n  enabled: false\n") as inst:
        manager = inst.compute_log_manager

        def run_and_captured() -> tuple[list, str, bool]:
            result = materialize([child_witness], instance=inst, raise_on_error=True)
            logs = [ev for ev in inst.all_logs(result.run_id)
                    if ev.dagster_event and ev.dagster_event.event_type_value == "LOGS_CAPTURED"]
            key = [*manager.build_log_key_for_run(result.run_id, logs[0].dagster_event.logs_captured_data.file_key)]
            out = manager.get_captured_local_path(key, "out")
            return SEEN["children"], open(out).read(), manager.is_capture_complete(key)

        children, out, complete = run_and_captured()
        assert "tail" in children, f"no tail process while a step runs ({children}): the workaround may be dropped"
        assert "a line for the step's captured output" in out and complete
        capture_without_mirror(inst)
        children, out, complete = run_and_captured()
        assert children == []
        assert "a line for the step's captured output" in out and complete


@contextlib.contextmanager
def capture_stderr():
    import io

    saved, sys.stderr = sys.stderr, io.StringIO()
    try:
        yield sys.stderr
    finally:
        sys.stderr = saved


KILLED_WHILE_MAKING = """
import os, signal, sys
from dagster._core.storage.event_log.sqlite import consolidated_sqlite_event_log as made
from imnet_assets.orchestrate.instance import dagster_instance

def killed(*_a, **_k):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[1] == "before-tables":
    made.SqlEventLogStorageMetadata.create_all = killed
elif sys.argv[1] == "some-tables":
    create_all = made.SqlEventLogStorageMetadata.create_all
    def some(engine, *a, **k):
        create_all(engine, tables=[made.SqlEventLogStorageMetadata.tables["event_logs"]])
        killed()
    made.SqlEventLogStorageMetadata.create_all = some
elif sys.argv[1] == "mid-transaction":  # pages of an uncommitted transaction already in the file
    import sqlite3
    def hot(engine, *a, **k):
        db = sqlite3.connect(engine.url.database, isolation_level=None)
        db.execute("PRAGMA cache_size = 1")
        db.execute("BEGIN")
        db.execute("CREATE TABLE event_logs (id INTEGER PRIMARY KEY, event TEXT)")
        db.executemany("INSERT INTO event_logs (event) VALUES (?)", [("x" * 100,)] * 5000)
        killed()
    made.SqlEventLogStorageMetadata.create_all = hot
else:
    made.stamp_alembic_rev = killed
dagster_instance()
"""


@pytest.mark.parametrize("moment", ["before-tables", "some-tables", "before-stamp", "mid-transaction"])
def test_an_instance_whose_first_creation_was_killed_is_made_whole(tmp_path, moment):
    """A first `imnet build` killed (kill -9) while Dagster created the event log's tables left a
    file Dagster never finishes (it creates them only when there is no file): every later run
    failed on a missing table (NoSuchTableError: asset_keys). The next instance made here finishes
    it, and an asset's event is recorded and read back. mid-transaction: found by the hand-run
    kill sweep (kill -9 at 3.17 s of a first build): a kill inside the creation's transaction left
    a hot journal, and the check's read-only look failed on it ("attempt to write a readonly
    database"), a Traceback from every later `imnet build`."""
    import subprocess

    from dagster import AssetKey, AssetMaterialization

    from imnet_assets.orchestrate.instance import dagster_instance, prepare_dagster_home

    home = tmp_path / "home"
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    with environ(DAGSTER_HOME=str(home)), open(os.devnull, "w") as quiet:
        prepare_dagster_home(out=quiet)
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_MAKING, moment], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (home / "event_log.db").exists()
    if moment == "mid-transaction":  # a hot journal: a read-only look cannot read the file
        assert (home / "event_log.db-journal").exists()
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            sqlite3.connect(f"file:{home / 'event_log.db'}?mode=ro", uri=True).execute("SELECT * FROM sqlite_master")
    for attempt in range(2):  # the second finds a whole instance: it is left as it is
        with environ(DAGSTER_HOME=str(home)), capture_stderr() as said:
            instance = dagster_instance()
        try:
            made_again = "was left half made" in said.getvalue()
            assert made_again == (attempt == 0 and moment != "before-stamp"), said.getvalue()
            key = AssetKey(f"made_whole_{attempt}")
            instance.report_runless_asset_event(AssetMaterialization(key))
            event = instance.get_latest_materialization_event(key)
            assert event is not None and event.asset_materialization.asset_key == key
        finally:
            instance.dispose()


def made_then_opened_again(home):
    """The instance at DAGSTER_HOME `home`, made by `dagster_instance`, then opened again: each
    yielded in turn, disposed after."""
    from imnet_assets.orchestrate.instance import dagster_instance, prepare_dagster_home

    with environ(DAGSTER_HOME=str(home)):
        with open(os.devnull, "w") as quiet:
            prepare_dagster_home(out=quiet)
        for _ in range(2):
            instance = dagster_instance()
            try:
                yield instance
            finally:
                instance.dispose()


@pytest.mark.parametrize("home_name", ["#prod", "ops #2"], ids=["folder-named-from-a-hash", "hash-inside"])
def test_an_instance_under_a_path_with_uri_characters_is_opened_and_not_made_again(tmp_path, home_name):
    """The event log's stamp is read through an SQLite URI: a DAGSTER_HOME with a `#` (which
    Dagster itself takes) was cut there, so the look opened another file: the folder above (`.../#prod`: every command
    failed, "unable to open database file"), or a stray file it created beside the home (an empty
    database, so every command said the event log was half made and made it again)."""
    for instance in made_then_opened_again(tmp_path / home_name):
        assert not finish_half_made_event_log(instance)
        assert instance.get_runs(limit=1) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [home_name]  # nothing made beside the home


def test_a_whole_instance_opened_again_is_not_made_again_nor_said_to_be_half_made(tmp_path, capfd):
    """Dagster 1.13's creation of the event log never keeps its schema stamp (its alembic_version
    row is written in a transaction never committed): a whole event log has no stamp. Judged by the
    stamp, every open of a whole instance said it was left half made and ran Dagster's creation
    (and its reindexing) again; it is judged by the tables and indexes Dagster makes."""
    for instance in made_then_opened_again(tmp_path / "home"):
        instance.report_runless_asset_event(AssetMaterialization(AssetKey("whole")))
        assert not finish_half_made_event_log(instance)
    assert "half made" not in capfd.readouterr().err



STAMPED = ("history/runs.db", "schedules/schedules.db")


def test_a_storage_stamped_twice_by_two_creations_at_once_is_mended_and_opens(tmp_path):
    """`dagster dev` (its webserver, its daemon) and `imnet build` started at once on a fresh
    DAGSTER_HOME: Dagster 1.13 makes a SQLite file's tables, then stamps its schema, not atomically,
    and its processes do not take imnet's instance lock. Raced by hand (a real Dagster process and
    `dagster_instance` started within 60 ms of each other, 20 times): imnet failed at start in about
    1 of 5 ("(sqlite3.OperationalError) table alembic_version already exists"; now opened again once
    the other's creation is done), and once history/runs.db was left with two stamps, the head's and
    LAST_KNOWN_STAMPED_SQLITE_ALEMBIC_REVISION (the second process found the tables unstamped and took
    the file for one made before stamps were kept): every later open failed, imnet's and Dagster's
    ("Version table 'alembic_version' has more than one head present"). That file, as the race left
    it, is made here: a real creation, then the second process's stamp."""
    import subprocess

    from alembic.util.exc import CommandError
    from dagster._core.storage.sqlite import LAST_KNOWN_STAMPED_SQLITE_ALEMBIC_REVISION as OLDER

    from imnet_assets.orchestrate.instance import dagster_instance

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_bytes((REPO / "dagster.yaml").read_bytes())
    made = ("from dagster import DagsterInstance; i = DagsterInstance.get(); "
            "i.get_runs(limit=1), i.event_log_storage, i.schedule_storage")
    subprocess.run([sys.executable, "-c", made], env={**os.environ, "DAGSTER_HOME": str(home)}, check=True,
                   timeout=300)
    heads = {}
    for name in STAMPED:
        with contextlib.closing(sqlite3.connect(home / name)) as db, db:
            [(heads[name],)] = db.execute("SELECT version_num FROM alembic_version").fetchall()
            db.execute("INSERT INTO alembic_version VALUES (?)", (OLDER,))
    with environ(DAGSTER_HOME=str(home)):
        with pytest.raises(CommandError, match="more than one head"):
            DagsterInstance.get()  # Dagster's own open fails on such a file (the quirk)
        with capture_stderr() as said:
            instance = dagster_instance()
        instance.dispose()
        for name in STAMPED:
            assert f"{home / name} was stamped with two schema versions" in said.getvalue(), said.getvalue()
            with contextlib.closing(sqlite3.connect(home / name)) as db:
                assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(heads[name],)]
        instance = DagsterInstance.get()  # and Dagster's own processes open it again
        try:
            assert instance.get_runs(limit=1) == [] and not finish_half_made_event_log(instance)
        finally:
            instance.dispose()
