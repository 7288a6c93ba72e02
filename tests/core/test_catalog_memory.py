"""DuckDB's memory in the catalog: every connection holds it to a share of the memory this process
may hold (its cgroup's limit included, not the host's RAM that DuckDB's default of 80% sees), and
spills beside the catalog file beyond it, so a big settle spills instead of being OOM-killed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imnet_assets.runtime import host
from imnet_assets.stages.decontam import settle_keys_and_copies
from imnet_assets.storage.catalog import (
    MEMORY_SHARE,
    Catalog,
    memory_limit_bytes,
    setting_bytes,
    spill_folder,
)
from tests.conftest import local_settings

GIB = 1 << 30


def test_memory_limit_is_the_smallest_of_ram_and_this_process_cgroups_v2_v1_and_hybrid(tmp_path):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert host.memory_limit() <= ram
    root, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"

    def limit(lines: str, files: dict[str, str]) -> int:
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        proc.write_text(lines)
        return host.memory_limit(str(root), str(proc))

    # v2: a pod's limit on the level above this container's own cgroup ("max": none)
    assert limit("0::/kubepods/pod1/c1\n", {"kubepods/pod1/memory.max": f"{2 * GIB}\n",
                                            "kubepods/pod1/c1/memory.max": "max\n"}) == min(ram, 2 * GIB)
    # v1, the container's own cgroup seen as the root of its mount (its path names the host's)
    assert limit("4:memory:/docker/abc\n3:cpuset:/\n", {"memory/memory.limit_in_bytes": f"{GIB}\n"}) == min(ram, GIB)
    # v1 "no limit" (a page-rounded 2**63), and a hybrid host's v2 hierarchy under unified/
    assert limit("4:memory:/\n0::/x\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n",
                                         "unified/x/memory.max": f"{3 * GIB}\n"}) == min(ram, 3 * GIB)
    assert host.memory_limit(str(tmp_path / "none"), str(tmp_path / "none")) == ram  # no cgroups at all


def test_the_index_s_catalog_connection_holds_duckdb_to_its_share_and_spills_beside_the_file(tmp_path):
    s = local_settings(tmp_path / "raw", tmp_path)
    want = memory_limit_bytes()
    assert want == int(host.memory_limit() * MEMORY_SHARE) >> 20 << 20
    with Catalog(s.catalog) as cat:  # as stages/filtered_index.py opens it
        now = cat.con.execute("SELECT current_setting('memory_limit'), current_setting('temp_directory')").fetchone()
        assert abs(setting_bytes(now[0]) - want) <= want // 100, now  # (DuckDB shows it rounded: "11.7 GiB")
        assert now[1] == spill_folder(s.catalog) == f"{os.path.abspath(s.catalog)}.tmp"
        # a lower limit a stage sets (sql/audit_memory.sql: 3 GB) is kept by a connection opened meanwhile
        cat.run("catalog_memory", {"memory_limit": "100MiB"})
        with Catalog(s.catalog) as other:
            assert other.one("catalog_settings")["memory_limit"] == "100.0 MiB"
    with Catalog(s.catalog, read_only=True) as reader:
        assert abs(setting_bytes(reader.one("catalog_settings")["memory_limit"]) - want) <= want // 100


def test_an_exact_dedup_settle_under_a_small_limit_finishes_by_spilling(tmp_path):
    """The settle of bench/catalog_memory.py's synthetic rows (400k; ~150 MB of DuckDB's memory
    unbounded) held to 48 MiB: it spills to the folder beside the catalog and decides the same."""
    from bench.catalog_memory import GEN_IMAGES

    path = str(tmp_path / "catalog.duckdb")
    with Catalog(path) as cat:
        cat.con.execute(GEN_IMAGES, {"rows": 400_000})
        cat.con.execute("CHECKPOINT")
    with Catalog(path) as cat:
        cat.run("catalog_memory", {"memory_limit": "48MiB"})
        assert not os.path.exists(spill_folder(path))
        settle_keys_and_copies(cat)
        assert os.path.isdir(spill_folder(path))  # DuckDB made it as it spilled
        keys, total = cat.con.execute("SELECT count(*) FILTER (WHERE starts_with(reason, 'duplicate key')), count(*) "
                                      "FROM images WHERE status = 'excluded'").fetchone()
    # one in 100 rows is another file under the row before's key; one in 50 holds the row before's
    # bytes (a copy of a row excluded for its key stays: that row is no copy kept before it)
    assert (keys, total) == (4_000, 8_000)


def test_a_stage_never_raises_duckdb_above_the_share_this_process_may_hold(tmp_path, monkeypatch):
    """The audit (3 GB), the plan (3 GB, then 2 GB) and verify (512 MB) hold DuckDB to their own
    limits: in a pod limited to 2 GiB (share 1 GiB) each is held to the share instead, never above."""
    import re
    from pathlib import Path

    from imnet_assets.storage.catalog import held_to

    assert held_to(512 << 20) == f"{min(512 << 20, memory_limit_bytes()) >> 20}MiB"
    monkeypatch.setattr(host, "memory_limit", lambda *a, **k: 2 * GIB)  # the pod's cgroup, as read
    assert held_to(3 << 30) == held_to(2 << 30) == "1024MiB" and held_to(512 << 20) == "512MiB"
    s = local_settings(tmp_path / "raw", tmp_path)
    with Catalog(s.catalog) as cat:
        cat.run("audit_memory", {"memory_limit": held_to(3 << 30)})
        assert setting_bytes(cat.one("catalog_settings")["memory_limit"]) <= GIB
    # one place for the rule: no SQL file sets a memory limit of its own
    sql_dir = Path(__file__).resolve().parents[2] / "sql"
    literal = [p.name for p in sql_dir.glob("*.sql") if re.search(r"SET\s+memory_limit\s*=\s*'", p.read_text())]
    assert literal == []


QUERY = "SELECT count(DISTINCT h) FROM (SELECT md5(key || r::VARCHAR) AS h FROM images, range(16) t(r) ORDER BY h)"
READER = """
import os, sys
from imnet_assets.storage.catalog import open_reader, spill_folder
QUERY = @QUERY@
path = sys.argv[1]
assert not os.access(os.path.dirname(path), os.W_OK), "the catalog's folder is writable"
with open_reader(path, intact=False) as cat:
    cat.run("catalog_memory", {"memory_limit": "64MiB"})
    cat.con.execute("SET threads = 2")
    n, = cat.con.execute(QUERY).fetchone()
    spill = spill_folder(path, read_only=True)
    print(n, cat.one("catalog_settings")["temp_directory"], spill, os.path.isdir(spill))
""".replace("@QUERY@", repr(QUERY))


def test_a_reader_of_a_catalog_on_a_read_only_filesystem_spills_in_the_temporary_folder(tmp_path):
    """A catalog given read-only (a read-only mount, or a folder this user cannot write): a reader's
    query held past its memory limit spills under the system's temporary folder. Beside the file
    (DuckDB's default) it failed: "Failed to create directory ... Read-only file system"."""
    import subprocess
    import sys

    from bench.catalog_memory import GEN_IMAGES

    folder = tmp_path / "catalog"
    path = str(folder / "catalog.duckdb")
    with Catalog(path) as cat:
        cat.con.execute(GEN_IMAGES, {"rows": 100_000})
        cat.con.execute("CHECKPOINT")
        want, = cat.con.execute(QUERY).fetchone()
    root = str(Path(__file__).resolve().parents[2])
    command = [sys.executable, "-c", READER, path]
    if os.geteuid() != 0:
        folder.chmod(0o555)
    else:  # root writes any folder: a read-only bind mount of it, in a mount namespace of its own
        script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
        command = ["unshare", "-m", "sh", "-c", script, "sh", str(folder), *command]
        probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"no read-only folder to be had here (root, and unshare -m: {probe.stderr.decode()[:80]})")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": root})
    finally:
        folder.chmod(0o755)
    assert done.returncode == 0, done.stderr[-2000:]
    n, used, spill, spilled = done.stdout.split()
    assert int(n) == want and used == spill and not spill.startswith(str(folder)) and spilled == "True"
    assert spill_folder(path, read_only=True) == spill_folder(path)  # writable again: beside the file


SPILLER = """
import os, signal, sys
from imnet_assets.storage.catalog import open_reader
QUERY = @QUERY@
with open_reader(sys.argv[1], intact=False) as cat:
    cat.run("catalog_memory", {"memory_limit": "64MiB"})
    cat.con.execute("SET threads = 2")
    n, = cat.con.execute(QUERY).fetchone()
    print(n, cat.one("catalog_settings")["temp_directory"], flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 with the spill folder in use: it stays behind
""".replace("@QUERY@", repr(QUERY))


def test_two_users_readers_of_one_read_only_catalog_each_spill_in_a_folder_of_their_own(tmp_path):
    """Two users on one host read the same catalog, given read-only (a folder neither may write):
    the first's reader spills under the system's temporary folder and is killed (kill -9), leaving
    its spill folder (its mode 0755: DuckDB's own). The second user's query spilled into the same
    folder, named by the catalog alone, and failed ("Permission denied") for as long as it stayed."""
    import shutil
    import subprocess
    import sys
    import tempfile

    from bench.catalog_memory import GEN_IMAGES

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs two users: root, to run each reader as another user (setpriv)")
    shared = Path(tempfile.mkdtemp(prefix="imnet-two-users-"))  # tmp_path's parents are root's alone (0700)
    try:
        shared.chmod(0o755)
        systmp = shared / "tmp"
        systmp.mkdir()
        systmp.chmod(0o1777)  # the system's temporary folder, as /tmp is
        folder = shared / "catalog"
        folder.mkdir()  # root's, 0755: neither user may write beside the file
        path = str(folder / "catalog.duckdb")
        with Catalog(path) as cat:
            cat.con.execute(GEN_IMAGES, {"rows": 100_000})
            cat.con.execute("CHECKPOINT")
            want, = cat.con.execute(QUERY).fetchone()
        os.chmod(path, 0o644)
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": root, "TMPDIR": str(systmp), "PYTHONDONTWRITEBYTECODE": "1"}

        def as_user(uid: int, then: str) -> subprocess.CompletedProcess:
            # another user, who may still read (not write) root's folders: the venv and repository are there
            command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                       "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
                       sys.executable, "-c", SPILLER, path, then]
            return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=shared, env=env)

        first = as_user(65533, "kill")
        assert first.returncode == -9 and int(first.stdout.split()[0]) == want, first.stderr[-2000:]
        left = Path(first.stdout.split()[1])
        assert left.parent == systmp and left.stat().st_uid == 65533 and any(left.iterdir())
        second = as_user(65534, "close")
        assert second.returncode == 0, second.stderr[-2000:]
        n, used = second.stdout.split()
        assert int(n) == want and Path(used).parent == systmp and used != str(left)
        assert any(left.iterdir())  # the first user's leftovers are theirs (its next spilling reader sweeps them)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
