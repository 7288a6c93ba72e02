"""The index's scan under worker deaths and resource faults (stages/scan_pool.py; SPEC "Failure
behaviour"). Real pool workers, real signals (IMNET_TEST_INDEX_FAULT: a real SIGSEGV, a MemoryError
raised inside the probe or the pHash, a hang), real tars of real JPEG bytes, real catalogs:

- an image whose decode crashes its worker twice is excluded naming the signal, once the control
  image of its kind passed the index's decoding; every other row is the undisturbed build's, with
  IMNET_WORKERS=1 too, and this process (the stage's) never decodes, so never dies;
- a decode that crashes on every image fails the stage with a MachineryFault, nothing recorded;
- a worker killed from outside while decoding costs a retry: the same catalog;
- a MemoryError in the probe or the pHash, or a hang past IMNET_IMAGE_TIMEOUT, is retried in fresh
  processes, then fails the stage naming the image: never an exclusion, never a missing pHash;
- a tar cut short under a worker's memory map (SIGBUS while reading) is the storage's fault: scanned
  again without a map in a fresh process, never an exclusion.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading

import duckdb
import pytest
from PIL import Image

from imnet_assets.image import perceptual, probe
from imnet_assets.image.guard import MachineryFault
from imnet_assets.stages import scan_pool
from imnet_assets.stages.filtered_index import build_filtered_index
from imnet_assets.stages.index import ReadShort, check_accounted, scan_tar
from imnet_assets.stages.raw_tars import build_raw_tars
from imnet_assets.stages.scan_pool import ScanKilled, ScanOutOfMemory, scan_tars
from imnet_assets.stages.staged_encodes import staging_plan
from imnet_assets.stages.synset_manifest import build_synset_manifest
from tests.conftest import local_settings
from tests.core.test_rawtar import layout, make_tar
from tests.core.worker_patch import when_working

TARS = ("n00000011", "n00000012", "n00000013")
VICTIM_TAR, VICTIM_MEMBER = "n00000012.tar", 1  # its second member
CRASH_REASON = "index process died 2 times (signal 11 (SIGSEGV), signal 11 (SIGSEGV)) while decoding"


def photo(seed: int, size=(160, 120)) -> bytes:
    """A real JPEG with some detail (its pHash is not flat)."""
    img = Image.effect_mandelbrot(size, (-2.2 + seed * 0.01, -1.2, 1.0, 1.2), 32 + seed).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def members(t: int, wnid: str, size=(160, 120)) -> list[tuple[str, bytes]]:
    return [(f"{wnid}_{i}.JPEG", photo(10 * t + i, size)) for i in range(4)]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan_faults") / "raw"
    root.mkdir()
    for t, wnid in enumerate(TARS):
        (root / f"{wnid}.tar").write_bytes(make_tar(members(t, wnid)))
    return root


def victim_sha256() -> str:
    return hashlib.sha256(members(1, "n00000012")[VICTIM_MEMBER][1]).hexdigest()


def index(raw, folder, log=lambda _m: None, **env) -> list[tuple]:
    settings = local_settings(raw, folder, **env)
    build_raw_tars(settings, "run", log)
    build_synset_manifest(settings, "run", log)
    build_filtered_index(settings, "run", log, codecs=staging_plan([settings]))
    return rows(settings)


def rows(settings) -> list[tuple]:
    with duckdb.connect(settings.catalog, read_only=True) as con:
        return con.execute('SELECT * FROM images ORDER BY tar, "offset"').fetchall()


@pytest.fixture(scope="module")
def undisturbed(raw, tmp_path_factory):
    return index(raw, tmp_path_factory.mktemp("undisturbed"), IMNET_WORKERS=2)


def columns(settings_folder) -> list[str]:
    with duckdb.connect(str(settings_folder / "catalog.duckdb"), read_only=True) as con:
        return [r[0] for r in con.execute("DESCRIBE images").fetchall()]


def while_decoding(tar: str, member: int, act, mapped: bool = False) -> tuple[threading.Thread, list[int]]:
    """A started thread that waits (up to 60 s) until a worker of this process's pool decodes member
    `member` of raw tar `tar` (a job reading it through a memory map, when `mapped`), then calls
    `act(pid)` once; the returned list then holds that worker's pid."""
    def matches(job, index_) -> bool:
        at = scan_pool._culprit(index_) if isinstance(job, scan_pool.ScanJob) else None
        return bool(at and at[2] and at[1] == member and os.path.basename(job.tars[at[0]][0]) == tar
                    and (job.mapped or not mapped))

    return when_working(matches, act)


@pytest.mark.parametrize(("workers", "staged"), [(1, "off"), (2, "off"), (2, "on")])
def test_an_image_that_crashes_the_index_is_excluded_and_the_rest_is_as_undisturbed(
        raw, undisturbed, tmp_path, monkeypatch, workers, staged):
    monkeypatch.setenv("IMNET_TEST_INDEX_FAULT", f"crash:{victim_sha256()}")
    logs: list[str] = []
    got = index(raw, tmp_path, logs.append, IMNET_WORKERS=workers, IMNET_STAGE_ENCODES=staged)
    names = columns(tmp_path)
    at = [i for i, r in enumerate(got) if r[names.index("sha256")] == victim_sha256()]
    assert len(at) == 1
    victim = dict(zip(names, got[at[0]]))
    assert (victim["tar"], victim["member"]) == (VICTIM_TAR, f"n00000012_{VICTIM_MEMBER}.JPEG")
    assert (victim["status"], victim["reason"], victim["phash"]) == ("excluded", CRASH_REASON, None)
    # every other row, of this tar and the others, is the undisturbed build's
    assert got[: at[0]] + got[at[0] + 1:] == undisturbed[: at[0]] + undisturbed[at[0] + 1:]
    assert sum("control image passed the index: the crashes are the image's own" in m for m in logs) == 1, logs
    assert any("died (signal 11 (SIGSEGV)) decoding n00000012_1.JPEG (raw tar n00000012.tar" in m
               for m in logs), logs
    if staged == "on":  # every other kept image staged, the dead workers' partial files gone
        with duckdb.connect(str(tmp_path / "catalog.duckdb"), read_only=True) as con:
            staged_keys = sorted(r[0] for r in con.execute("SELECT key FROM staged_images").fetchall())
        kept = sorted(r[names.index("key")] for r in got if r[names.index("status")] == "kept")
        assert staged_keys == kept and victim["key"] not in staged_keys
        files = sorted(p.name for p in (tmp_path / "out" / "_staged").rglob("*") if p.is_file())
        assert files == [f"{wnid}.tar.bin" for wnid in TARS], files


def test_a_decode_crashing_on_every_image_fails_the_index_and_records_nothing(raw, undisturbed, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("IMNET_TEST_INDEX_FAULT", "crash:*")
    settings = local_settings(raw, tmp_path, IMNET_WORKERS=2)
    with pytest.raises(MachineryFault) as e:
        index(raw, tmp_path, IMNET_WORKERS=2)
    message = str(e.value)
    assert message.startswith("machinery fault: the index's process died 2 times (signal 11 (SIGSEGV), signal 11 "
                              "(SIGSEGV)) decoding n0000001"), message
    assert "control image made in memory crashed the index's process the same way (signal 11 (SIGSEGV))" in message
    assert "nothing was recorded as excluded" in message
    assert rows(settings) == []  # not one row, not one exclusion
    monkeypatch.delenv("IMNET_TEST_INDEX_FAULT")  # the fix
    assert index(raw, tmp_path, IMNET_WORKERS=2) == undisturbed


def test_a_scan_worker_killed_from_outside_while_decoding_is_retried(raw, undisturbed, tmp_path, monkeypatch):
    monkeypatch.setenv("IMNET_TEST_INDEX_FAULT", f"slow:{victim_sha256()}")  # a window to kill it in
    killer, killed = while_decoding(VICTIM_TAR, VICTIM_MEMBER, lambda pid: os.kill(pid, 9))
    logs: list[str] = []
    try:
        got = index(raw, tmp_path, logs.append, IMNET_WORKERS=2)
    finally:
        killer.join()
    assert len(killed) == 1
    assert got == undisturbed
    assert any("died (signal 9 (SIGKILL)) decoding n00000012_1.JPEG" in m and "killed from outside (1 of 4)" in m
               for m in logs), logs


@pytest.mark.parametrize("fault", ["memory-probe", "memory-phash"])
def test_a_memory_error_decoding_an_image_fails_the_index_naming_it_and_is_never_an_exclusion(
        raw, undisturbed, tmp_path, monkeypatch, fault):
    monkeypatch.setenv("IMNET_TEST_INDEX_FAULT", f"{fault}:{victim_sha256()}")
    settings = local_settings(raw, tmp_path, IMNET_WORKERS=2)
    logs: list[str] = []
    with pytest.raises(ScanOutOfMemory, match=r"out of memory decoding n00000012_1\.JPEG \(raw tar n00000012\.tar, "
                                              r"member #2, at byte \d+\) 3 times, each in a fresh process.*give the "
                                              r"index more memory"):
        index(raw, tmp_path, logs.append, IMNET_WORKERS=2)
    assert sum("ran out of memory decoding n00000012_1.JPEG" in m for m in logs) == 3, logs
    assert rows(settings) == []  # no exclusion, no row without its pHash
    monkeypatch.delenv("IMNET_TEST_INDEX_FAULT")
    assert index(raw, tmp_path, IMNET_WORKERS=2) == undisturbed


def test_the_probe_and_the_phash_raise_memory_errors_instead_of_excluding(monkeypatch):
    """In any process: a MemoryError is no verdict on the image (the scan's worker exits on it)."""
    data = photo(1)

    def no_memory(*_a):
        raise MemoryError

    monkeypatch.setattr(probe, "_probe_jpeg", no_memory)
    with pytest.raises(MemoryError):
        probe.probe_image(data)
    monkeypatch.setattr(probe, "_probe", no_memory)
    with pytest.raises(MemoryError):
        probe.probe_image(data, fast=False)
    monkeypatch.setattr(perceptual, "_grey", no_memory)
    with pytest.raises(MemoryError):
        perceptual.image_hash(data)


def test_a_decode_hung_past_the_time_limit_fails_the_index_naming_the_image(raw, tmp_path, monkeypatch):
    monkeypatch.setenv("IMNET_TEST_INDEX_FAULT", f"hang:{victim_sha256()}")
    settings = local_settings(raw, tmp_path, IMNET_WORKERS=2, IMNET_IMAGE_TIMEOUT=1)
    with pytest.raises(ScanKilled, match=r"decoding n00000012_1\.JPEG \(raw tar n00000012\.tar.*\) ran past "
                                         r"IMNET_IMAGE_TIMEOUT \(1 s\) 2 times"):
        index(raw, tmp_path, IMNET_WORKERS=2, IMNET_IMAGE_TIMEOUT=1)
    assert rows(settings) == []


def test_a_tar_cut_short_under_the_memory_map_is_scanned_again_without_it(tmp_path, monkeypatch):
    """The worker walking a memory-mapped tar dies of SIGBUS when the tar is cut short in place under
    it (as on a read error): the storage's fault, so the tar is scanned again without a map in a fresh
    process (here: finding it shorter than listed, which the index refuses naming it), and nothing
    is excluded for it; the other tars are scanned as ever."""
    big = (1024, 768)  # members of many pages each
    urls, data = [], {}
    for t, wnid in enumerate(TARS):
        data[wnid] = make_tar(members(t, wnid, big))
        (tmp_path / f"{wnid}.tar").write_bytes(data[wnid])
        urls.append(str(tmp_path / f"{wnid}.tar"))
    victim = members(1, "n00000012", big)[VICTIM_MEMBER][1]
    # at a page before the next member's header (the victim's bytes were copied before its decode)
    cut_at = layout(data["n00000012"])[VICTIM_MEMBER + 1].offset // 4096 * 4096
    undisturbed = {u: scan_tar(u) for u in urls}
    monkeypatch.setenv("IMNET_TEST_INDEX_FAULT", f"slow:{hashlib.sha256(victim).hexdigest()}")
    cutter, cut = while_decoding(VICTIM_TAR, VICTIM_MEMBER, lambda _pid: os.truncate(urls[1], cut_at), mapped=True)
    logs: list[str] = []
    sizes = {u: len(data[os.path.basename(u)[:-4]]) for u in urls}
    try:
        got = dict(scan_tars(urls, 2, log=logs.append, sizes=sizes))
    finally:
        cutter.join()
    assert len(cut) == 1
    assert any("died (signal 7 (SIGBUS)) reading raw tar n00000012.tar (member #3)" in m
               and "without a memory map in a fresh process" in m for m in logs), logs
    with pytest.raises(ReadShort, match=r"raw tar n00000012\.tar: the index read \d+ of its \d+ listed bytes"):
        check_accounted("n00000012.tar", got[urls[1]], sizes[urls[1]])
    assert not any(r.reason and "died" in r.reason for r in got[urls[1]])  # never an exclusion
    assert got[urls[0]] == undisturbed[urls[0]] and got[urls[2]] == undisturbed[urls[2]]
