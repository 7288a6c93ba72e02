"""The eval set's hashing (IMNET_EVAL_EXCLUDE) under worker deaths, resource faults and storage faults
(stages/eval_pool.py; SPEC "Failure behaviour"). Real pool workers, real signals (IMNET_TEST_INDEX_FAULT:
a real SIGSEGV, a MemoryError raised inside the pHash, a hang, a pause), real JPEG/PNG/WebP bytes in
nested folders and a tar, real catalogs, moto's S3 server behind the fault-injecting proxy:

- an eval image whose pHash crashes its worker twice keeps its sha256 and has no pHash, with the
  reason, once the control image of its kind got its pHash; the stage passes, says so in its log,
  and every other eval row and every exclusion but that image's near copy are the undisturbed build's;
- a worker killed from outside while hashing costs a retry: the same catalog;
- a MemoryError or a hang past IMNET_IMAGE_TIMEOUT is retried in fresh processes, then fails the
  stage naming the eval file: never a missing pHash;
- a body cut short, a connection reset or a 503 while an eval file or an eval tar is read, or a
  worker killed while reading a file or walking a tar, is read again: the same rows as the local
  folder; a fault that lasts fails the stage naming the file;
- a tar of eval images is hashed in jobs (a death repeats one); a damaged one is said in the log;
- a catalog made before `eval_images.no_phash` gains it, its rows counted as reason unrecorded.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid

import duckdb
import pytest

from imnet_assets.image.guard import MachineryFault
from imnet_assets.release.card import no_phash_said
from imnet_assets.runtime.workerpool import shared_pool
from imnet_assets.stages import eval_pool
from imnet_assets.stages.decontam import eval_listing, hash_eval_set
from imnet_assets.stages.filtered_index import build_filtered_index
from imnet_assets.stages.raw_tars import build_raw_tars
from imnet_assets.stages.scan_pool import ScanKilled, ScanOutOfMemory
from imnet_assets.stages.synset_manifest import build_synset_manifest
from imnet_assets.storage import fs
from tests.core.test_features import WNIDS, settings_for, write_release
from tests.core.worker_patch import when_working
from tests.latency_proxy import LatencyProxy, object_get
from tests.s3server import MotoS3

NEAR_VICTIM = "val/c/ILSVRC2012_val_00000002.JPEG"  # a re-encoded copy of raw image WNIDS[0]_4
TAR_VICTIM = "pack.tar/unrelated_3.JPEG"
CRASHED = "crashed the pHash's process 2 times (signal 11 (SIGSEGV), signal 11 (SIGSEGV))"


@pytest.fixture(scope="module")
def rel(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("eval_faults"))


def sha(rel, name: str) -> str:
    if name.startswith("pack.tar/"):
        import tarfile

        with tarfile.open(rel.eval / "pack.tar") as tar:
            return hashlib.sha256(tar.extractfile(name.partition("/")[2]).read()).hexdigest()
    return hashlib.sha256((rel.eval / name).read_bytes()).hexdigest()


def index(rel, folder, log=lambda _m: None, **env) -> tuple[list, list, dict]:
    """(images rows, eval_images rows, the stage's facts) of the filtered index."""
    settings = settings_for(folder, rel, **env)
    build_raw_tars(settings, "run", log)
    build_synset_manifest(settings, "run", log)
    facts = build_filtered_index(settings, "run", log)
    images, evals = catalog_rows(settings)
    return images, evals, facts


def catalog_rows(settings) -> tuple[list, list]:
    with duckdb.connect(settings.catalog, read_only=True) as con:
        images = con.execute("SELECT key, status, reason, phash FROM images ORDER BY key").fetchall()
        evals = con.execute("SELECT file, sha256, phash, no_phash FROM eval_images ORDER BY file").fetchall()
    return images, evals


@pytest.fixture(scope="module")
def undisturbed(rel, tmp_path_factory):
    return index(rel, tmp_path_factory.mktemp("undisturbed"), IMNET_WORKERS=2)


def test_the_undisturbed_build_says_why_files_have_no_phash(undisturbed):
    _images, evals, facts = undisturbed
    assert len(evals) == 10
    missing = {f: why for f, _s, p, why in evals if p is None}
    assert list(missing) == ["LICENSE.txt"] and missing["LICENSE.txt"].startswith("does not decode: ")
    assert all(why is None for _f, _s, p, why in evals if p is not None)
    assert (facts["eval_no_phash"], facts["eval_undecodable"], facts["eval_crashed"]) == (1, 1, 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_eval_image_that_crashes_the_phash_is_recorded_without_one_and_the_stage_passes(
        rel, undisturbed, tmp_path, monkeypatch, workers):
    monkeypatch.setenv("IMNET_TEST_INDEX_FAULT", f"crash-phash:{sha(rel, NEAR_VICTIM)}")
    logs: list[str] = []
    images, evals, facts = index(rel, tmp_path, logs.append, IMNET_WORKERS=workers)
    victim = next(r for r in evals if r[0] == NEAR_VICTIM)
    assert victim == (NEAR_VICTIM, sha(rel, NEAR_VICTIM), None, CRASHED)  # its sha256 still matches byte for byte
    assert [r for r in evals if r[0] != NEAR_VICTIM] == [r for r in undisturbed[1] if r[0] != NEAR_VICTIM]
    # every exclusion is the undisturbed build's, but the near copy only that image's pHash found
    near = f"{WNIDS[0]}_4"
    assert [r for r in images if r[0] != near] == [r for r in undisturbed[0] if r[0] != near]
    assert dict((r[0], r[1:3]) for r in undisturbed[0])[near] == ("excluded", f"eval overlap: {NEAR_VICTIM}")
    assert dict((r[0], r[1:3]) for r in images)[near] == ("kept", None)
    assert (facts["eval_no_phash"], facts["eval_undecodable"], facts["eval_crashed"]) == (2, 1, 1)
    said = no_phash_said({"images": 10, "no_phash": 2, "undecodable": 1, "crashed": 1})
    assert said == "2 of 10 eval images have no pHash (1 do not decode, 1 crashed the pHash's process twice)"
    assert any(m.startswith(said) for m in logs), logs  # the stage's log line
    assert sum("control image passed the pHash: the crashes are the image's own" in m for m in logs) == 1, logs
    assert any(f"died (signal 11 (SIGSEGV)) hashing eval file {NEAR_VICTIM}" in m for m in logs), logs


def test_a_phash_crashing_on_every_image_fails_the_stage(rel, monkeypatch):
    """A codec broken for every input: the control crashes too, so nothing is taken for the image's fault."""
    monkeypatch.setenv("IMNET_TEST_INDEX_FAULT", "crash-phash:*")
    with pytest.raises(MachineryFault, match=r"machinery fault: the eval set's hashing process died 2 times .*"
                                             r"crashed the pHash's process the same way \(signal 11 \(SIGSEGV\)\)"):
        list(hash_eval_set(eval_listing(str(rel.eval)), 2, lambda _m: None))


def test_a_cut_eval_image_that_crashes_the_phash_is_recorded_without_one(tmp_path, monkeypatch):
    """An eval JPEG cut short (no end marker, as some of ImageNet's are) whose pHash crashes its
    worker twice gets the control of its kind cut short too (crash_control's KindJob): a cut image
    gets no pHash by design (perceptual.py), so the cut control getting none is no machinery fault;
    the image keeps its sha256 and has no pHash, with the reason, and the stage passes."""
    from tests.core.test_encode import _photo_jpeg

    whole = _photo_jpeg(seed=3)
    cut = whole[: len(whole) * 3 // 4]
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "cut.JPEG").write_bytes(cut)
    (tmp_path / "val" / "whole.JPEG").write_bytes(whole)
    monkeypatch.setenv("IMNET_TEST_INDEX_FAULT", f"crash-phash:{hashlib.sha256(cut).hexdigest()}")
    logs: list[str] = []
    rows = list(hash_eval_set(eval_listing(str(tmp_path / "val")), 2, logs.append))
    assert [r[0] for r in rows] == ["cut.JPEG", "whole.JPEG"]
    assert rows[0] == ("cut.JPEG", hashlib.sha256(cut).hexdigest(), None, CRASHED)
    assert rows[1][1] == hashlib.sha256(whole).hexdigest() and rows[1][2] is not None and rows[1][3] is None
    assert any("cut short control image passed the pHash" in m for m in logs), logs

def while_hashing(name: str, act) -> tuple[threading.Thread, list[int]]:
    """A started thread that waits (up to 60 s) until a worker of this process's pool hashes the
    eval image `name`, then calls `act(pid)` once; the returned list then holds that worker's pid."""
    return when_working(lambda job, at: isinstance(job, eval_pool.EvalJob) and bool(at & 1)
                        and job.items[at >> 1][0] == name, act)


def test_an_eval_worker_killed_from_outside_while_hashing_is_retried(rel, undisturbed, tmp_path, monkeypatch):
    monkeypatch.setenv("IMNET_TEST_INDEX_FAULT", f"slow-phash:{sha(rel, TAR_VICTIM)}")  # a window to kill it in
    killer, killed = while_hashing(TAR_VICTIM, lambda pid: os.kill(pid, 9))
    logs: list[str] = []
    try:
        got = index(rel, tmp_path, logs.append, IMNET_WORKERS=2)
    finally:
        killer.join()
    assert len(killed) == 1
    assert got[:2] == undisturbed[:2]
    assert any(f"died (signal 9 (SIGKILL)) hashing eval file {TAR_VICTIM} (1 of 4)" in m for m in logs), logs


def test_a_memory_error_hashing_an_eval_image_fails_the_stage_naming_it(rel, undisturbed, tmp_path, monkeypatch):
    monkeypatch.setenv("IMNET_TEST_INDEX_FAULT", f"memory-phash:{sha(rel, NEAR_VICTIM)}")
    logs: list[str] = []
    with pytest.raises(ScanOutOfMemory, match=rf"out of memory hashing eval file {NEAR_VICTIM} 3 times, each in a "
                                              r"fresh process; nothing was recorded for the eval set"):
        index(rel, tmp_path, logs.append, IMNET_WORKERS=2)
    assert sum(f"ran out of memory on eval file {NEAR_VICTIM}" in m for m in logs) == 3, logs
    images, evals = catalog_rows(settings_for(tmp_path, rel))
    assert evals == [] and not any(r[2] and r[2].startswith("eval overlap") for r in images)
    monkeypatch.delenv("IMNET_TEST_INDEX_FAULT")  # the fix: the next build is the undisturbed one
    assert index(rel, tmp_path, IMNET_WORKERS=2)[:2] == undisturbed[:2]


def test_a_hang_hashing_an_eval_image_fails_the_stage_naming_it(rel, tmp_path, monkeypatch):
    monkeypatch.setenv("IMNET_TEST_INDEX_FAULT", f"hang-phash:{sha(rel, TAR_VICTIM)}")
    with pytest.raises(ScanKilled, match=rf"hashing eval file {TAR_VICTIM} ran past IMNET_IMAGE_TIMEOUT \(1 s\) 2 "
                                         "times"):
        list(hash_eval_set(eval_listing(str(rel.eval)), 2, time_limit=1))


@pytest.fixture
def s3_eval(rel, monkeypatch):
    """The eval folder on moto's S3 server, read through the fault-injecting proxy: (URL, proxy)."""
    with MotoS3(secret=f"evalSecret-{uuid.uuid4().hex}") as server, LatencyProxy(server.endpoint, 1) as proxy:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(k)
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        bucket = f"eval-{uuid.uuid4().hex[:12]}"
        client = server.client()
        client.create_bucket(Bucket=bucket)
        server.put_tree(client, rel.eval, bucket, "imagenet/val")
        yield f"s3://{bucket}/imagenet/val", proxy


@pytest.mark.parametrize("fault", ["cut-rewritten-length", "cut", "reset", "slowdown"])
def test_a_cut_or_reset_read_of_an_eval_file_is_read_again_never_a_missing_phash(rel, undisturbed, s3_eval, fault):
    url, proxy = s3_eval
    listing = eval_listing(url)
    if fault == "reset":
        proxy.reset(every=3, times=4, match=object_get)
    elif fault == "slowdown":
        proxy.slowdown(1.0, match=object_get)
    else:
        proxy.cut(every=3, times=4, rewrite_length=fault == "cut-rewritten-length", match=object_get)
    got = sorted(hash_eval_set(listing, 2, lambda _m: None))
    assert proxy.injected[fault.partition("-")[0]] > 0
    assert got == undisturbed[1]  # every sha256 and pHash as the local folder's, LICENSE.txt's reason too


def test_a_read_that_keeps_failing_fails_the_stage_naming_the_eval_file(rel, s3_eval, monkeypatch):
    url, proxy = s3_eval
    listing = [e for e in eval_listing(url) if e["name"] == NEAR_VICTIM]
    proxy.cut(every=1, rewrite_length=True, match=object_get)  # every answer, for as long as it takes
    monkeypatch.setenv("IMNET_STORAGE_RETRY_SECONDS", "2")
    with pytest.raises(fs.StorageError, match=NEAR_VICTIM):
        list(hash_eval_set(listing, 1, lambda _m: None))


def test_a_death_in_a_tar_of_eval_images_repeats_one_job_not_the_tar(rel, undisturbed, monkeypatch):
    """A tar's members are hashed in jobs of EVAL_BATCH (here 1): the kill repeats the victim's job only."""
    monkeypatch.setattr(eval_pool, "EVAL_BATCH", 1)
    pool = shared_pool(2)
    sent: list[list[str]] = []
    submit = type(pool).submit

    def recording(self, job, priority=0):
        if isinstance(job, eval_pool.EvalJob):
            sent.append([item[0] for item in job.items])
        return submit(self, job, priority)

    monkeypatch.setattr(type(pool), "submit", recording)
    monkeypatch.setenv("IMNET_TEST_INDEX_FAULT", f"slow-phash:{sha(rel, TAR_VICTIM)}")
    killer, killed = while_hashing(TAR_VICTIM, lambda pid: os.kill(pid, 9))
    try:
        got = sorted(hash_eval_set(eval_listing(str(rel.eval)), 2, lambda _m: None))
    finally:
        killer.join()
    assert len(killed) == 1 and got == undisturbed[1]
    assert all(len(items) == 1 for items in sent)  # each of the tar's members a job of its own
    retried = {n for [n] in sent if sent.count([n]) > 1}
    # the victim's job again, and at most the jobs queued in the killed worker behind it (pool depth)
    assert TAR_VICTIM in retried and len(retried) <= 1 + pool.depth, sent


def test_a_damaged_eval_tar_is_said_and_its_readable_members_hashed(tmp_path):
    from tests.core.test_shard import write_raw_tar

    ev = tmp_path / "eval"
    ev.mkdir()
    images = [(f"m{i}.JPEG", _photo_bytes(i)) for i in range(3)]
    write_raw_tar(ev / "cut.tar", images)
    whole = (ev / "cut.tar").read_bytes()
    (ev / "cut.tar").write_bytes(whole[: whole.index(images[2][1]) + 100])  # cut inside the third image
    (ev / "no.tar").write_bytes(b"not a tar at all\n" * 40)
    logs: list[str] = []
    got = sorted(hash_eval_set(eval_listing(str(ev)), 1, logs.append))
    assert [(f, s) for f, s, _p, _w in got] == [  # no.tar: nothing readable, nothing hashed (not read whole)
        ("cut.tar/m0.JPEG", hashlib.sha256(images[0][1]).hexdigest()),
        ("cut.tar/m1.JPEG", hashlib.sha256(images[1][1]).hexdigest())]
    assert all(p is not None for _f, _s, p, _w in got)
    assert any(m.startswith("eval tar cut.tar: truncated eval tar cut.tar: member data cut at byte") for m in logs), logs
    assert any(m.startswith("eval tar no.tar holds no readable member (truncated or damaged eval tar no.tar: ")
               for m in logs), logs


def _photo_bytes(seed: int) -> bytes:
    from tests.core.test_features import _photo

    return _photo(7000 + seed)


def test_a_catalog_made_before_the_reasons_gains_the_column_and_counts_its_rows_unrecorded(tmp_path):
    from imnet_assets.storage.catalog import Catalog

    path = str(tmp_path / "old.duckdb")
    with duckdb.connect(path) as con:  # eval_images as it was before `no_phash`
        con.execute("CREATE TABLE eval_images (file VARCHAR NOT NULL, sha256 VARCHAR NOT NULL, phash BIGINT)")
        con.execute("INSERT INTO eval_images VALUES ('a.JPEG', 'aa', 5), ('b.txt', 'bb', NULL)")
    with Catalog(path) as cat:
        facts = cat.one("eval_summary")
        assert cat.rows("catalog_tables") and cat.con.execute(
            "SELECT file, no_phash FROM eval_images ORDER BY file").fetchall() == [("a.JPEG", None), ("b.txt", None)]
    assert (facts["images"], facts["no_phash"], facts["unrecorded"], facts["undecodable"]) == (2, 1, 1, 0)
    assert no_phash_said(facts) == "1 of 2 eval images have no pHash (1 hashed before reasons were recorded)"


def test_a_worker_killed_while_reading_an_eval_file_or_walking_an_eval_tar_reads_it_again(rel, undisturbed,
                                                                                          s3_eval):
    """Slow storage (300 ms a request) leaves a window: the walk of pack.tar and the read of the first
    eval file are each killed once from outside; both are the storage's deaths, read again: the same rows."""
    url, proxy = s3_eval
    listing = eval_listing(url)
    first = listing[0]["name"]  # the first image of the only job: its worker waits for its read first
    proxy.latency = 0.3
    pool = shared_pool(2)
    killed: dict[str, int] = {}

    def watch() -> None:
        deadline = time.monotonic() + 60
        while len(killed) < 2 and time.monotonic() < deadline:
            for pid, job, at in pool.working_on():
                if isinstance(job, eval_pool.TarMembersJob) and "walk" not in killed:
                    what = "walk"
                elif (isinstance(job, eval_pool.EvalJob) and not at & 1 and job.items[at >> 1][0] == first
                      and "read" not in killed):
                    what = "read"
                else:
                    continue
                os.kill(pid, 9)
                killed[what] = pid
                break
            time.sleep(0.01)

    killer = threading.Thread(target=watch)
    killer.start()
    logs: list[str] = []
    try:
        got = sorted(hash_eval_set(listing, 2, logs.append))
    finally:
        killer.join()
    assert sorted(killed) == ["read", "walk"]
    assert got == undisturbed[1]
    assert any("the process reading eval tar pack.tar died (signal 9 (SIGKILL))" in m for m in logs), logs
    assert any(f"died (signal 9 (SIGKILL)) reading eval file {first}: not the image's fault" in m
               for m in logs), logs
