"""The DuckDB catalog: SPEC's tables and columns, read-only opening, statements run from sql/."""

from __future__ import annotations

import os
import shutil
import signal

import duckdb
import pytest

from imnet_assets.storage import catalog as catalog_mod
from imnet_assets.storage.catalog import Catalog, _statements, sql

# SPEC "Catalog": tables with at least these columns.
SPEC_COLUMNS = {
    "synsets": ["wnid", "label", "lemma", "gloss", "num_images", "num_kept"],
    "images": ["key", "wnid", "tar", "member", "offset", "size", "sha256", "width", "height", "format",
               "mode", "status", "reason"],
    "plan": ["key", "shard", "position"],
    "shard_samples": ["key", "shard", "position", "width", "height", "webp_bytes", "webp_sha256", "repaired"],
    "shards": ["shard", "path", "num_samples", "bytes", "sha256", "run_id", "code_version", "written_at"],
}


def columns(con, table: str) -> list[str]:
    return [r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
        [table],
    ).fetchall()]


def test_schema_has_specs_tables_and_columns(tmp_path):
    path = str(tmp_path / "sub" / "catalog.duckdb")  # the folder is created
    with Catalog(path):
        pass
    with duckdb.connect(path, read_only=True) as con:
        for table, wanted in SPEC_COLUMNS.items():
            have = columns(con, table)
            missing = [c for c in wanted if c not in have]
            assert not missing, f"{table} lacks {missing} (has {have})"


def test_schema_is_idempotent_and_keeps_data(tmp_path):
    path = str(tmp_path / "catalog.duckdb")
    with Catalog(path) as cat:
        cat.set_stage("raw_tars", "fp-1", "run-1")
    with Catalog(path) as cat:  # reopening as a writer reruns the schema
        assert cat.stage_fingerprint("raw_tars") == "fp-1"
        assert cat.stage_fingerprint("shuffled_plan") is None
        cat.set_stage("raw_tars", "fp-2", "run-2")  # replaces, no duplicate key error
        assert cat.stage_fingerprint("raw_tars") == "fp-2"


def test_read_only_open_of_a_missing_catalog_is_a_clear_error(tmp_path):
    path = tmp_path / "nowhere" / "catalog.duckdb"
    with pytest.raises(FileNotFoundError) as err:
        Catalog(str(path), read_only=True)
    assert str(path) in str(err.value)
    assert "imnet build" in str(err.value)
    assert not path.parent.exists()  # a reader creates nothing


def test_read_only_catalog_reads_but_cannot_write(tmp_path):
    path = str(tmp_path / "catalog.duckdb")
    with Catalog(path) as cat:
        cat.set_stage("synset_manifest", "abc", "r")
    with Catalog(path, read_only=True) as cat:
        assert cat.stage_fingerprint("synset_manifest") == "abc"
        with pytest.raises(duckdb.Error):
            cat.set_stage("synset_manifest", "def", "r")


@pytest.fixture
def sql_dir(tmp_path, monkeypatch):
    folder = tmp_path / "sql"
    folder.mkdir()
    # every writer asks whether the catalog predates releases (Catalog.migrate_releases), and every
    # connection sets DuckDB's memory limit and spill folder (Catalog._hold_memory)
    for name in ("catalog_before_releases", "catalog_settings", "catalog_memory", "catalog_spill"):
        shutil.copy(catalog_mod.SQL_DIR / f"{name}.sql", folder)
    monkeypatch.setattr(catalog_mod, "SQL_DIR", folder)
    sql.cache_clear()
    yield folder
    sql.cache_clear()


def test_run_executes_every_statement_of_a_file(tmp_path, sql_dir):
    (sql_dir / "schema.sql").write_text("CREATE TABLE IF NOT EXISTS t (k VARCHAR, n INTEGER);\n")
    (sql_dir / "fill.sql").write_text(
        "-- a comment line; with a semicolon at its end;\n"
        "DELETE FROM t;\n"
        "INSERT INTO t VALUES ('a', $n);   \n"  # blanks after the ';'

        "INSERT INTO t\n"
        "VALUES ('b', $n + 1),\n"
        "       ('c;d', 3);\n"
        "\n"
        "SELECT k, n FROM t WHERE n >= $low ORDER BY k;"
    )
    with Catalog(str(tmp_path / "c.duckdb")) as cat:
        rows = cat.rows("fill", {"n": 1, "low": 2, "unused": 5})
        assert rows == [("b", 2), ("c;d", 3)]  # the result is the last statement's
        assert cat.con.execute("SELECT count(*) FROM t").fetchone()[0] == 3
        cat.run("fill", {"n": 10, "low": 0})  # rerunnable: the DELETE ran first
        assert cat.con.execute("SELECT sum(n) FROM t").fetchone()[0] == 10 + 11 + 3
        assert cat.dicts("fill", {"n": 1, "low": 3}) == [{"k": "c;d", "n": 3}]
        assert cat.one("fill", {"n": 1, "low": 3}) == {"k": "c;d", "n": 3}
        assert cat.one("fill", {"n": 1, "low": 99}) == {}


def test_sql_names_a_missing_statement(sql_dir):
    with pytest.raises(FileNotFoundError, match="no_such_statement"):
        sql("no_such_statement")


def test_statements_split_at_line_end_semicolons():
    text = "-- header\nSELECT 1;\nSELECT ';';\t \n-- only a comment;\nSELECT 2\n;\n\n"
    assert _statements(text) == ["SELECT 1", "SELECT ';'", "SELECT 2"]


def test_every_project_sql_file_splits_into_statements():
    for path in sorted(catalog_mod.SQL_DIR.glob("*.sql")):
        stmts = _statements(path.read_text())
        assert stmts, path.name
        for s in stmts:
            # A leftover ';' followed by more text would mean two statements run as one.
            assert ";\n" not in s, path.name


def test_parameters_are_matched_by_whole_name(tmp_path, sql_dir):
    (sql_dir / "schema.sql").write_text("SELECT 1;\n")
    (sql_dir / "names.sql").write_text("SELECT $name AS name, $name_2 AS name_2;\n")
    with Catalog(str(tmp_path / "c.duckdb")) as cat:
        # `n` and `nam` are prefixes of `$name`, but that statement does not use them.
        assert cat.one("names", {"n": 0, "nam": 0, "name": "x", "name_2": 2}) == {"name": "x", "name_2": 2}


def test_freshness_is_read_while_another_process_reads_the_catalog(tmp_path):
    """`imnet status` and the start of `imnet build` only read the catalog: a reader elsewhere
    (`duckdb -readonly`, another status) does not make them wait for a write lock."""
    import subprocess
    import sys

    from imnet_assets.sample.sample_raw import write_sample_raw
    from imnet_assets.stages.fingerprints import stale_stages
    from tests.conftest import build_catalog_stages, local_settings

    write_sample_raw(tmp_path / "raw", synsets=2, images=6, seed=0)
    settings = local_settings(tmp_path / "raw", tmp_path, IMNET_NUM_SHARDS="2")
    build_catalog_stages(settings)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1], read_only=True); "
         "print('open', flush=True); time.sleep(120)", settings.catalog], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        # A writer's open would wait for the lock, then raise (duckdb.IOException).
        assert stale_stages(settings, log=lambda _m: None) == []
    finally:
        holder.kill()
        holder.wait()


def _filled_catalog(path) -> None:
    """A catalog with a few thousand rows in `images` (its data spans whole blocks)."""
    with Catalog(str(path)) as cat:
        cat.con.execute("""INSERT INTO images (key, wnid, tar, member, "offset", size, sha256, status)
                           SELECT 'n0_' || i, 'n0', 'n0.tar', 'n0_' || i || '.JPEG', i * 512, 100, sha256(i::VARCHAR),
                                  'kept' FROM range(200000) t(i)""")


def _damage(path, kind: str) -> None:
    import os
    import subprocess
    import sys

    if kind == "cut":
        os.truncate(path, path.stat().st_size // 2)
    elif kind == "header":
        with open(path, "r+b") as f:
            f.write(os.urandom(4096))
    elif kind == "mid-file":
        with duckdb.connect(str(path), read_only=True) as con:
            block_size = con.execute("SELECT block_size FROM pragma_database_size()").fetchone()[0]
            block = con.execute("SELECT max(block_id) FROM pragma_storage_info('images') WHERE block_id >= 0").fetchone()[0]
        with open(path, "r+b") as f:
            f.seek(3 * 4096 + block * block_size + 1024)
            f.write(os.urandom(65536))
    elif kind == "text":
        path.write_text("not a catalog\n")
    else:  # a write-ahead log left by a killed writer, then damaged
        code = (f"import duckdb, os; c = duckdb.connect({str(path)!r}); "
                "c.execute(\"SET checkpoint_threshold = '1GB'\"); "
                "c.execute('CREATE TABLE more AS SELECT range AS i FROM range(100000)'); os._exit(0)")
        subprocess.run([sys.executable, "-c", code], check=True)
        wal = path.with_name(path.name + ".wal")
        with open(wal, "r+b") as f:
            f.seek(wal.stat().st_size // 2)
            f.write(os.urandom(4096))


@pytest.mark.parametrize("kind", ["cut", "header", "mid-file", "text", "wal"])
def test_a_damaged_catalog_is_one_line_naming_the_file_and_the_recovery(tmp_path, kind):
    path = tmp_path / "catalog.duckdb"
    _filled_catalog(path)
    _damage(path, kind)
    catalog_mod._found_intact.clear()
    for opening in (lambda: catalog_mod.open_reader(str(path)), lambda: Catalog(str(path))):
        with pytest.raises(catalog_mod.CatalogDamaged) as caught:
            with opening() as cat:
                cat.check_intact()
        message = str(caught.value)
        assert "\n" not in message and f"catalog {path} is damaged" in message
        assert f"mv {path} {path}.damaged" in message and "run `imnet build`" in message
        if kind == "wal":
            assert f"mv {path}.wal {path}.damaged.wal" in message


def test_an_intact_catalog_is_read_whole_once_per_state_of_the_file(tmp_path):
    path = tmp_path / "catalog.duckdb"
    _filled_catalog(path)
    catalog_mod._found_intact.clear()
    with catalog_mod.open_reader(str(path)) as cat:
        assert cat.one("index_summary")["images"] == 200000
    assert str(path) in catalog_mod._found_intact
    _damage(path, "mid-file")  # another state of the file: read whole again
    with pytest.raises(catalog_mod.CatalogDamaged):
        catalog_mod.open_reader(str(path))


KILLED_MAKING_SCHEMA = """
import os, signal, sys
from imnet_assets.storage import catalog

made, cut_after = catalog._statements, int(sys.argv[2])

def statements(text):
    if text != catalog.sql("schema"):
        yield from made(text)
        return
    for i, stmt in enumerate(made(text)):
        if i == cut_after:  # (the statements before it have run)
            os.kill(os.getpid(), signal.SIGKILL)
        yield stmt

catalog._statements = statements
catalog.Catalog(sys.argv[1])
"""


@pytest.mark.parametrize("cut_after", [0, 3, 12])
def test_a_catalog_whose_creation_was_killed_is_made_whole(tmp_path, cut_after):
    """Found by the kill sweep (tests/integration/test_kill_sweep.py, SIGTERM right after the
    catalog's .wal appeared): a writer stopped while making the schema left a catalog with a few of
    its tables (raw_tars, synsets, images), and every later `imnet build` died reading it
    (CatalogException: Table with name stages does not exist) before any writer could make the
    rest: the out root could not be built again without deleting the catalog by hand. The schema
    is now made in one transaction, and a reader that finds a table of it missing has a writer
    make it first."""
    import subprocess
    import sys

    path = tmp_path / "catalog.duckdb"
    proc = subprocess.run([sys.executable, "-c", KILLED_MAKING_SCHEMA, str(path), str(cut_after)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert path.exists()
    with duckdb.connect(str(path), read_only=True) as con:  # the schema's transaction was not committed
        assert con.execute(sql("catalog_tables")).fetchall() == []
    with Catalog(str(path), read_only=True) as cat:  # as `imnet build` first reads it (stale_stages)
        cat.check_intact()
        assert cat.stage_fingerprint("raw_tars") is None
        assert {t for (t,) in cat.rows("catalog_tables")} >= set(catalog_mod.schema_tables())
    with Catalog(str(path)) as cat:
        cat.set_stage("raw_tars", "f" * 16, "run-1")
    with Catalog(str(path), read_only=True) as cat:
        assert cat.stage_fingerprint("raw_tars") == "f" * 16


def test_a_catalog_left_with_some_of_its_tables_is_made_whole_by_a_reader(tmp_path):
    """As versions before the one-transaction schema left it (kill -9 after three of its tables)."""
    path = str(tmp_path / "catalog.duckdb")
    with duckdb.connect(path) as con:
        for stmt in _statements(sql("schema"))[:3]:
            con.execute(stmt)
    with Catalog(path, read_only=True) as cat:
        assert cat.stage_fingerprint("shuffled_plan") is None
        assert cat.rows("catalog_tables")


ANOTHER_WRITER = """
import sys
from imnet_assets.storage.catalog import Catalog
with Catalog(sys.argv[1]) as cat:
    cat.set_stage("raw_tars", "f" * 16, "run-other")
"""


def test_a_catalog_another_writer_made_meanwhile_is_never_removed(tmp_path, monkeypatch):
    """A writer that found no catalog, then failed to open one with an error that is no lock's,
    removed the file as one its own connect had just made and left unwritten (_unmade): but another
    process may have made it in between, whole. Here another writer (a real process) makes it just
    before this one's first connect, and this one's open then fails on the catalog's log (a folder
    where the .wal goes: DuckDB cannot replay it). The other's catalog must stay."""
    import subprocess
    import sys

    path = tmp_path / "catalog.duckdb"
    wal = tmp_path / "catalog.duckdb.wal"
    real = duckdb.connect

    def connect(database, *args, **kwargs):
        if not path.exists():  # this writer found none: the other makes it now
            subprocess.run([sys.executable, "-c", ANOTHER_WRITER, str(path)], check=True, timeout=120)
            wal.mkdir()
        return real(database, *args, **kwargs)

    monkeypatch.setattr(duckdb, "connect", connect)
    raised = None
    try:
        Catalog(str(path))
    except Exception as e:  # noqa: BLE001 - checked below, after what was kept
        raised = e
    monkeypatch.undo()
    assert path.exists(), f"the other writer's catalog was removed ({raised!r})"
    assert isinstance(raised, duckdb.IOException) and "replaying WAL" in str(raised), raised
    wal.rmdir()
    with Catalog(str(path), read_only=True) as cat:
        assert cat.stage_fingerprint("raw_tars") == "f" * 16


def test_a_new_catalog_leaves_nothing_beside_it_and_sweeps_what_a_killed_maker_left(tmp_path):
    """A writer makes a new catalog under a temporary name first (_made_here): nothing of it is left
    beside the catalog, and what a writer killed meanwhile left (its process gone) is removed."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    left = tmp_path / f".catalog.duckdb.tmp-{gone.pid}-0123abcd"
    left.write_bytes(b"\0" * 12288)
    with Catalog(str(tmp_path / "catalog.duckdb")) as cat:
        assert cat.stage_fingerprint("raw_tars") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.duckdb"]


def test_a_maker_killed_after_linking_its_catalog_leaves_no_second_name_for_the_next_writer(tmp_path):
    """A maker killed (kill -9) after linking the catalog into place and before removing its
    temporary name left that name: a second hard link to the catalog, which the next writer, finding
    the catalog there, never swept (only a writer that finds none did), so it stayed for good (and
    kept the old file's space once the catalog was moved aside). The next writer removes it."""
    import subprocess
    import sys

    path = tmp_path / "catalog.duckdb"
    maker = (
        "import os, signal, sys\n"
        "def at(event, args):\n"  # the first removal of its temporary name: the link is made
        "    if event == 'os.remove' and '.tmp-' in os.fspath(args[0]):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "sys.addaudithook(at)\n"
        "from imnet_assets.storage.catalog import Catalog\n"
        f"Catalog({str(path)!r}).close()\n"
    )
    killed = subprocess.run([sys.executable, "-c", maker], cwd=tmp_path, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    left = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(left) == 1 and left[0].stat().st_ino == path.stat().st_ino  # the moment this test is about
    with Catalog(str(path)) as cat:
        cat.set_stage("raw_tars", "f" * 16, "run-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.duckdb"]
    assert os.stat(path).st_nlink == 1
    with Catalog(str(path), read_only=True) as cat:
        assert cat.stage_fingerprint("raw_tars") == "f" * 16


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_query_stopped_by_ctrl_c_or_sigterm_is_an_interrupt(tmp_path, sql_dir, signum):
    """Found by the kill sweep (SIGTERM right after the catalog's .wal appeared): DuckDB's client
    runs the signal handler while a query executes and drops the KeyboardInterrupt it raises,
    raising RuntimeError('Query interrupted') instead; `imnet build` then said "raw_tars FAILED ...
    Query interrupted", exit 1, instead of "imnet: interrupted", exit 130."""
    import threading

    from imnet_assets.orchestrate.interrupts import stop_on_signals

    (sql_dir / "schema.sql").write_text("CREATE TABLE IF NOT EXISTS t (n INTEGER);\n")
    (sql_dir / "long.sql").write_text("SELECT count(*) FROM range(100000000000) a;\n")  # minutes
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop_on_signals()
    try:
        with Catalog(str(tmp_path / "catalog.duckdb")) as cat:
            timer = threading.Timer(0.3, os.kill, (os.getpid(), signum))
            timer.start()
            try:
                with pytest.raises(KeyboardInterrupt):
                    cat.rows("long")
            finally:
                timer.cancel()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
