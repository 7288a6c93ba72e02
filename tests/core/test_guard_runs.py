"""A machinery fault (image/guard.py) fails the shard run or the index stage that meets it and
records nothing: no shard tar or manifest at its final path, no catalog rows for the tars; once
the fault is gone, the same run builds every image. The shard runs' faults travel from real pool
workers (IMNET_WORKERS=2: the historical bug, a memoryview handed to the chain, in a codec the
workers import by name; IMNET_WORKERS=1, its one worker: a bug patched into the real chain). An image
that fails alone, with a type a bug raises too, is still its exclusion in a pooled run."""

from __future__ import annotations

import functools
import hashlib
import io
import os

import duckdb
import pytest
from PIL import Image

from imnet_assets.image import encode as encode_mod
from imnet_assets.image import probe as probe_mod
from imnet_assets.image.encode import encode_image
from imnet_assets.image.guard import MachineryFault
from imnet_assets.release.outroot import read_manifest
from imnet_assets.release.plan import write_slice
from imnet_assets.stages.filtered_index import build_filtered_index
from imnet_assets.stages.raw_tars import build_raw_tars
from imnet_assets.stages.synset_manifest import build_synset_manifest
from tests.conftest import local_settings
from tests.core.test_guard import array_interface_broken, broken_header, raise_attribute_error
from tests.core.test_shard import jpeg, planned, write_raw_tar
from tests.core.test_shard_workers import KEY, NAME, build, release
from tests.core.worker_patch import patched_worker


def memoryview_codec(data, settings):
    """The chain handed a memoryview where it expects bytes (the bug met once in development: then
    every image was excluded as "unreadable header: AttributeError ..."). Module level: the pool's
    workers import it by name."""
    return encode_image(memoryview(data), settings)


def chain_with_a_bug(data, settings):
    """The real chain with a bug inside it (filter_exif raising, patched only while this call runs,
    in the pool worker that runs it: the pool's workers outlive the test)."""
    real = encode_mod.filter_exif
    encode_mod.filter_exif = raise_attribute_error
    try:
        return encode_image(data, settings)
    finally:
        encode_mod.filter_exif = real


def type_error_on(victim_sha256: str, data, settings):
    if hashlib.sha256(data).hexdigest() == victim_sha256:
        raise TypeError("'NoneType' object is not subscriptable")
    return encode_image(data, settings)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return release(tmp_path_factory.mktemp("guard") / "raw", 6)


def fails_then_builds(out, photos, workers, **broken):
    write_slice(str(out), KEY, planned(photos.rows, list(range(len(photos.rows)))))
    with pytest.raises(MachineryFault) as e:
        build(out, photos, workers=workers, **broken)
    assert sorted(os.listdir(out)) == ["_plan"]  # no shard tar, no manifest, no commit record
    return str(e.value)


def test_a_machinery_fault_in_the_pool_fails_the_shard_run_and_the_next_run_builds_every_image(photos, tmp_path):
    message = fails_then_builds(tmp_path / "out", photos, 2, encode=memoryview_codec)
    assert message.startswith("machinery fault: encoding (quality 80, method 2, max_short 768) failed with "
                              "AttributeError: 'memoryview' object"), message
    assert "known-good JPEG RGB 2069x1552 control image made in memory too" in message
    assert "(met on n01440764_" in message and "nothing was committed" in message
    result = build(tmp_path / "out", photos, workers=2)
    assert result.excluded == [] and result.num_samples == len(photos.rows) and result.problems == []


def test_a_bug_in_the_chain_fails_a_one_worker_shard_run(photos, tmp_path):
    """IMNET_WORKERS=1: the fault travels from the run's one pool worker as from any."""
    message = fails_then_builds(tmp_path / "out", photos, 1, encode=chain_with_a_bug)
    assert "failed with AttributeError: 'memoryview' object has no attribute 'startswith' (raised at " in message
    assert "known-good JPEG RGB 2069x1552 control image" in message
    result = build(tmp_path / "out", photos, workers=1)
    assert result.excluded == [] and result.num_samples == len(photos.rows)


def test_an_image_failing_alone_with_an_unexpected_type_is_its_exclusion_in_a_pooled_run(photos, tmp_path):
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(photos.rows, list(range(len(photos.rows)))))
    victim = photos.rows[3]
    result = build(out, photos, workers=2, encode=functools.partial(type_error_on, victim[7]))
    assert result.excluded == [{"key": victim[0], "position": 3,
                                "reason": "encoder error: TypeError: 'NoneType' object is not subscriptable"}]
    assert result.num_samples == len(photos.rows) - 1 and result.problems == []
    assert (out / NAME).exists() and read_manifest(str(out), KEY)["excluded"] == result.excluded


def index_rows(settings) -> list[tuple]:
    with duckdb.connect(settings.catalog, read_only=True) as con:
        return con.execute("SELECT member, status, reason FROM images ORDER BY member").fetchall()


def test_a_bug_in_the_probe_fails_the_index_stage_and_records_no_image(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    png = io.BytesIO()
    Image.new("RGB", (80, 60), (20, 90, 160)).save(png, "PNG")
    members = [("n01_1.JPEG", jpeg(120, 80, 1)), ("n01_2.JPEG", jpeg(64, 64, 2)), ("n01_3.JPEG", png.getvalue()),
               ("n01_4.JPEG", broken_header())]
    write_raw_tar(raw / "n00000001.tar", members)
    settings = local_settings(raw, tmp_path)
    quiet = lambda _m: None  # noqa: E731
    build_raw_tars(settings, "run", quiet)
    build_synset_manifest(settings, "run", quiet)
    # the scan probes in a worker process (stages/scan_pool.py), where the bug is put
    with patched_worker(probe_mod.__name__, "plan_decode", raise_attribute_error), \
            pytest.raises(MachineryFault, match=r"probing the header failed with AttributeError.*met on n00000001\.tar"):
        build_filtered_index(settings, "run", quiet)
    assert index_rows(settings) == []  # nothing recorded, not one exclusion
    build_filtered_index(settings, "run", quiet)
    rows = index_rows(settings)
    assert [(m, s) for m, s, _ in rows] == [("n01_1.JPEG", "kept"), ("n01_2.JPEG", "kept"), ("n01_3.JPEG", "kept"),
                                            ("n01_4.JPEG", "excluded")]
    assert rows[3][2].startswith("unreadable header: ")  # the corrupt one keeps its reason


def eval_rows(settings) -> list[tuple]:
    with duckdb.connect(settings.catalog, read_only=True) as con:
        return con.execute("SELECT file, phash IS NOT NULL FROM eval_images ORDER BY file").fetchall()


def test_a_broken_perceptual_hash_fails_the_index_and_decontamination_and_records_nothing(tmp_path, monkeypatch):
    """A numpy/Pillow incompatibility in the pHash (image/perceptual.py) would give every image no
    pHash, and eval near-copy matching would stop with every check green: it fails the index's scan
    and the eval set's hashing instead, naming the fault; a file that does not decode still gets
    no pHash and the stage goes on."""
    raw, ev = tmp_path / "raw", tmp_path / "eval"
    raw.mkdir()
    ev.mkdir()
    members = [("n01_1.JPEG", jpeg(120, 80, 1)), ("n01_2.JPEG", jpeg(96, 64, 2)), ("n01_3.JPEG", broken_header())]
    write_raw_tar(raw / "n00000001.tar", members)
    (ev / "val_1.JPEG").write_bytes(jpeg(96, 64, 7))
    (ev / "README.txt").write_text("not an image")
    settings = local_settings(raw, tmp_path, IMNET_EVAL_EXCLUDE=str(ev))
    quiet = lambda _m: None  # noqa: E731
    build_raw_tars(settings, "run", quiet)
    build_synset_manifest(settings, "run", quiet)
    # the raw images and the eval set are hashed in a worker process (stages/scan_pool.py, eval_pool.py)
    with patched_worker("PIL.Image", "Image.__array_interface__", array_interface_broken, as_property=True), \
            pytest.raises(MachineryFault, match=r"perceptual hashing \(32x32 grey thumbnail\) failed with TypeError.*"
                                                r"known-good JPEG RGB 341x256 control.*met on n00000001\.tar member n01_1"):
        build_filtered_index(settings, "run", quiet)
    assert index_rows(settings) == []  # nothing recorded, not one image without its pHash
    build_filtered_index(settings, "run", quiet)
    assert [(m, s) for m, s, _ in index_rows(settings)] == [("n01_1.JPEG", "kept"), ("n01_2.JPEG", "kept"),
                                                           ("n01_3.JPEG", "excluded")]
    with duckdb.connect(settings.catalog, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM images WHERE status = 'kept' AND phash IS NOT NULL").fetchone()[0] == 2
    assert eval_rows(settings) == [("README.txt", False), ("val_1.JPEG", True)]  # no pHash, and the stage went on
    with duckdb.connect(settings.catalog, read_only=True) as con:  # why README.txt has none
        assert con.execute("SELECT no_phash FROM eval_images WHERE file = 'README.txt'").fetchone()[0].startswith(
            "does not decode: UnidentifiedImageError: cannot identify image file")
    (ev / "val_2.JPEG").write_bytes(jpeg(120, 80, 3))  # the eval set changed: hashed again, on a broken machine
    with patched_worker("PIL.Image", "Image.__array_interface__", array_interface_broken, as_property=True), \
            pytest.raises(MachineryFault, match=r"perceptual hashing .* failed with .*met on eval file "):
        build_filtered_index(settings, "run", quiet)
    assert eval_rows(settings) == [("README.txt", False), ("val_1.JPEG", True)]  # as it was
    build_filtered_index(settings, "run", quiet)
    assert eval_rows(settings) == [("README.txt", False), ("val_1.JPEG", True), ("val_2.JPEG", True)]


def quoting_error_on(victim_sha256: str, data, settings):
    """A codec whose error on one image quotes that image's bytes, as a decoder's message can."""
    if hashlib.sha256(data).hexdigest() == victim_sha256:
        raise ValueError(f"cannot decode {bytes(data)!r}")
    return encode_image(data, settings)


def test_a_reason_quoting_the_image_is_cut_and_the_same_at_every_build(photos, tmp_path):
    """The exclusion's reason, in the manifest, holds the first 500 characters of the message and
    its length; a second build gives the same reason and the same shard bytes."""
    victim = photos.rows[3]
    data = (photos.root / victim[3]).read_bytes()[victim[5]:victim[5] + victim[6]]
    message = f"cannot decode {data!r}"
    assert len(message) > 10_000
    built = []
    for out in (tmp_path / "a", tmp_path / "b"):
        write_slice(str(out), KEY, planned(photos.rows, list(range(len(photos.rows)))))
        result = build(out, photos, workers=2, encode=functools.partial(quoting_error_on, victim[7]))
        assert result.excluded == [{"key": victim[0], "position": 3, "reason": (
            f"encoder error: ValueError: {message[:500]}… ({len(message):,} characters)")}]
        assert read_manifest(str(out), KEY)["excluded"] == result.excluded
        built.append((out / NAME).read_bytes())
    assert built[0] == built[1]
