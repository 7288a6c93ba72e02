"""A crash in the repair decode (image/decode.py's second, truncation-tolerant decode) of an image
whose bytes look complete (a JPEG with a stray frame marker mid-data, its end marker in place): the
worker marks that step (runtime/wire.py), so the crash is settled on a control cut short, which takes
the repair path too (stages/crash_control.py). Real pool workers, a real SIGSEGV inside the repair
decode (image/faults.py's crash-repair), real JPEGs in a real raw tar:

- the repair path healthy for the control: the image's crashes are its own, it is excluded with its
  reason after twice, the others are built;
- the repair path broken for every input: MachineryFault, no exclusion, no shard; before, the
  complete control (which never reaches the repair) passed, and every such image was excluded;
- the same in the index, whose staged encodes decode the image (IMNET_TEST_INDEX_FAULT=crash-repair)."""

from __future__ import annotations

import functools
import hashlib
import os
import tarfile
import types

import duckdb
import pytest

from imnet_assets.image import faults
from imnet_assets.image.decode import open_image
from imnet_assets.image.encode import EncodeSettings, encode_image
from imnet_assets.image.formats import looks_truncated
from imnet_assets.image.guard import MachineryFault
from imnet_assets.release.outroot import read_manifest
from imnet_assets.release.plan import write_slice
from imnet_assets.stages.filtered_index import build_filtered_index
from imnet_assets.stages.raw_tars import build_raw_tars
from imnet_assets.stages.staged_encodes import staging_plan
from imnet_assets.stages.synset_manifest import build_synset_manifest
from tests.conftest import local_settings
from tests.core.test_shard import jpeg, planned, write_raw_tar
from tests.core.test_shard_workers import KEY, NAME, build

WNID = "n01440764"
QUIET = lambda _m: None  # noqa: E731
VICTIM = 2


def stray_marker_jpeg() -> bytes:
    """A JPEG whose entropy data holds a stray SOF marker halfway (damaged mid-data; EOI present): the
    first decode raises, the repair decodes it."""
    data = jpeg(320, 240, 7)
    mid = (data.index(b"\xff\xda") + len(data)) // 2
    return data[:mid] + b"\xff\xc0" + data[mid:]


def raw_release(folder, victim: bytes):
    """One synset tar of four 320x240 JPEGs, member VICTIM replaced by `victim`: its root, its
    filtered-index rows and the victim's bytes."""
    root = folder / "raw"
    root.mkdir()
    members = [(f"{WNID}_{i}.JPEG", victim if i == VICTIM else jpeg(320, 240, i)) for i in range(4)]
    where = write_raw_tar(root / f"{WNID}.tar", members, tarfile.PAX_FORMAT)
    rows = [[name[:-5], WNID, 0, f"{WNID}.tar", name, *where[name], hashlib.sha256(data).hexdigest(), 320, 240, False]
            for name, data in members]
    return types.SimpleNamespace(root=root, rows=rows, victim=victim)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return raw_release(tmp_path_factory.mktemp("repair_crash"), stray_marker_jpeg())


def encode_with_fault(hook: str, data, settings):
    """The real encoder with image/faults.py's `hook` armed while it runs, in the pool worker that
    runs it (module level: the pool's workers import it by name)."""
    faults.arm(hook)
    try:
        return encode_image(data, settings)
    finally:
        faults.arm(None)


def test_the_victim_looks_complete_and_is_repaired_by_the_second_decode(photos):
    assert not looks_truncated(photos.victim, "JPEG")
    with pytest.raises(OSError):
        open_image(photos.victim).load()
    assert encode_image(photos.victim, EncodeSettings()).repaired is True


def planned_out(folder, release):
    """An out root under `folder` planned with every row of `release`, in order."""
    out = folder / "out"
    write_slice(str(out), KEY, planned(release.rows, list(range(len(release.rows)))))
    return out


def fails_on_a_broken_repair(out, release) -> str:
    """A shard run of `release` while the repair decode crashes on every input: a MachineryFault
    naming the damaged image, nothing committed (no shard, no manifest: nothing excluded). Its message."""
    with pytest.raises(MachineryFault) as e:
        build(out, release, workers=2, encode=functools.partial(encode_with_fault, "crash-repair:*"))
    message = str(e.value)
    assert f"while encoding {release.rows[VICTIM][0]} " in message, message
    assert sorted(os.listdir(out)) == ["_plan"]
    return message


def test_a_crash_in_the_repair_decode_is_settled_on_a_cut_control_and_excludes_the_image(photos, tmp_path):
    out = planned_out(tmp_path, photos)
    victim = photos.rows[VICTIM]
    logs: list[str] = []
    result = build(out, photos, workers=2, log=logs.append,
                   encode=functools.partial(encode_with_fault, f"crash-repair:{victim[7]}"))
    assert result.excluded == [{"key": victim[0], "position": VICTIM,
                                "reason": "encoder process died 2 times (signal 11, signal 11) while encoding"}]
    assert result.num_samples == len(photos.rows) - 1 and result.problems == []
    assert [s["key"] for s in read_manifest(str(out), KEY)["samples"]] == [
        r[0] for r in photos.rows if r is not victim]
    assert [m for m in logs if "control image passed the encoder" in m] == [
        "a known-good JPEG RGB 2069x1552 cut short control image passed the encoder: the crashes are the image's "
        "own"], logs


def test_a_repair_decode_crashing_on_every_input_is_a_machinery_fault_not_an_exclusion(photos, tmp_path):
    out = planned_out(tmp_path, photos)
    message = fails_on_a_broken_repair(out, photos)
    assert ("a known-good JPEG RGB 2069x1552 cut short control image made in memory crashed the encoder's process "
            "the same way (signal 11 (SIGSEGV))") in message, message
    result = build(out, photos, workers=2)  # the fix: the repaired image is built
    assert result.excluded == [] and result.num_samples == len(photos.rows) and result.problems == []
    assert [s["repaired"] for s in read_manifest(str(out), KEY)["samples"]] == [False, False, True, False]
    assert (out / NAME).exists()


# ------------------------------------------------------------------ the index's staged encodes, the same rule


def index_rows(raw_root, folder, **env) -> list[tuple]:
    """(key, status, reason) of every images row once the index scanned `raw_root`, staging each kept
    image's encode (IMNET_STAGE_ENCODES=on: the index's worker decodes it, the repair included)."""
    settings = local_settings(raw_root, folder, IMNET_WORKERS=2, IMNET_STAGE_ENCODES="on", **env)
    build_raw_tars(settings, "run", QUIET)
    build_synset_manifest(settings, "run", QUIET)
    build_filtered_index(settings, "run", QUIET, codecs=staging_plan([settings]))
    with duckdb.connect(settings.catalog, read_only=True) as con:
        return con.execute("SELECT key, status, reason FROM images ORDER BY key").fetchall()


def test_the_index_settles_a_crash_in_its_repair_decode_the_same_way(photos, tmp_path, monkeypatch):
    victim = photos.rows[VICTIM]
    monkeypatch.setenv("IMNET_TEST_INDEX_FAULT", f"crash-repair:{victim[7]}")
    got = index_rows(photos.root, tmp_path / "own")
    reason = "index process died 2 times (signal 11 (SIGSEGV), signal 11 (SIGSEGV)) while decoding"
    assert got == [(r[0], "excluded", reason) if r is victim else (r[0], "kept", None) for r in photos.rows]
    monkeypatch.setenv("IMNET_TEST_INDEX_FAULT", "crash-repair:*")  # the repair path broken for every input
    with pytest.raises(MachineryFault, match=r"JPEG RGB \d+x\d+ cut short control image made in memory crashed the "
                                             r"index's process the same way \(signal 11 \(SIGSEGV\)\)"):
        index_rows(photos.root, tmp_path / "every")


# ------------------------------------------------------------------ a format whose control cannot be cut


def damaged_qoi() -> bytes:
    """A QOI image (a format whose control cannot be cut: controls.CUTTABLE) cut short: the first
    decode raises, and the repair decode is reached (it refuses it)."""
    import io

    from PIL import Image

    b = io.BytesIO()
    Image.open(io.BytesIO(jpeg(320, 240, 9))).convert("RGB").save(b, "QOI")
    data = b.getvalue()
    return data[: len(data) * 4 // 5]


@pytest.fixture(scope="module")
def qoi_photos(tmp_path_factory):
    return raw_release(tmp_path_factory.mktemp("repair_crash_qoi"), damaged_qoi())


def test_a_repair_crash_of_a_format_with_no_cut_control_is_settled_on_a_control_that_takes_the_repair(
        qoi_photos, tmp_path):
    """QOI (like AVIF, DDS, ICNS, JPEG2000) has no control cut short: its complete control never
    reaches the repair decode, so it passed, and a repair path crashing on every input excluded every
    damaged image of such a format with every check green. The crash is settled on the fallback's
    control cut short (a JPEG, as a format with no control of its own gets), which takes the repair."""
    victim = qoi_photos.rows[VICTIM]
    with pytest.raises(IndexError):  # its first decode fails: the repair decode is what comes next
        open_image(qoi_photos.victim).load()
    out = planned_out(tmp_path, qoi_photos)
    message = fails_on_a_broken_repair(out, qoi_photos)
    assert "cut short control image made in memory crashed the encoder's process the same way" in message, message
    result = build(out, qoi_photos, workers=2)  # the repair path healthy: the image's own refusal stands
    assert [x["key"] for x in result.excluded] == [victim[0]] and result.problems == []
    assert result.excluded[0]["reason"].startswith("undecodable: "), result.excluded
