"""The machinery guard for crashes (stages/crash_control.py; SPEC "Failure behaviour"): an image that
crashes its encode worker twice is excluded only once the known-good control image of its kind
passed the same encoder in a fresh worker. Real pool workers, real segfaults and aborts, real JPEGs:
one crashing image is still excluded with its crash reason and the others are built, the control
running once per kind for the run however many images of that kind crash; a codec that crashes on
every input (IMNET_TEST_CRASH_SHA256=*, the control's encode included) fails the shard run with a
MachineryFault naming the signal, with no exclusion, no shard tar and no manifest; the run after the
fix builds every image. A control whose worker is killed from outside every time fails the run
(ControlUnsettled): the exclusion is never recorded unchecked."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import signal
import threading
import time

import pytest
from PIL import Image

from imnet_assets.image.encode import encode_image
from imnet_assets.image.guard import MachineryFault
from imnet_assets.release.outroot import read_manifest
from imnet_assets.release.plan import write_slice
from imnet_assets.runtime import workerpool
from imnet_assets.settings import CRASH_EVERY
from imnet_assets.stages import crash_control
from tests.core.test_shard import planned
from tests.core.test_shard_workers import KEY, NAME, build, release

CRASH_REASON = "encoder process died 2 times (signal 11, signal 11) while encoding"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return release(tmp_path_factory.mktemp("crash_control") / "raw", 6)


def slice_of(out, photos):
    write_slice(str(out), KEY, planned(photos.rows, list(range(len(photos.rows)))))


def controls_passed(logs: list[str]) -> list[str]:
    return [m for m in logs if "control image passed the encoder" in m]


def test_one_crashing_image_is_excluded_once_its_control_passes(photos, tmp_path, monkeypatch):
    out = tmp_path / "out"
    slice_of(out, photos)
    victim = photos.rows[2]
    monkeypatch.setenv("IMNET_TEST_CRASH_SHA256", victim[7])
    logs: list[str] = []
    result = build(out, photos, workers=2, log=logs.append)
    assert result.excluded == [{"key": victim[0], "position": 2, "reason": CRASH_REASON}]
    assert result.num_samples == len(photos.rows) - 1 and result.problems == []
    manifest = read_manifest(str(out), KEY)
    assert [s["key"] for s in manifest["samples"]] == [r[0] for r in photos.rows if r is not victim]
    assert controls_passed(logs) == [
        "a known-good JPEG RGB 2069x1552 control image passed the encoder: the crashes are the image's own"], logs


def abort_on(victims: frozenset, data, settings):
    """Aborts (SIGABRT, a codec's failed assertion) on the victims' bytes (module level: the pool's
    workers import it by name)."""
    if hashlib.sha256(data).hexdigest() in victims:
        os.abort()
    return encode_image(data, settings)


def test_the_control_runs_once_per_kind_in_a_run_however_many_images_crash(photos, tmp_path):
    out = tmp_path / "out"
    slice_of(out, photos)
    victims = [photos.rows[1], photos.rows[4]]
    logs: list[str] = []
    codec = functools.partial(abort_on, frozenset(v[7] for v in victims))
    result = build(out, photos, workers=2, log=logs.append, encode=codec)
    reason = "encoder process died 2 times (signal 6, signal 6) while encoding"
    assert result.excluded == [{"key": v[0], "position": p, "reason": reason} for v, p in zip(victims, (1, 4))]
    assert result.num_samples == len(photos.rows) - 2 and result.problems == []
    assert len(controls_passed(logs)) == 1, logs  # the second victim's kind had passed: no second control


def test_a_codec_crashing_on_every_input_fails_the_run_and_the_run_after_the_fix_builds_every_image(
        photos, tmp_path, monkeypatch):
    out = tmp_path / "out"
    slice_of(out, photos)
    monkeypatch.setenv("IMNET_TEST_CRASH_SHA256", CRASH_EVERY)
    logs: list[str] = []
    with pytest.raises(MachineryFault) as e:
        build(out, photos, workers=2, log=logs.append)
    message = str(e.value)
    assert message.startswith("machinery fault: the encoder's process died 2 times (signal 11 (SIGSEGV), "
                              "signal 11 (SIGSEGV)) while encoding n01440764_"), message
    assert ("and a known-good JPEG RGB 2069x1552 control image made in memory crashed the encoder's process the "
            "same way (signal 11 (SIGSEGV))") in message, message
    assert "nothing was recorded as excluded" in message
    assert sorted(os.listdir(out)) == ["_plan"]  # no shard tar, no manifest (no exclusion recorded)
    assert not controls_passed(logs)
    monkeypatch.delenv("IMNET_TEST_CRASH_SHA256")  # the fix
    result = build(out, photos, workers=2)
    assert result.excluded == [] and result.num_samples == len(photos.rows) and result.problems == []
    assert read_manifest(str(out), KEY)["excluded"] == []
    assert (out / NAME).exists()


def abort_on_and_slow_on_controls(victims: frozenset, data, settings):
    """abort_on, and a control image (2069 px wide) takes a second, so a test can catch its worker."""
    if Image.open(io.BytesIO(data)).width == 2069:
        time.sleep(1.0)
    return abort_on(victims, data, settings)


def test_a_control_killed_from_outside_every_time_fails_the_run_and_excludes_nothing(photos, tmp_path):
    out = tmp_path / "out"
    slice_of(out, photos)
    victim = photos.rows[3]
    pool = workerpool.shared_pool(2)
    stop = threading.Event()
    killed: list[int] = []

    def kill_controls():
        while not stop.is_set():
            for pid, job, _index in pool.working_on():
                if isinstance(job, crash_control.ControlJob) and pid not in killed:
                    os.kill(pid, signal.SIGKILL)  # as the OOM killer would
                    killed.append(pid)
            time.sleep(0.005)

    killer = threading.Thread(target=kill_controls)
    killer.start()
    try:
        with pytest.raises(crash_control.ControlUnsettled, match=r"deciding whether the crashes are the image's own "
                                                                 r"\(the encoder's process died 2 times .*signal 6 "
                                                                 r"\(SIGABRT\).*died 4 times \(signal 9"):
            build(out, photos, workers=2, encode=functools.partial(abort_on_and_slow_on_controls,
                                                                   frozenset({victim[7]})))
    finally:
        stop.set()
        killer.join()
    assert len(killed) == crash_control.CONTROL_RETRIES
    assert sorted(os.listdir(out)) == ["_plan"]
