"""Encoding ahead of a shard run (stages/shard_ahead.py, what `imnet build` submits while it starts):
the run takes over the jobs submitted ahead, each source is encoded once and the shard is byte for
byte the one built without them; jobs made for another plan are not taken over (the shard is the
current plan's); jobs no run took are cancelled."""

from __future__ import annotations

import dataclasses
import hashlib
import os

from imnet_assets.image.encode import encode_image
from imnet_assets.release.outroot import read_manifest
from imnet_assets.release.plan import write_slice
from imnet_assets.stages import shard_ahead
from tests.core.test_shard import planned
from tests.core.test_shard_workers import ENC, KEY, NAME, build, photos  # noqa: F401 - photos: a fixture


@dataclasses.dataclass(frozen=True)
class CountingCodec:
    """encode_image, appending the source's sha256 to a file per call (across worker processes)."""

    path: str

    def __call__(self, data: bytes, settings):
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, hashlib.sha256(data).hexdigest().encode() + b"\n")
        finally:
            os.close(fd)
        return encode_image(data, settings)

    def calls(self) -> list[str]:
        return open(self.path).read().split() if os.path.exists(self.path) else []


def reversed_rows(photos):  # noqa: F811
    return planned(photos.raw.rows, list(range(len(photos.raw.rows)))[::-1])  # the reference's order


def test_jobs_encoded_ahead_are_taken_over_once_and_the_shard_is_byte_identical(photos, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(shard_ahead, "AHEAD_IMAGES_PER_WORKER", 6)  # 12 of the 32 images ahead: 3 jobs of 4
    out = tmp_path / "out"
    write_slice(str(out), KEY, reversed_rows(photos))
    codec = CountingCodec(str(tmp_path / "calls"))
    ahead = shard_ahead.start(str(out), str(photos.raw.root), KEY, ENC, 2, 16, encode=codec)
    assert ahead.images == 12 and len(ahead.jobs) == 3
    for _job, future in ahead.jobs:
        future.result(timeout=120)  # encoded before the run starts
    assert len(codec.calls()) == 12
    taken = shard_ahead.take(str(out), KEY)
    assert taken is ahead and shard_ahead.take(str(out), KEY) is None  # taken once
    result = build(out, photos.raw, ahead=taken, encode=codec)
    assert result.problems == [] and result.num_samples == 32
    assert (out / NAME).read_bytes() == photos.reference
    calls = codec.calls()
    assert len(calls) == 32 and len(set(calls)) == 32  # every source encoded once: none again by the run


def test_jobs_made_for_another_plan_are_not_taken_over(photos, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    write_slice(str(out), KEY, reversed_rows(photos))
    ahead = shard_ahead.start(str(out), str(photos.raw.root), KEY, ENC, 2, 16)
    forward = planned(photos.raw.rows, list(range(len(photos.raw.rows))))
    write_slice(str(out), KEY, forward)  # the plan changed before the run started
    result = build(out, photos.raw, ahead=shard_ahead.take(str(out), KEY))
    assert result.problems == [] and result.num_samples == 32
    keys = [s["key"] for s in read_manifest(str(out), KEY)["samples"]]
    assert keys == [row[0] for row in photos.raw.rows]  # the current plan's order, not the one encoded ahead
    assert all(f.done() for _j, f in ahead.jobs)  # taken over by nothing, cancelled or finished


def test_jobs_no_run_took_are_cancelled(photos, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    write_slice(str(out), KEY, reversed_rows(photos))
    ahead = shard_ahead.start(str(out), str(photos.raw.root), KEY, ENC, 2, 16)
    shard_ahead.drop()
    assert shard_ahead.take(str(out), KEY) is None
    for _job, future in ahead.jobs:
        assert future.cancelled() or future.result(timeout=120)  # queued ones never run
