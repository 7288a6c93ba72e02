"""Shard runs on the shared worker pool: a worker killed mid-shard (a real SIGKILL) costs a retry,
not the shard, and leaves it byte-identical; an image that kills its encoder every time (a real
segfault, through the IMNET_TEST_CRASH_SHA256 test hook) is excluded naming the crash; a check that
fails (a byte of the committed tar corrupted between commit and check) leaves the shard not fresh;
keys longer than a ustar name or not ASCII are written (pax records) and read back by webdataset;
two shard runs in two threads share one pool."""

from __future__ import annotations

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

from imnet_assets.core import procpool
from imnet_assets.core import shard as shard_mod
from imnet_assets.core.encode import EncodeSettings
from imnet_assets.core.plan import write_slice
from imnet_assets.core.shard import build_shard, fingerprint, read_manifest, shard_state
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
    return types.SimpleNamespace(raw=raw, reference=(out / NAME).read_bytes(), tmp=tmp)


def test_a_worker_killed_mid_shard_is_replaced_and_the_shard_is_byte_identical(photos, tmp_path):
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(photos.raw.rows, list(range(len(photos.raw.rows)))[::-1]))
    pool = procpool.shared_pool(2)
    started_before = pool.started
    killed: list[int] = []

    def kill_one_while_encoding():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            with pool._lock:
                busy = [w for w in pool._workers if w.slot[1] >= 0 and w.proc.pid]
            if busy:  # a worker inside encode_image: kill it for real
                os.kill(busy[0].proc.pid, signal.SIGKILL)
                killed.append(busy[0].proc.pid)
            time.sleep(0.001)

    killer = threading.Thread(target=kill_one_while_encoding)
    killer.start()
    logs: list[str] = []
    try:
        result = build(out, photos.raw, log=logs.append)
    finally:
        killer.join()
    assert killed, "the worker was never caught encoding"
    assert not procpool.pid_alive(killed[0])
    assert any("encoder process died (signal 9)" in m for m in logs), logs
    assert pool.started > started_before  # replaced
    assert killed[0] not in pool.pids()
    assert result.excluded == [] and result.problems == []
    assert (out / NAME).read_bytes() == photos.reference
    assert shard_state(str(out), KEY, NAME, read_manifest(str(out), KEY)["fingerprint"]) == "fresh"


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
    assert shard_state(str(out), KEY, NAME, manifest["fingerprint"]) == "fresh"
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
    with pytest.raises(shard_mod.EncoderOutOfMemory, match="out of memory"):
        build(out, photos.raw, workers=workers, encode=out_of_memory, log=logs.append)
    assert sorted(os.listdir(out)) == ["_plan"]
    if workers > 1:
        tries = [m for m in logs if "ran out of memory on n01440764_0" in m]
        assert len(tries) == shard_mod.MEMORY_RETRIES, logs


def corrupt_a_webp_byte(url: str) -> None:
    with tarfile.open(url) as tf:
        webp = next(m for m in tf.getmembers() if m.name.endswith(".webp"))
    with open(url, "r+b") as f:
        f.seek(webp.offset_data + webp.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x55]))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_check_leaves_the_shard_not_fresh(photos, tmp_path, workers):
    out = tmp_path / "out"
    digest = write_slice(str(out), KEY, planned(photos.raw.rows, list(range(len(photos.raw.rows)))[::-1]))
    want = fingerprint(digest, ENC)
    assert build(out, photos.raw, workers=workers).problems == []
    assert shard_state(str(out), KEY, NAME, want) == "fresh"
    # Rebuilt, and a byte of the committed tar flipped before the check reads it back.
    result = build(out, photos.raw, workers=workers, after_commit=corrupt_a_webp_byte)
    assert any("sha256 differs from the manifest" in p for p in result.problems), result.problems
    assert any("tar sha256 differs" in p for p in result.problems), result.problems
    assert not (out / "_manifests" / f"{KEY}.state.json").exists()
    assert shard_state(str(out), KEY, NAME, want) == "missing"  # the next build, schedule, sensor redo it
    assert build(out, photos.raw, workers=workers).problems == []
    assert shard_state(str(out), KEY, NAME, want) == "fresh"
    assert (out / NAME).read_bytes() == photos.reference


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
        ustar = shard_mod._tarinfo(name, 1234).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        assert shard_mod._tar_member(name, b"\0" * 1234)[0] == ustar


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
    corrupt_a_webp_byte(url)
    problems = check(url, samples, manifest["sha256"], False, decode_every=1, workers=workers)
    assert "tar sha256 differs from its manifest" in problems
    assert any("sha256 differs from the manifest" in p for p in problems), problems
