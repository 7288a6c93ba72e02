"""The repair path under the machinery guard (image/decode.py; image/guard.py's settle): each way it
can be broken for every input is caused, and is a MachineryFault (a failed shard run that commits
nothing), never an exclusion of every damaged image nor a repair recorded for every good one; a
truly damaged image keeps its exclusion reason or its repair.

- the second, truncation-tolerant decode broken: a damaged image that looks complete (a PNG whose
  IDAT is garbled) is settled on a control cut short, which takes the repair path too (before, on a
  complete control that never reached it: every such image was excluded, every check green);
- the first decode broken while the second works: every image would be stored "repaired";
- the strict decode that confirms where a JPEG's data ends broken: every JPEG with a grey bottom
  right would be stored "repaired" (the JPEG controls have a grey corner, so they run it)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import types

import pytest
from PIL import Image, ImageFile

from imnet_assets.image import decode as decode_mod
from imnet_assets.image.decode import ImageRejected, trial_decode
from imnet_assets.image.encode import Encoded, EncodeSettings, encode_image, encode_or_refusal
from imnet_assets.image.guard import MachineryFault
from imnet_assets.release.outroot import read_manifest
from imnet_assets.release.plan import write_slice
from tests.core.test_encode import _photo_jpeg, _with_frame_size
from tests.core.test_guard import raise_attribute_error
from tests.core.test_shard import jpeg, planned, write_raw_tar
from tests.core.test_shard_workers import KEY, build

S = EncodeSettings()


def garbled_png() -> bytes:
    """A complete PNG (IEND and all) whose image data is not zlib data: the first decode raises,
    the tolerant one gives a single colour: "undecodable"."""
    buf = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((96, 64)).save(buf, "PNG")
    png = buf.getvalue()
    idat = png.index(b"IDAT")
    return png[: idat + 4] + bytes(b ^ 0x5A for b in png[idat + 4 : idat + 20]) + png[idat + 20 :]


def cut_bmp() -> bytes:
    """A BMP cut short (a BMP has no end marker: it looks complete): repaired."""
    buf = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((96, 64)).save(buf, "BMP")
    data = buf.getvalue()
    return data[: len(data) * 3 // 4]


def grey_cornered_jpeg() -> bytes:
    """A complete JPEG whose bottom right is libjpeg's grey: decode confirms it complete by a strict
    second decode (decode._jpeg_ran_out)."""
    img = Image.linear_gradient("L").convert("RGB").resize((320, 240))
    img.paste((128, 128, 128), (256, 176, 320, 240))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def ran_out_jpeg(fraction: float) -> bytes:
    data = jpeg(320, 240, 3)
    return data[: int(len(data) * fraction)] + b"\xff\xd9"  # cut, and closed as if complete


def test_the_tolerant_decode_broken_is_a_machinery_fault_settled_on_a_control_cut_short(monkeypatch):
    png = garbled_png()
    reason = encode_or_refusal(png, S)
    assert reason.startswith("undecodable: no image data could be decoded (") and trial_decode(png) == reason
    monkeypatch.setattr(decode_mod, "_load_truncated", raise_attribute_error)
    with pytest.raises(MachineryFault, match=r"known-good PNG RGB 1045x784 cut short control image made in "
                                             r"memory too \(undecodable: .*AttributeError"):
        encode_or_refusal(png, S)
    with pytest.raises(MachineryFault, match=r"known-good PNG RGB 1045x784 cut short control"):
        trial_decode(png)
    monkeypatch.undo()
    assert encode_or_refusal(png, S) == reason and trial_decode(png) == reason  # the bad image's reason stands


def first_decode_broken(real_load):
    """ImageFile.load raising whenever truncation is not tolerated: every first decode fails, the
    repair works (a library broken so, or a bug that strips what the decoder needs)."""

    def load(self):
        if self.tile and not ImageFile.LOAD_TRUNCATED_IMAGES:  # not loaded yet, nor tolerating
            raise OSError("broken data stream when reading image file")
        return real_load(self)

    return load


def test_the_first_decode_broken_is_a_machinery_fault_not_every_image_repaired(monkeypatch):
    assert encode_image(jpeg(320, 240, 1), S).repaired is False
    bmp = encode_or_refusal(cut_bmp(), S)
    assert isinstance(bmp, Encoded) and bmp.repaired is True  # its control passed: the repair stands
    cut_jpeg = jpeg(320, 240, 2)[:-300]  # no EOI: it looks cut, its repair needs no control
    monkeypatch.setattr(ImageFile.ImageFile, "load", first_decode_broken(ImageFile.ImageFile.load))
    with pytest.raises(MachineryFault) as e:
        encode_or_refusal(jpeg(320, 240, 1), S)
    message = str(e.value)
    assert message.startswith("machinery fault: decoding (max_short 768; the image was repaired) failed with "
                              "OSError: broken data stream"), message
    assert "known-good JPEG RGB 2069x1552 control image made in memory too (decoded only by repairing it)" in message
    with pytest.raises(MachineryFault, match=r"known-good BMP RGB 1045x784 control"):
        encode_or_refusal(cut_bmp(), S)
    assert encode_image(cut_jpeg, S).repaired is True
    monkeypatch.undo()
    assert encode_image(jpeg(320, 240, 1), S).repaired is False


def test_the_strict_confirming_decode_broken_is_a_machinery_fault_not_every_grey_corner_repaired(monkeypatch):
    good, ran_out = grey_cornered_jpeg(), ran_out_jpeg(0.5)
    hardly = _with_frame_size(_photo_jpeg(size=(256, 192)), 30000, 30000)  # 0.1% of the rows have data
    assert encode_image(good, S).repaired is False and encode_image(ran_out, S).repaired is True
    with pytest.raises(ImageRejected) as refused:
        encode_image(hardly, S)
    reason = refused.value.reason
    assert reason.startswith("undecodable: image data ends early, only the top ")
    monkeypatch.setattr(decode_mod, "_ONE_BITS", b"")  # the strict decode's data ends at the scan's: it raises
    for data in (good, ran_out):
        with pytest.raises(MachineryFault, match=r"^machinery fault: confirming where the JPEG data ends \(max_short "
                                                 r"768; the image was repaired\) failed with OSError.* known-good JPEG "
                                                 r"RGB 2069x1552 control .*decoded only by repairing it"):
            encode_image(data, S)
    monkeypatch.undo()
    assert encode_image(ran_out, S).repaired is True and encode_or_refusal(hardly, S) == reason


def repair_with_a_bug(data, settings):
    """The real chain with its tolerant decode broken, only while this call runs, in the pool
    worker that runs it (module level: the pool's workers import it by name)."""
    real = decode_mod._load_truncated
    decode_mod._load_truncated = raise_attribute_error
    try:
        return encode_image(data, settings)
    finally:
        decode_mod._load_truncated = real


def test_a_broken_repair_fails_the_shard_run_which_commits_nothing_and_then_builds(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    wnid = "n01440764"
    members = [(f"{wnid}_{i}.JPEG", jpeg(320, 240, i)) for i in range(3)] + [(f"{wnid}_3.JPEG", garbled_png())]
    where = write_raw_tar(root / f"{wnid}.tar", members, tarfile.PAX_FORMAT)
    rows = [[name[:-5], wnid, 0, f"{wnid}.tar", name, *where[name], hashlib.sha256(data).hexdigest(), 320, 240,
             False] for name, data in members]
    raw = types.SimpleNamespace(root=root, rows=rows)
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(rows, list(range(len(rows)))))
    with pytest.raises(MachineryFault, match=r"cut short control.*met on n01440764_3, .*nothing was committed"):
        build(out, raw, workers=2, encode=repair_with_a_bug)
    assert sorted(os.listdir(out)) == ["_plan"]  # no shard tar, no manifest, no commit record
    result = build(out, raw, workers=2)
    assert result.num_samples == 3 and result.problems == []
    assert result.excluded == [{"key": f"{wnid}_3", "position": 3, "reason": encode_or_refusal(garbled_png(), S)}]
    assert read_manifest(str(out), KEY)["excluded"] == result.excluded
