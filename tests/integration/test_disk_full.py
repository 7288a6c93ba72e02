"""A full disk at each moment of a build: it fails naming what it could not write, records nothing
as an exclusion, a repair or a damaged tar, and the rerun after space is freed is whole.

Each of the build's folders is put on a small tmpfs of its own, one at a time: the out root (shards'
temporary files, plan slices, manifests, leases, `_info.json`, the card), the catalog's folder
(the DuckDB file and its .wal), DAGSTER_HOME (event_log.db, runs) and TMPDIR (the stages' CSV
files for DuckDB). A fresh build of a small sample release (3 synsets x 12 images) is started
and, right after an *event* of its life (the kill sweep's: tests/integration/test_kill_sweep.py),
a filler file takes every byte left on that tmpfs. Then:

- the build ends (exit 1, or 0 when what was left to write fitted), saying "No space left on
  device" or "disk is full" and naming the folder, in lines, never a Traceback; no process of it
  is left;
- every file at a final shard path is a whole shard; no temporary file, no lease is left;
- the catalog, where it can be read, holds no exclusion, repair or tar damage that an undisturbed
  build lacks (images' status and reason, shard_exclusions, tar_scans.damaged_bytes);
- the filler removed, `imnet build` exits 0 with the audit ok, shards and `_info.json`
  byte-identical to an undisturbed build's, the same catalog row counts, and no run in flight.

Before the sweep, each rule it relies on is shown on its own, on a full tmpfs: an atomic file
and a lease leave no temporary file and name their path; a catalog that could not be created is
not left behind as a "damaged" file; the stages' CSV file in a full TMPDIR is named.

SPEC "Failure behaviour": a full disk is retried or fails its run naming what it could not write,
and is never recorded as an exclusion, a repair or a damaged tar.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from tests.conftest import REPO, build_env, imnet
from tests.integration.test_concurrent_builds import shard_runs
from tests.integration.test_crash_safety import (
    TMP_SHARD,
    assert_final_shards_complete,
    assert_identical,
    cmdlines,
    group_members,
    kill_group,
    start_build,
    temp_files,
    wait_for,
    wait_gone,
)
from tests.integration.test_kill_sweep import catalog_counts, small_release  # noqa: F401 - a fixture

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mounts a tmpfs, reads /proc")

TMPFS_SIZE = "64m"  # much more than a build of the small release writes: it fills only when told to


def _mount(point: Path) -> None:
    point.mkdir(parents=True, exist_ok=True)
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    done = subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root, or passwordless sudo, and a kernel that allows "
                    f"it): {done.stderr.strip() or done.returncode}")


def _umount(point: Path) -> None:
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    subprocess.run([*sudo, "umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    """Mounts a small tmpfs at a folder under tmp_path (mount(name) -> its path); every one is
    unmounted at teardown, whatever the test did."""
    points: list[Path] = []

    def mount(name: str) -> Path:
        point = tmp_path / name
        _mount(point)
        points.append(point)
        return point

    try:
        yield mount
    finally:
        for point in reversed(points):
            _umount(point)


def fill(point: Path) -> Path:
    """A file that takes every byte left on the file system of `point`; returns it (remove it to
    free the space)."""
    filler = point / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 4096, 1):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
    finally:
        os.close(fd)
    return filler


# ----------------------------------------------------------------------------- each rule on its own


def test_an_atomic_file_on_a_full_disk_names_its_path_and_leaves_no_temporary(tmpfs):
    from imnet_assets.storage.atomic import write_atomic

    point = tmpfs("out")
    fill(point)
    target = point / "_plan" / "0000.csv"
    with pytest.raises(OSError) as raised:
        write_atomic(str(target), b"x" * 1000)  # (within the file's buffer: its close() raises too)
    assert sorted(p.name for p in point.rglob("*") if p.is_file()) == ["filler"]
    assert raised.value.errno == errno.ENOSPC and str(target) in str(raised.value), raised.value


def test_a_lease_on_a_full_disk_names_its_path_and_leaves_no_temporary(tmpfs):
    from imnet_assets.release.lease import acquire

    point = tmpfs("out")
    fill(point)
    with pytest.raises(OSError) as raised:
        acquire(str(point), "build", "imnet build")
    assert sorted(p.name for p in point.rglob("*") if p.is_file()) == ["filler"]
    assert raised.value.errno == errno.ENOSPC and str(point / "_locks") in str(raised.value), raised.value


def test_a_catalog_that_a_full_disk_kept_from_being_made_is_made_once_there_is_space(tmpfs):
    from imnet_assets.storage.catalog import Catalog

    point = tmpfs("cat")
    filler = fill(point)
    path = point / "catalog.duckdb"
    with pytest.raises(duckdb.IOException, match="No space left on device"):
        Catalog(str(path))
    assert not path.exists(), "an empty catalog file was left, which every later open takes for damage"
    assert sorted(p.name for p in point.iterdir()) == ["filler"]  # nor the one it was made under first
    filler.unlink()
    with Catalog(str(path)) as cat:
        assert cat.stage_fingerprint("raw_tars") is None


def test_a_full_tmpdir_names_the_stages_csv_file_and_leaves_nothing(tmpfs):
    import tempfile

    from imnet_assets.stages.csvstage import staged_csv

    point = tmpfs("tmpdir")
    fill(point)
    saved = tempfile.tempdir
    tempfile.tempdir = str(point)
    try:
        with pytest.raises(OSError) as raised, staged_csv(["a", "b"], [(i, "x" * 100) for i in range(10_000)]):
            pass
    finally:
        tempfile.tempdir = saved
    assert raised.value.errno == errno.ENOSPC and str(point) in str(raised.value), raised.value
    assert sorted(p.name for p in point.iterdir()) == ["filler"]


def test_a_codec_that_meets_a_full_disk_fails_the_work_not_the_image(tmpfs, sample_jpeg):
    """A codec that stages through a temporary file (as Pillow's djpeg and Ghostscript paths do) on a
    full TMPDIR: the error propagates as the full disk it is; never an exclusion (the reason
    encode_or_refusal returns), never a MachineryFault (whose control ran on the same full disk)."""
    from imnet_assets.image.encode import DEFAULT_SETTINGS, encode_image, encode_or_refusal

    point = tmpfs("tmpdir")
    fill(point)

    def staging_codec(data, settings):
        with open(point / "stage.jpg", "wb") as f:
            f.write(data)
            f.flush()
        return encode_image(data, settings)

    with pytest.raises(OSError) as raised:
        encode_or_refusal(sample_jpeg, DEFAULT_SETTINGS, encode=staging_codec)
    assert raised.value.errno == errno.ENOSPC and type(raised.value) is OSError, repr(raised.value)


@pytest.fixture
def sample_jpeg() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 60)).save(out, "JPEG", quality=90)
    return out.getvalue()


# ----------------------------------------------------------------------------- the sweep

FOLDERS = ("out", "cat", "dagster_home", "tmpdir")


def sweep_env(tmp: Path, raw: Path) -> dict[str, str]:
    return build_env(tmp, raw, IMNET_CATALOG=str(tmp / "cat" / "catalog.duckdb"), DAGSTER_HOME=str(tmp / "dagster_home"),
                     TMPDIR=str(tmp / "tmpdir"), IMNET_PARALLEL_SHARDS="2", IMNET_WORKERS="2")


def printed(pattern: str):
    return lambda tmp: re.search(pattern, (tmp / "build.log").read_text(), re.MULTILINE)


EVENTS = {
    "start": lambda tmp: True,
    "event-log-db": lambda tmp: (tmp / "dagster_home" / "event_log.db").exists(),
    "catalog-wal": lambda tmp: (tmp / "cat" / "catalog.duckdb.wal").exists(),
    "raw-tars-line": printed(r"^  raw_tars +materialized"),
    "filtered-index-line": printed(r"^  filtered_index +materialized"),
    "shard-runs-at-once-line": printed(r"shard runs at once"),
    "shard-lease": lambda tmp: any((tmp / "out" / "_locks").glob("shard-*/*.json")),
    "shard-temp-file": lambda tmp: any(TMP_SHARD.match(p.name) for p in (tmp / "out").iterdir()),
}

# (folder, moment): 12 moments, each a build and a half of 28 images; the file takes about a minute on 2 cores
MOMENTS = [
    ("out", "start"),  # the build's lease
    ("out", "filtered-index-line"),  # the plan's slices
    ("out", "shard-lease"),  # shard runs' leases, shards' temporary files
    ("out", "shard-temp-file"),  # shards' temporary files, manifests
    ("cat", "start"),  # the DuckDB file itself
    ("cat", "catalog-wal"),  # a stage's commit
    ("cat", "shard-temp-file"),  # the audit's load
    ("dagster_home", "start"),  # the instance's storages
    ("dagster_home", "catalog-wal"),  # a stage's run
    ("dagster_home", "shard-lease"),  # shard runs
    # (a TMPDIR full at the start is passed over: Python's tempfile then picks /tmp)
    ("tmpdir", "raw-tars-line"),  # a stage's CSV for DuckDB
    ("tmpdir", "filtered-index-line"),  # the plan's
]


@pytest.fixture(scope="module")
def clean(small_release, tmp_path_factory) -> tuple[Path, dict, dict]:  # noqa: F811
    """An undisturbed build: its out folder, catalog counts and what it recorded."""
    tmp = tmp_path_factory.mktemp("clean")
    for name in FOLDERS:
        (tmp / name).mkdir()
    shutil.copy(REPO / "dagster.yaml", tmp / "dagster_home" / "dagster.yaml")
    done = imnet(["build"], sweep_env(tmp, small_release), cwd=tmp, timeout=300)
    assert "shard_audit      ok" in done.stdout, done.stdout
    catalog = tmp / "cat" / "catalog.duckdb"
    return tmp / "out", catalog_counts(catalog), recorded(catalog)


def recorded(catalog: Path) -> dict:
    """What a build recorded about the images and tars: every exclusion, repair and damage."""
    with duckdb.connect(str(catalog), read_only=True) as con:
        return {
            "images": set(con.execute("SELECT key, status, reason, excluded_at FROM images").fetchall()),
            "shard_exclusions": set(con.execute("SELECT * FROM shard_exclusions").fetchall()),
            "damaged tars": set(con.execute("SELECT tar FROM tar_scans WHERE damaged_bytes > 0").fetchall()),
        }


@pytest.mark.parametrize(("folder", "moment"), MOMENTS, ids=[f"{f}-{m}" for f, m in MOMENTS])
def test_a_full_disk_at_each_moment_fails_clearly_then_the_rerun_is_whole(small_release, clean, tmpfs, tmp_path,  # noqa: F811
                                                                        folder, moment):
    for name in FOLDERS:
        (tmp_path / name).mkdir(exist_ok=True)
    point = tmpfs(folder)
    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster_home" / "dagster.yaml")
    env, log = sweep_env(tmp_path, small_release), tmp_path / "build.log"

    proc = start_build(env, tmp_path, log)
    try:
        wait_for(moment, lambda: EVENTS[moment](tmp_path), proc, log, timeout=300)
        filler = fill(point)
        members = group_members(proc.pid)
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None or group_members(proc.pid):
            kill_group(proc.pid)  # (its last members may end meanwhile: no error)
    text = log.read_text()
    left = wait_gone(members - {proc.pid}, timeout=20)
    assert not left, f"processes of the build outlived it: {cmdlines(left)}\n{text}"
    assert "Traceback" not in text, text
    if code != 0:
        assert code == 1, text
        assert re.search(r"No space left on device|disk is full", text), text
        said = "\n".join(line for line in text.splitlines() if not line.startswith("imnet build: raw "))  # (it names all)
        assert str(point) in said, f"the failure does not name what it could not write ({point}):\n{text}"
    assert_final_shards_complete(tmp_path / "out")
    assert temp_files(tmp_path) == [], text
    assert list((tmp_path / "out").glob("_locks/**/*.json")) == [], text
    catalog = tmp_path / "cat" / "catalog.duckdb"
    if catalog.exists():  # (it has nothing yet when the disk filled before it was made)
        filler.unlink()  # DuckDB writes even when it opens a file read-only: its .wal replayed
        for what, rows in recorded(catalog).items():
            assert rows <= clean[2][what], (what, rows - clean[2][what], text)

    if filler.exists():
        filler.unlink()
    done = imnet(["build"], env, cwd=tmp_path, check=False, timeout=300)
    said = f"first build:\n{text}\nrerun:\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, said
    assert "shard_audit      ok" in done.stdout or (code == 0 and "shard_audit      fresh" in done.stdout), said
    assert_identical(clean[0], tmp_path / "out")
    assert catalog_counts(catalog) == clean[1], said
    assert recorded(catalog) == clean[2], said
    assert temp_files(tmp_path) == [], said
    assert list((tmp_path / "out").glob("_locks/**/*.json")) == [], said
    unfinished = [r.run_id for r in shard_runs(env["DAGSTER_HOME"]) if not r.is_finished]
    assert unfinished == [], (unfinished, said)
