"""IMNET_WORKERS=1 encodes in one worker process of the shared pool, never in the shard run's own
process, so every rule of SPEC "Failure behaviour" holds as with more workers. Caused for real:
an image that segfaults its encoder (the IMNET_TEST_CRASH_SHA256 hook, which fires only in a pool
worker) or aborts it is excluded naming the crashes, and the run's process lives on; a hung codec
is killed past IMNET_IMAGE_TIMEOUT and fails the run naming the image; an image whose worker is
SIGKILLed from outside a few times gives the undisturbed shard, every time fails the run naming it;
nothing is ever excluded for a kill or a hang, nothing committed when the run fails."""

from __future__ import annotations

import functools
import os
import threading
import time
import types

import pytest

from imnet_assets.release.outroot import read_manifest
from imnet_assets.release.plan import write_slice
from imnet_assets.runtime import deaths, host, workerpool
from imnet_assets.stages import shard_jobs
from tests.conftest import shard_verdict
from tests.core.test_shard import planned
from tests.core.test_shard_workers import (
    KEY,
    NAME,
    abort_on,
    build,
    hang_on,
    kill_while_encoding,
    release,
    slow_on,
)

IMAGES = 8


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one_worker")
    raw = release(tmp / "raw", IMAGES)
    out = tmp / "reference"
    write_slice(str(out), KEY, planned(raw.rows, list(range(IMAGES))))
    assert build(out, raw, workers=1).num_samples == IMAGES
    return types.SimpleNamespace(raw=raw, reference=(out / NAME).read_bytes(), manifest=read_manifest(str(out), KEY))


def slice_in(tmp_path, photos):
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(photos.raw.rows, list(range(IMAGES))))
    return out


@pytest.mark.parametrize("how", ["segfault (the test hook)", "abort"])
def test_an_image_that_crashes_the_encoder_is_excluded_and_the_run_lives_on(photos, tmp_path, monkeypatch, how):
    out = slice_in(tmp_path, photos)
    victim = photos.raw.rows[3]
    codec = None
    if how == "abort":
        codec = functools.partial(abort_on, victim[7])
    else:
        monkeypatch.setenv("IMNET_TEST_CRASH_SHA256", victim[7])
    logs: list[str] = []
    result = build(out, photos.raw, workers=1, log=logs.append, encode=codec)
    signals = "signal 6, signal 6" if how == "abort" else "signal 11, signal 11"
    assert result.excluded == [{"key": victim[0], "position": 3,
                                "reason": f"encoder process died 2 times ({signals}) while encoding"}]
    assert any("control image passed the encoder" in m for m in logs), logs
    manifest = read_manifest(str(out), KEY)
    assert manifest["samples"] == [s for s in photos.manifest["samples"] if s["key"] != victim[0]]
    assert shard_verdict(str(out), KEY, NAME, manifest["fingerprint"]) == "fresh"
    assert workerpool.shared_pool(1).size == 1


def test_a_hung_codec_is_killed_past_the_time_limit_and_fails_the_run_naming_the_image(photos, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setenv("IMNET_IMAGE_TIMEOUT", "1")
    out = slice_in(tmp_path, photos)
    victim = photos.raw.rows[2]
    started = time.monotonic()
    logs: list[str] = []
    with pytest.raises(shard_jobs.EncoderKilled, match=rf"encoding {victim[0]} \(n01440764.tar@\d+\) ran past "
                       rf"IMNET_IMAGE_TIMEOUT \(1 s\) {deaths.TIMEOUTS_TO_FAIL} times"):
        build(out, photos.raw, workers=1, log=logs.append, encode=functools.partial(hang_on, victim[7]))
    assert time.monotonic() - started < 60
    assert sum("ran past IMNET_IMAGE_TIMEOUT" in m for m in logs) == deaths.TIMEOUTS_TO_FAIL, logs
    assert sorted(os.listdir(out)) == ["_plan"]  # nothing committed, nothing excluded


@pytest.mark.parametrize("kills", [deaths.KILLS_TO_FAIL - 1, 99])
def test_an_image_killed_from_outside_costs_retries_then_fails_the_run(photos, tmp_path, kills):
    """SIGKILL (as the OOM killer sends) of the one worker while it encodes the victim: up to
    KILLS_TO_FAIL - 1 times the shard is the undisturbed one byte for byte; every time, the run fails
    naming the image and commits nothing."""
    out = slice_in(tmp_path, photos)
    victim = photos.raw.rows[5]
    pool = workerpool.shared_pool(1)
    killed: list[tuple[str, int]] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_while_encoding, args=(pool, victim[0], kills, stop, killed))
    killer.start()
    codec = functools.partial(slow_on, victim[7], 0.3)  # long enough on the victim to be caught at it
    try:
        if kills < deaths.KILLS_TO_FAIL:
            result = build(out, photos.raw, workers=1, encode=codec)
        else:
            with pytest.raises(shard_jobs.EncoderKilled, match=rf"killed from outside \(signal 9.*\) "
                               rf"{deaths.KILLS_TO_FAIL} times while encoding {victim[0]} "):
                build(out, photos.raw, workers=1, encode=codec)
    finally:
        stop.set()
        killer.join()
    assert all(pid != os.getpid() and not host.pid_alive(pid) for _k, pid in killed)
    assert [k for k, _ in killed] == [victim[0]] * min(kills, deaths.KILLS_TO_FAIL)
    if kills < deaths.KILLS_TO_FAIL:
        assert result.excluded == [] and result.problems == []
        assert (out / NAME).read_bytes() == photos.reference
    else:
        assert sorted(os.listdir(out)) == ["_plan"]
