"""The machinery guard (image/guard.py; SPEC "Failure behaviour": a fault of the machinery is never
an exclusion). Every control image passes every path on a healthy machine (else a control would
fail builds); a programming error injected into the chain (the real code, monkeypatched in the
process that runs it) is a MachineryFault naming it, for the encoder, the index's probe, its trial
decode of truncated files (a bug in the repair path alone is caught by a control cut short), a
PNG-only bug (a PNG control), and the index's staged encodes; an image-specific failure of an
unexpected type is still that image's exclusion; a corrupt image keeps its reason. The perceptual
hash too: a numpy/Pillow incompatibility is a MachineryFault, not "no pHash" for every image."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image, PngImagePlugin

from imnet_assets.image import controls, perceptual
from imnet_assets.image import decode as decode_mod
from imnet_assets.image import encode as encode_mod
from imnet_assets.image import exif as exif_mod
from imnet_assets.image import probe as probe_mod
from imnet_assets.image.decode import decode, trial_decode
from imnet_assets.image.encode import Encoded, EncodeSettings, encode_image, encode_or_refusal
from imnet_assets.image.guard import MachineryFault
from imnet_assets.image.probe import probe_image
from imnet_assets.stages.staged_encodes import StagedCodec, Stager
from tests.core.test_shard import jpeg

SETTINGS = (EncodeSettings(), EncodeSettings(codec="jpeg", quality=85))


def kinds():
    for fmt, modes in controls.MODES.items():
        for mode in modes:
            for progressive in (False, True) if fmt == "JPEG" else (False,):
                for cut in (False, True) if fmt in controls.CUTTABLE else (False,):
                    yield controls.ControlKind(fmt, mode, progressive, cut, 768)
                    if fmt == "JPEG":
                        yield controls.ControlKind(fmt, mode, progressive, cut, 32)


@pytest.mark.parametrize("fmt", sorted(controls.MODES))
def test_every_control_passes_every_path_on_a_healthy_machine(fmt):
    """A control that failed here would turn every failing image of its kind into a failed build."""
    for kind in (k for k in kinds() if k.format == fmt):
        data = controls.control_image(kind)
        named = controls.control_for(data, kind.max_short, cut=kind.cut)
        assert named == kind or kind.cut and named.format == fmt, kind  # its header names its kind (a cut
        # PCX, its palette lost, reads as L)
        if fmt in ("JPEG", "PNG", "GIF") and kind.mode != "P":  # the formats with an end marker: it looks cut
            assert controls.control_for(data, kind.max_short) == kind, kind
        assert probe_mod._probes(data) is None, kind
        assert decode_mod._decodes(data, kind.max_short) is None, kind
        for settings in SETTINGS:
            settings = EncodeSettings(codec=settings.codec, quality=settings.quality, max_short=kind.max_short)
            enc = encode_image(data, settings)
            assert enc.repaired == kind.cut, kind
        if not kind.cut:  # the pHash's controls (never cut: the hash repairs nothing)
            phash_control = controls.control_image(kind._replace(max_short=perceptual.HASH_SIDE))
            assert perceptual._greys(phash_control, perceptual.HASH_SIDE) is None, kind


def broken_header() -> bytes:
    good = jpeg(64, 48, 0)
    sof = good.index(b"\xff\xc0")
    return good[: sof + 6]  # cut inside the frame header


def cut_jpeg() -> bytes:
    good = jpeg(320, 240, 1)
    return good[: len(good) * 3 // 4]


def test_a_corrupt_image_is_still_an_exclusion_with_its_reason():
    assert probe_image(broken_header()).reason.startswith("unreadable header: ")
    assert encode_or_refusal(broken_header(), SETTINGS[0]).startswith("unreadable header: ")
    assert encode_or_refusal(b"<html>not found</html>", SETTINGS[0]) == "not an image: cannot identify image file"
    assert probe_image(b"GIF89a" + b"\x00" * 40).status == "excluded"
    flat = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(flat, "PNG")
    png = flat.getvalue()
    idat = png.index(b"IDAT")
    garbled = png[: idat + 4] + bytes(b ^ 0x5A for b in png[idat + 4 : idat + 20]) + png[idat + 20 :]
    assert encode_or_refusal(garbled, SETTINGS[0]).startswith("undecodable: ")


def raise_attribute_error(*_args, **_kw):
    raise AttributeError("'memoryview' object has no attribute 'startswith'")


def test_a_bug_in_the_encode_chain_is_a_machinery_fault_not_an_exclusion(monkeypatch):
    monkeypatch.setattr(encode_mod, "filter_exif", raise_attribute_error)
    for settings in SETTINGS:
        with pytest.raises(MachineryFault) as e:
            encode_or_refusal(jpeg(320, 240, 2), settings)
        message = str(e.value)
        assert message.startswith("machinery fault: encoding (")
        assert "AttributeError: 'memoryview' object has no attribute 'startswith'" in message
        assert "raised at core/test_guard.py" in message and "known-good JPEG RGB" in message
        assert "nothing was recorded as excluded" in message
    monkeypatch.undo()
    assert isinstance(encode_or_refusal(jpeg(320, 240, 2), SETTINGS[0]), Encoded)


def grey_jpeg(exif: bool) -> bytes:
    buf = io.BytesIO()
    options = {"exif": controls._metadata()["exif"]} if exif else {}
    Image.linear_gradient("L").resize((320, 240)).save(buf, "JPEG", **options)
    return buf.getvalue()


def test_a_bug_in_the_exif_rules_is_caught_whatever_the_mode(monkeypatch):
    """Every control whose format carries EXIF carries it, in every mode: before, a grey JPEG's
    control had none, so a bug in the EXIF walk excluded every grey JPEG with EXIF."""
    monkeypatch.setattr(exif_mod, "_filter_exif", raise_attribute_error)
    assert isinstance(encode_or_refusal(grey_jpeg(exif=False), SETTINGS[0]), Encoded)  # no EXIF: not walked
    with pytest.raises(MachineryFault, match=r"failed with AttributeError.*known-good JPEG L 2069x1552 control"):
        encode_or_refusal(grey_jpeg(exif=True), SETTINGS[0])
    monkeypatch.undo()
    assert isinstance(encode_or_refusal(grey_jpeg(exif=True), SETTINGS[0]), Encoded)


def test_a_bug_in_the_probe_is_a_machinery_fault(monkeypatch):
    monkeypatch.setattr(probe_mod, "plan_decode", raise_attribute_error)
    with pytest.raises(MachineryFault, match=r"machinery fault: probing the header failed with AttributeError"):
        probe_image(jpeg(320, 240, 3))


def test_a_bug_only_in_the_repair_of_cut_data_is_caught_by_a_control_cut_short(monkeypatch):
    """trial_decode (the index's, on truncated files): the complete control would pass, the cut one fails."""
    data = cut_jpeg()
    assert trial_decode(data) is None  # repaired on a healthy machine
    monkeypatch.setattr(decode_mod, "_load_truncated", raise_attribute_error)
    decode(jpeg(320, 240, 4), 768)  # a complete image never takes the repair path
    with pytest.raises(MachineryFault, match=r"known-good JPEG RGB 2069x1552 cut short control"):
        trial_decode(data)


def test_a_png_only_bug_is_caught_by_a_png_control(monkeypatch):
    flat = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(flat, "PNG")

    def broken_open(self):
        raise AttributeError("'PngStream' object has no attribute 'rewind'")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "_open", broken_open)
    assert probe_image(jpeg(64, 48, 5)).kept  # JPEGs are fine
    with pytest.raises(MachineryFault, match=r"probing the header failed with AttributeError.*known-good PNG RGB"):
        probe_image(flat.getvalue())
    with pytest.raises(MachineryFault, match=r"known-good PNG RGB"):
        encode_or_refusal(flat.getvalue(), SETTINGS[0])


def type_error_on(victim: bytes, data, settings):
    """A codec that fails on one image only, with a type a bug would raise too (module level)."""
    if data == victim:
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")
    return encode_image(data, settings)


def test_an_image_specific_failure_of_an_unexpected_type_is_still_its_exclusion():
    victim, other = jpeg(320, 240, 6), jpeg(320, 240, 7)
    codec = lambda data, settings: type_error_on(victim, data, settings)  # noqa: E731
    assert encode_or_refusal(victim, SETTINGS[0], codec) == (
        "encoder error: TypeError: unsupported operand type(s) for +: 'int' and 'NoneType'")
    assert isinstance(encode_or_refusal(other, SETTINGS[0], codec), Encoded)


def test_the_index_staged_encodes_fail_on_a_machinery_fault_and_commit_nothing(monkeypatch, tmp_path):
    codec = StagedCodec("webp-test", SETTINGS[0], str(tmp_path / "staged"))
    data = jpeg(320, 240, 8)
    monkeypatch.setattr(encode_mod, "filter_exif", raise_attribute_error)
    with pytest.raises(MachineryFault, match=r"met on n01_1 in n01\.tar, encoding for webp-test"):
        with Stager((codec,), "n01.tar") as stager:
            stager.add("n01_1", hashlib.sha256(data).hexdigest(), data)
    assert not (tmp_path / "staged").exists() or not any((tmp_path / "staged").iterdir())


def array_interface_broken(self):
    """numpy cannot take a Pillow image (a numpy/Pillow incompatibility, as on an upgrade)."""
    raise AttributeError("'Image' object has no attribute 'getim'")


def test_a_broken_perceptual_hash_is_a_machinery_fault_and_a_bad_image_still_gets_none(monkeypatch):
    cut = jpeg(320, 240, 9)
    cut = cut[: len(cut) // 3]
    assert perceptual.image_hash(jpeg(320, 240, 9)) is not None
    assert perceptual.image_hash(b"<html>not found</html>") is None and perceptual.image_hash(cut) is None
    assert perceptual.image_hash(broken_header()) is None
    monkeypatch.setattr(Image.Image, "__array_interface__", property(array_interface_broken))
    with pytest.raises(MachineryFault) as e:
        perceptual.image_hash(jpeg(320, 240, 9))
    message = str(e.value)
    assert message.startswith("machinery fault: perceptual hashing (32x32 grey thumbnail) failed with TypeError")
    assert "known-good JPEG RGB 341x256 control image made in memory too" in message, message
    with pytest.raises(MachineryFault, match="known-good JPEG RGB 341x256 control"):  # the cut one's too: not cut
        perceptual.image_hash(cut)
    monkeypatch.undo()
    assert perceptual.image_hash(jpeg(320, 240, 9)) is not None
