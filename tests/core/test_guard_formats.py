"""Every format the release decodes has a control of its own (image/controls.py): a plugin broken
for every input (as by a Pillow upgrade) is a MachineryFault at the first image of its format, in
the probe and in the encoder, never the exclusion of all of them; a bad file of that format keeps
its reason. PSD, which Pillow cannot write, is written by hand (controls._psd). The index stage with
the PSD plugin broken in its scan worker fails and records nothing."""

from __future__ import annotations

import io

import duckdb
import pytest
from PIL import Image, PsdImagePlugin

from imnet_assets.image import controls
from imnet_assets.image.encode import Encoded, EncodeSettings, encode_or_refusal
from imnet_assets.image.guard import MachineryFault
from imnet_assets.image.probe import probe_image
from imnet_assets.stages.filtered_index import build_filtered_index
from imnet_assets.stages.raw_tars import build_raw_tars
from imnet_assets.stages.synset_manifest import build_synset_manifest
from tests.conftest import local_settings
from tests.core.test_shard import jpeg, write_raw_tar
from tests.core.worker_patch import patched_worker

SETTINGS = EncodeSettings()


def test_every_format_pillow_opens_has_a_control_or_is_listed():
    """An upgrade that adds a format fails here until it has a control (or is listed without one)."""
    Image.preinit()  # the common plugins first, as decode.open_image registers them
    Image.init()
    assert set(controls.MODES) | controls.UNCONTROLLED == set(Image.ID)
    assert not set(controls.MODES) & controls.UNCONTROLLED


def an_image(fmt: str, mode: str | None = None) -> bytes:
    """A good image of `fmt` other than any control (its size is no control's)."""
    return controls.control_image(controls.ControlKind(fmt, mode or controls.MODES[fmt][0], False, False, 100))


def broken_open(*_args, **_kw):
    raise AttributeError("'ImageFile' object has no attribute '_read_header'")


@pytest.mark.parametrize("fmt", sorted(controls.MODES))
def test_a_plugin_broken_for_every_input_is_a_machinery_fault_in_the_probe_and_the_encoder(fmt, monkeypatch):
    image = an_image(fmt)
    assert probe_image(image, fast=False).kept and isinstance(encode_or_refusal(image, SETTINGS), Encoded)
    monkeypatch.setitem(Image.OPEN, fmt, (broken_open, Image.OPEN[fmt][1]))
    with pytest.raises(MachineryFault, match=rf"probing the header failed with AttributeError.* known-good {fmt} "):
        probe_image(image, fast=False)
    with pytest.raises(MachineryFault, match=rf"known-good {fmt} "):
        encode_or_refusal(image, SETTINGS)


def psd(size=(120, 80), mode="RGB") -> bytes:
    return controls._psd(Image.new("RGB", size, (200, 120, 40)).convert(mode))


def test_a_hand_written_psd_is_what_photoshop_would_give_pillow():
    for mode in ("RGB", "RGBA", "L", "CMYK"):
        data = psd(mode=mode)
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.mode, im.size) == ("PSD", mode, (120, 80))
            assert im.convert("RGB").getpixel((5, 5)) == Image.new("RGB", (1, 1), (200, 120, 40)).convert(
                mode).convert("RGB").getpixel((0, 0))


def bad_psds() -> dict[str, bytes]:
    good = psd()
    return {"cut header": good[:20], "pixels cut": good[:600], "no channels": good[:12] + b"\x00\x00" + good[14:],
            "colour mode 5": good[:24] + b"\x00\x05" + good[26:]}


def test_a_broken_psd_plugin_fails_and_a_bad_psd_keeps_its_reason(monkeypatch):
    reasons = {name: probe_image(data).reason for name, data in bad_psds().items()}
    refusals = {name: encode_or_refusal(data, SETTINGS) for name, data in bad_psds().items()}
    assert reasons["cut header"] == "not an image: cannot identify image file"
    assert reasons["colour mode 5"] == "not an image: cannot identify image file"  # Pillow: a SyntaxError
    assert reasons["no channels"] == "unreadable header: OSError: not enough channels"
    assert refusals["pixels cut"].startswith("undecodable: ")
    monkeypatch.setattr(PsdImagePlugin.PsdImageFile, "_open", broken_open)
    with pytest.raises(MachineryFault, match=r"known-good PSD RGB 784x784|known-good PSD RGB 1045x784"):
        probe_image(psd())
    monkeypatch.undo()
    assert {name: probe_image(data).reason for name, data in bad_psds().items()} == reasons  # unchanged
    assert {name: encode_or_refusal(data, SETTINGS) for name, data in bad_psds().items()} == refusals


def index_rows(settings) -> list[tuple]:
    with duckdb.connect(settings.catalog, read_only=True) as con:
        return con.execute("SELECT member, status, reason FROM images ORDER BY member").fetchall()


def test_the_psd_plugin_broken_in_the_scan_worker_fails_the_index_and_records_nothing(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    members = [("n01_1.JPEG", jpeg(120, 80, 1)), ("n01_2.JPEG", psd()), ("n01_3.JPEG", bad_psds()["no channels"])]
    write_raw_tar(raw / "n00000001.tar", members)
    settings = local_settings(raw, tmp_path)
    quiet = lambda _m: None  # noqa: E731
    build_raw_tars(settings, "run", quiet)
    build_synset_manifest(settings, "run", quiet)
    with patched_worker(PsdImagePlugin.__name__, "PsdImageFile._open", broken_open), \
            pytest.raises(MachineryFault, match=r"known-good PSD RGB .*met on n00000001\.tar member n01_2"):
        build_filtered_index(settings, "run", quiet)
    assert index_rows(settings) == []  # not one PSD excluded
    build_filtered_index(settings, "run", quiet)
    rows = index_rows(settings)
    assert [(m, s) for m, s, _ in rows] == [("n01_1.JPEG", "kept"), ("n01_2.JPEG", "kept"), ("n01_3.JPEG", "excluded")]
    assert rows[2][2] == "unreadable header: OSError: not enough channels"
