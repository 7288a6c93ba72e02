"""Shard runs on the shared worker pool: a worker killed mid-shard (a real SIGKILL) costs a retry,
not the shard, and leaves it byte-identical; an image that kills its encoder every time (a real
segfault, through the IMNET_TEST_CRASH_SHA256 test hook) is excluded naming the crash; a check that
fails (a byte of the committed tar corrupted between commit and check) leaves the shard not fresh;
keys longer than a ustar name or not ASCII are written (pax records) and read back by webdataset;
two shard runs in two threads share one pool.

Which deaths count (SPEC "Failure behaviour"): an OOM storm (kill -9 of encode processes) gives
the byte-identical shard; the same image killed every time fails the run naming it; a hung codec
is killed past IMNET_IMAGE_TIMEOUT and fails its run naming the image while a run beside it is
built; SIGABRT twice excludes; an unreadable reply fails one job beside a shard run; the check's
chunk whose worker is killed is checked again. Never an exclusion for a kill or a hang."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import signal
import tarfile
import threading
import time
import types

import pytest
import webdataset as wds

from imnet_assets.image.encode import EncodeSettings, encode_image
from imnet_assets.release import sample_tar as sample_tar_mod
from imnet_assets.release import verify
from imnet_assets.release.outroot import read_manifest
from imnet_assets.release.plan import write_slice
from imnet_assets.runtime import deaths, host, workerpool
from imnet_assets.stages import shard as shard_mod
from imnet_assets.stages import shard_jobs as shard_jobs_mod
from imnet_assets.stages.shard import build_shard, fingerprint
from tests.conftest import shard_verdict
from tests.core.test_shard import jpeg, planned, write_raw_tar

ENC = EncodeSettings(quality=80, method=2)
KEY = "0003"
NAME = "shard-0003.tar"


def release(root, images: int, names=None):
    """One raw tar of `images` real JPEGs (a few hundred px, so each takes the encoder a while)."""
    root.mkdir(parents=True, exist_ok=True)
    wnid = "n01440764"
    names = names or [f"{wnid}_{i}" for i in range(images)]
    members = [(f"{n}.JPEG", jpeg(320 + 8 * (i % 5), 240, i)) for i, n in enumerate(names)]
    where = write_raw_tar(root / f"{wnid}.tar", members, tarfile.PAX_FORMAT)  # pax: long names
    rows = []
    for (name, data), key in zip(members, names):
        offset, size = where[name]
        rows.append([key, wnid, 0, f"{wnid}.tar", name, offset, size, hashlib.sha256(data).hexdigest(), 320, 240, False])
    return types.SimpleNamespace(root=root, rows=rows)


def build(out, raw, workers=2, **kw):
    return build_shard(out_root=str(out), raw_root=str(raw.root), shard_key=KEY, shard_name=NAME, settings=ENC,
                       workers=workers, run_id="run-test", **kw)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    raw = release(tmp / "raw", 32)
    out = tmp / "reference"
    write_slice(str(out), KEY, planned(raw.rows, list(range(len(raw.rows)))[::-1]))
    reference = build(out, raw, workers=1)
    assert reference.problems == [] and reference.num_samples == 32
    return types.SimpleNamespace(raw=raw, reference=(out / NAME).read_bytes(), tmp=tmp,
                                 manifest=read_manifest(str(out), KEY))


def test_a_worker_killed_mid_shard_is_replaced_and_the_shard_is_byte_identical(photos, tmp_path):
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(photos.raw.rows, list(range(len(photos.raw.rows)))[::-1]))
    pool = workerpool.shared_pool(2)
    started_before = pool.started
    killed: list[int] = []

    def kill_one_while_encoding():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            busy = pool.working_on()
            if busy:  # a worker inside encode_image: kill it for real
                os.kill(busy[0][0], signal.SIGKILL)
                killed.append(busy[0][0])
            time.sleep(0.001)

    killer = threading.Thread(target=kill_one_while_encoding)
    killer.start()
    logs: list[str] = []
    try:
        result = build(out, photos.raw, log=logs.append)
    finally:
        killer.join()
    assert killed, "the worker was never caught encoding"
    assert not host.pid_alive(killed[0])
    assert any("encoder process died (signal 9)" in m for m in logs), logs
    assert pool.started > started_before  # replaced
    assert killed[0] not in pool.pids()
    assert result.excluded == [] and result.problems == []
    assert (out / NAME).read_bytes() == photos.reference
    assert shard_verdict(str(out), KEY, NAME, read_manifest(str(out), KEY)["fingerprint"]) == "fresh"


def test_an_image_that_always_kills_its_encoder_is_excluded_naming_the_crash(photos, tmp_path, monkeypatch):
    out = tmp_path / "out"
    rows = photos.raw.rows
    write_slice(str(out), KEY, planned(rows, list(range(len(rows)))))
    victim = rows[5]
    monkeypatch.setenv("IMNET_TEST_CRASH_SHA256", victim[7])
    result = build(out, photos.raw)
    manifest = read_manifest(str(out), KEY)
    assert [e["key"] for e in manifest["excluded"]] == [victim[0]]
    reason = manifest["excluded"][0]["reason"]
    assert reason == "encoder process died 2 times (signal 11, signal 11) while encoding", reason
    assert result.num_samples == len(rows) - 1 and result.problems == []
    assert [s["key"] for s in manifest["samples"]] == [r[0] for r in rows if r is not victim]
    assert shard_verdict(str(out), KEY, NAME, manifest["fingerprint"]) == "fresh"
    # The other samples are the bytes an undisturbed build gives them.
    monkeypatch.delenv("IMNET_TEST_CRASH_SHA256")
    clean = tmp_path / "clean"
    write_slice(str(clean), KEY, planned(rows, list(range(len(rows)))))
    build(clean, photos.raw)
    samples = {s["key"]: s["webp_sha256"] for s in read_manifest(str(clean), KEY)["samples"]}
    assert all(samples[s["key"]] == s["webp_sha256"] for s in manifest["samples"])


def out_of_memory(data, settings):
    """A codec that runs out of memory (module level: the pool's workers import it by name)."""
    raise MemoryError


@pytest.mark.parametrize("workers", [1, 2])
def test_memory_error_is_not_an_exclusion(photos, tmp_path, workers):
    """Running out of memory says nothing about the image: it is retried in fresh worker processes
    (each exits on MemoryError), then the run fails naming it, and nothing is committed."""
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(photos.raw.rows[:3], [0, 1, 2]))
    logs: list[str] = []
    with pytest.raises(shard_jobs_mod.EncoderOutOfMemory, match="out of memory"):
        build(out, photos.raw, workers=workers, encode=out_of_memory, log=logs.append)
    assert sorted(os.listdir(out)) == ["_plan"]
    tries = [m for m in logs if "ran out of memory on n01440764_0" in m]  # IMNET_WORKERS=1 too: its one pool worker
    assert len(tries) == deaths.MEMORY_RETRIES, logs


def corrupt_an_image_byte(url: str, ext: str = "webp", mask: int = 0x55) -> str:
    """XOR one byte in the middle of the first `.<ext>` member's data with `mask`; that sample's key."""
    with tarfile.open(url) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(f".{ext}"))
    with open(url, "r+b") as f:
        f.seek(member.offset_data + member.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ mask]))
    return member.name[: -len(f".{ext}")]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_check_leaves_the_shard_not_fresh(photos, tmp_path, workers):
    out = tmp_path / "out"
    digest = write_slice(str(out), KEY, planned(photos.raw.rows, list(range(len(photos.raw.rows)))[::-1]))
    want = fingerprint(digest, ENC)
    assert build(out, photos.raw, workers=workers).problems == []
    assert shard_verdict(str(out), KEY, NAME, want) == "fresh"
    # Rebuilt, and a byte of the committed tar flipped before the check reads it back.
    result = build(out, photos.raw, workers=workers, after_commit=corrupt_an_image_byte)
    assert any("sha256 differs from the manifest" in p for p in result.problems), result.problems
    assert any("tar sha256 differs" in p for p in result.problems), result.problems
    assert not (out / "_manifests" / f"{KEY}.state.json").exists()
    assert shard_verdict(str(out), KEY, NAME, want) == "missing"  # the next build, schedule, sensor redo it
    assert build(out, photos.raw, workers=workers).problems == []
    assert shard_verdict(str(out), KEY, NAME, want) == "fresh"
    assert (out / NAME).read_bytes() == photos.reference


@pytest.mark.parametrize("workers", [1, 2])
def test_a_shard_that_cannot_be_read_back_fails_its_run_never_its_check(photos, tmp_path, workers):
    """The committed tar gone before its read-back (a read error of the machinery, as an EIO or the
    checking workers killed again and again would be): the run fails naming it, no check problem is
    recorded against the shard, and it is not committed; the next build makes it."""
    out = tmp_path / "out"
    digest = write_slice(str(out), KEY, planned(photos.raw.rows, list(range(len(photos.raw.rows)))))
    with pytest.raises(verify.ReadBackFailed, match=f"cannot read back .*{NAME} to check it: FileNotFoundError"):
        build(out, photos.raw, workers=workers, after_commit=os.remove)
    assert not (out / "_manifests" / f"{KEY}.state.json").exists()
    assert shard_verdict(str(out), KEY, NAME, fingerprint(digest, ENC)) == "missing"
    assert build(out, photos.raw, workers=workers).problems == []
    assert shard_verdict(str(out), KEY, NAME, fingerprint(digest, ENC)) == "fresh"


def test_long_and_non_ascii_keys_are_written_and_read_back(tmp_path):
    names = ["n01440764_" + "9" * 150, "n01440764_ünïcødé_名前", "n01440764_1"]
    raw = release(tmp_path / "raw", 3, names)
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(raw.rows, [0, 1, 2]))
    result = build(out, raw)
    assert result.problems == [] and result.excluded == [] and result.num_samples == 3
    samples = list(wds.WebDataset([str(out / NAME)], shardshuffle=False))
    assert [s["__key__"] for s in samples] == names
    assert all(json.loads(s["json"])["filename"] == f"n01440764/{k}.JPEG" for s, k in zip(samples, names))
    with tarfile.open(out / NAME) as tf:
        assert [m.name for m in tf.getmembers()] == [f"{k}.{e}" for k in names for e in ("cls", "json", "webp")]


def test_ordinary_names_get_the_same_header_bytes_as_ustar():
    for name in ["n01440764_10026.webp", "n0_1.cls", "x" * 95 + ".json"]:
        ustar = sample_tar_mod._tarinfo(name, 1234).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        assert sample_tar_mod._tar_member(name, b"\0" * 1234)[0] == ustar


def test_two_shard_runs_in_two_threads_share_one_pool(photos, tmp_path):
    rows = photos.raw.rows
    outs = [tmp_path / "a", tmp_path / "b"]
    orders = [list(range(len(rows)))[::-1], list(range(len(rows)))]
    for out, order in zip(outs, orders):
        write_slice(str(out), KEY, planned(rows, order))
    results: dict = {}
    threads = [threading.Thread(target=lambda o=o: results.__setitem__(o, build(o, photos.raw))) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[o].problems == [] and results[o].num_samples == len(rows) for o in outs)
    assert (outs[0] / NAME).read_bytes() == photos.reference
    # The second, alone, gives the same bytes as it gave beside the first.
    alone = tmp_path / "alone"
    write_slice(str(alone), KEY, planned(rows, orders[1]))
    build(alone, photos.raw)
    assert (alone / NAME).read_bytes() == (outs[1] / NAME).read_bytes()


def test_a_raw_tar_replaced_between_shard_runs_is_read_anew_by_the_long_lived_workers(tmp_path):
    """The workers outlive a shard run; a raw tar rewritten since (re-indexed: other offsets) must
    be read from the new file, not from a descriptor the worker kept open."""
    raw = release(tmp_path / "raw", 8)
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(raw.rows, list(range(8))))
    assert build(out, raw).excluded == []
    moved = release(tmp_path / "raw-new", 9, [f"n01440764_{i}" for i in [99, *range(8)]])  # shifted offsets
    os.replace(moved.root / "n01440764.tar", raw.root / "n01440764.tar")
    write_slice(str(out), KEY, planned(moved.rows, list(range(9))))
    result = build(out, raw)
    assert result.excluded == [] and result.num_samples == 9 and result.problems == []


@pytest.mark.parametrize("workers", [1, 2])
def test_check_committed_from_a_manifest_alone(photos, tmp_path, workers):
    """The read-back without the writer's spans (as `imnet verify` has it: the manifest's records):
    the whole file is hashed, every sample is parsed, the sampled ones are decoded here."""
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(photos.raw.rows, list(range(len(photos.raw.rows)))))
    build(out, photos.raw)
    manifest = read_manifest(str(out), KEY)
    url = str(out / NAME)
    check = shard_mod.check_committed
    # what the .cls and .json must say comes from the plan: key, wnid, label, ..., sha256 per row
    rows = {r[0]: r for r in photos.raw.rows}
    samples = [dict(s, wnid=rows[s["key"]][1], label=rows[s["key"]][2], source_sha256=rows[s["key"]][7])
               for s in manifest["samples"]]
    assert check(url, samples, manifest["sha256"], False, decode_every=1, workers=workers) == []
    assert check(url, samples[:-1], manifest["sha256"], False, workers=workers)[0].startswith(
        f"holds {len(photos.raw.rows)} samples, plan wants {len(photos.raw.rows) - 1}")
    corrupt_an_image_byte(url)
    problems = check(url, samples, manifest["sha256"], False, decode_every=1, workers=workers)
    assert "tar sha256 differs from its manifest" in problems
    assert any("sha256 differs from the manifest" in p for p in problems), problems


# ----------------------------------------------------------------------------- which deaths count
# Codecs that misbehave on one image (module level, so the pool's workers import them by name;
# functools.partial carries the victim's source sha256). Every other image gets encode_image.


def _is(victim: str, data: bytes) -> bool:
    return hashlib.sha256(data).hexdigest() == victim


def slow_on(victim: str, seconds: float, data, settings):
    """Takes `seconds` more on the victim (so a test can catch its worker at it), then encodes it."""
    if _is(victim, data):
        time.sleep(seconds)
    return encode_image(data, settings)


def hang_on(victim: str, data, settings):
    """Never finishes the victim (a hung codec)."""
    if _is(victim, data):
        time.sleep(3600)
    return encode_image(data, settings)


def abort_on(victim: str, data, settings):
    """Aborts (SIGABRT, as a failed assertion in a codec does) on the victim."""
    if _is(victim, data):
        os.abort()
    return encode_image(data, settings)


def kill_while_encoding(pool, key: str, times: int, stop: threading.Event, killed: list[tuple[str, int]],
                        others: int = 0) -> None:
    """A real SIGKILL (as the OOM killer sends) of each worker caught encoding the image `key`, up to
    `times` times, and of up to `others` workers caught encoding other images, once per image.
    `killed`: (key, pid) of each kill."""
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        keys = [k for k, _ in killed]
        for pid, job, index in pool.working_on():
            if not isinstance(job, shard_jobs_mod.EncodeJob):  # the check's jobs: not encoding
                continue
            at = job.rows[index].key
            if keys.count(at) >= (times if at == key else 1) or (at != key and len(keys) - keys.count(key) >= others):
                continue
            os.kill(pid, signal.SIGKILL)
            killed.append((at, pid))
            time.sleep(0.05)  # let the pool see the death before looking again
            break
        time.sleep(0.002)


def test_an_oom_storm_retries_and_gives_the_same_shard(photos, tmp_path):
    """Repeated kill -9 of encode processes during a shard run (an OOM storm): the image caught
    most is killed KILLS_TO_FAIL - 1 times, four others once each. Nothing is excluded and the
    shard is byte for byte an undisturbed build's."""
    out = tmp_path / "out"
    rows = photos.raw.rows
    write_slice(str(out), KEY, planned(rows, list(range(len(rows)))[::-1]))
    victim = rows[20]
    pool = workerpool.shared_pool(2)
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_while_encoding,
                              args=(pool, victim[0], deaths.KILLS_TO_FAIL - 1, stop, killed, 4))
    killer.start()
    logs: list[str] = []
    try:
        result = build(out, photos.raw, log=logs.append, encode=functools.partial(slow_on, victim[7], 0.3))
    finally:
        stop.set()
        killer.join()
    on_victim = [pid for key, pid in killed if key == victim[0]]
    assert len(on_victim) == deaths.KILLS_TO_FAIL - 1 and len(killed) >= len(on_victim) + 2, killed
    assert not any(host.pid_alive(pid) for _, pid in killed)
    kills = [m for m in logs if "killed from outside" in m]
    assert sum(victim[0] in m for m in kills) == deaths.KILLS_TO_FAIL - 1, logs
    assert len(kills) == len(killed), logs  # each kill cost a retry of its image, nothing more
    assert result.excluded == [] and result.problems == [] and result.num_samples == len(rows)
    assert (out / NAME).read_bytes() == photos.reference
    assert shard_verdict(str(out), KEY, NAME, read_manifest(str(out), KEY)["fingerprint"]) == "fresh"


def test_an_image_killed_from_outside_every_time_fails_the_run_naming_it(photos, tmp_path):
    """SIGKILL of the worker holding the same image, every time: after KILLS_TO_FAIL kills the run
    fails naming the image, and commits nothing; it is never an exclusion."""
    out = tmp_path / "out"
    rows = photos.raw.rows[:8]
    write_slice(str(out), KEY, planned(rows, list(range(len(rows)))))
    victim = rows[3]
    pool = workerpool.shared_pool(2)
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_while_encoding, args=(pool, victim[0], 99, stop, killed))
    killer.start()
    try:
        with pytest.raises(shard_jobs_mod.EncoderKilled, match=rf"killed from outside \(signal 9.*\) "
                           rf"{deaths.KILLS_TO_FAIL} times while encoding {victim[0]} \(n01440764.tar@"):
            build(out, photos.raw, encode=functools.partial(slow_on, victim[7], 0.3))
    finally:
        stop.set()
        killer.join()
    assert [key for key, _ in killed] == [victim[0]] * deaths.KILLS_TO_FAIL
    assert sorted(os.listdir(out)) == ["_plan"]  # no shard, no manifest, no commit record


def test_a_hung_codec_is_killed_past_the_time_limit_and_fails_its_run_alone(photos, tmp_path, monkeypatch):
    """An image whose codec never returns: past IMNET_IMAGE_TIMEOUT (1 s here) its worker is killed
    and the image retried in a fresh one; after TIMEOUTS_TO_FAIL tries the run fails naming it, and
    commits nothing. A shard run beside it, on the same pool, is built whole meanwhile."""
    monkeypatch.setenv("IMNET_IMAGE_TIMEOUT", "1")
    rows = photos.raw.rows
    hung_out, other_out = tmp_path / "hung", tmp_path / "other"
    write_slice(str(hung_out), KEY, planned(rows[:8], list(range(8))))
    write_slice(str(other_out), KEY, planned(rows, list(range(len(rows)))[::-1]))
    victim = rows[2]
    pool = workerpool.shared_pool(2)
    seen: set[int] = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.update(pid for pid, job, i in pool.working_on()  # the hung run's, not the other's
                        if isinstance(job, shard_jobs_mod.EncodeJob) and job.encode is not None
                        and job.rows[i].key == victim[0])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    other: dict = {}
    beside = threading.Thread(target=lambda: other.setdefault("result", build(other_out, photos.raw)))
    logs: list[str] = []
    started = time.monotonic()
    try:
        beside.start()
        with pytest.raises(shard_jobs_mod.EncoderKilled, match=rf"encoding {victim[0]} \(n01440764.tar@\d+\) ran past "
                           rf"IMNET_IMAGE_TIMEOUT \(1 s\) {deaths.TIMEOUTS_TO_FAIL} times"):
            build(hung_out, photos.raw, log=logs.append, encode=functools.partial(hang_on, victim[7]))
    finally:
        beside.join()
        stop.set()
        watcher.join()
    assert time.monotonic() - started < 60
    assert sum("ran past IMNET_IMAGE_TIMEOUT" in m for m in logs) == deaths.TIMEOUTS_TO_FAIL, logs
    assert sorted(os.listdir(hung_out)) == ["_plan"]
    assert len(seen) == deaths.TIMEOUTS_TO_FAIL and not any(host.pid_alive(p) for p in seen)
    assert other["result"].problems == [] and (other_out / NAME).read_bytes() == photos.reference


def test_an_image_that_aborts_its_encoder_twice_is_excluded(photos, tmp_path):
    """SIGABRT (a codec's failed assertion) is a crash the image causes: twice, it is excluded
    naming the crashes; every other sample is the undisturbed build's."""
    out = tmp_path / "out"
    rows = photos.raw.rows
    write_slice(str(out), KEY, planned(rows, list(range(len(rows)))[::-1]))
    victim = rows[7]
    result = build(out, photos.raw, encode=functools.partial(abort_on, victim[7]))
    manifest = read_manifest(str(out), KEY)
    assert manifest["excluded"] == [{"key": victim[0], "position": len(rows) - 1 - 7,
                                     "reason": "encoder process died 2 times (signal 6, signal 6) while encoding"}]
    assert result.problems == [] and result.num_samples == len(rows) - 1
    assert manifest["samples"] == [s for s in photos.manifest["samples"] if s["key"] != victim[0]]


def test_an_unreadable_reply_fails_one_job_while_a_shard_run_beside_it_succeeds(photos, tmp_path):
    """A job on the shared pool whose reply cannot be unpickled fails alone: a shard run sharing
    the pool at the same time is built whole, byte for byte."""
    from tests.core.test_procpool import ReplyJob

    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(photos.raw.rows, list(range(len(photos.raw.rows)))[::-1]))
    pool = workerpool.shared_pool(2)
    bad = [pool.submit(ReplyJob(unloadable_reply=True)) for _ in range(3)]
    result = build(out, photos.raw)
    bad += [pool.submit(ReplyJob(unloadable_reply=True)) for _ in range(3)]
    for f in bad:
        with pytest.raises(workerpool.ReplyUnreadable):
            f.result(timeout=60)
    assert result.problems == [] and (out / NAME).read_bytes() == photos.reference


@dataclasses.dataclass
class KilledJob:
    """A job whose worker is SIGKILLed (as by the OOM killer) on its first `kills` tries: each try
    leaves a file in `tries`, so a fresh worker knows how many came before."""

    tries: str
    kills: int

    def prefetch(self, readers):
        return None

    def run(self, state, mark):
        mark(0)
        done = len(os.listdir(self.tries))
        with open(os.path.join(self.tries, str(done)), "w"):
            pass
        if done < self.kills:
            os.kill(os.getpid(), signal.SIGKILL)
        return f"after {done} kills"


def test_the_checks_chunk_whose_worker_is_killed_is_checked_again(tmp_path):
    """The in-run check (verify.check_committed) runs its chunks on the shared pool: a chunk whose
    worker is killed from outside is run again in a fresh worker, up to CHECK_RETRIES times, then
    the check fails (a problem, so the shard is not recorded as committed), never more."""
    from imnet_assets.release import verify

    pool = workerpool.shared_pool(2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert verify._run_in_pool(pool, [KilledJob(str(tmp_path / "a"), verify.CHECK_RETRIES)], 0) == [
        f"after {verify.CHECK_RETRIES} kills"]
    with pytest.raises(workerpool.WorkerDied, match="signal 9"):
        verify._run_in_pool(pool, [KilledJob(str(tmp_path / "b"), 99)], 0)
    assert len(os.listdir(tmp_path / "b")) == verify.CHECK_RETRIES + 1


@pytest.mark.parametrize("rows,workers", [(300, 2), (40, 2), (5, 2), (300, 1), (12843, 64), (0, 2)])
def test_a_runs_jobs_cover_its_rows_in_order_and_end_one_image_a_job(rows, workers):
    """The last TAIL_SINGLES_PER_WORKER images per worker go one a job (so the workers of the
    build's last shard end together); with one worker (no other to end with) the jobs stay whole."""
    spans = list(shard_jobs_mod.job_spans(rows, workers))
    assert [i for a, b in spans for i in range(a, b)] == list(range(rows))
    sizes = [b - a for a, b in spans]
    assert max(sizes, default=1) <= shard_jobs_mod.BATCH
    singles = min(rows, shard_jobs_mod.TAIL_SINGLES_PER_WORKER * workers) if workers > 1 else 0
    assert sizes[len(sizes) - singles:] == [1] * singles
    if workers == 1:
        assert sizes[:-1] == [shard_jobs_mod._batch_size(rows, 1)] * (len(sizes) - 1)
    # the singles go only to a worker with a free hand (workerpool's `hold`), never queued behind a batch
    rows_of = [types.SimpleNamespace(position=i) for i in range(rows)]
    jobs = list(shard_jobs_mod.encode_jobs(rows_of, "/nowhere", EncodeSettings(), workers, 16))
    assert [len(j.rows) for j in jobs] == sizes
    holds = [j.hold for j in jobs]
    assert holds[len(holds) - singles:] == [shard_jobs_mod.TAIL_HOLD] * singles
    assert holds[:len(holds) - singles] == [None] * (len(holds) - singles)
