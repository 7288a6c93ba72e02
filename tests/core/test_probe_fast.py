"""The JPEG marker walk of the probe against Pillow: for every member of the sample release, for
photos like the benchmark's, and for crafted and mutated JPEGs, `probe_image` (fast path first)
gives exactly the Probe that Pillow alone gives, and the fast path really answers for the
ordinary JPEGs (so the comparison is not vacuous)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from imnet_assets.image import probe as probe_mod
from imnet_assets.image.probe import probe_image
from imnet_assets.sample.photos import imagenet_size_mix, make_photo
from imnet_assets.sample.sample_raw import write_sample_raw
from imnet_assets.stages.index import scan_tar
from imnet_assets.storage.rawtar import Member, iter_tar


def same(data: bytes) -> bool:
    """Whether the probe equals Pillow's for `data` (as bytes and as a memoryview); returns whether
    the fast path answered."""
    slow = probe_image(data, fast=False)
    assert probe_image(data) == slow
    assert probe_image(memoryview(data)) == slow
    return probe_mod._probe_jpeg(data) is not None


def jpeg(size=(120, 90), mode="RGB", seed=0, **kw) -> bytes:
    img = make_photo(size[0], size[1], np.random.default_rng(seed))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment up to and including SOS."""
    out, pos = [], 2
    while True:
        marker = data[pos + 1]
        end = pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        out.append((marker, pos, end))
        if marker == 0xDA:
            return out
        pos = end


def without(data: bytes, marker: int) -> bytes:
    for m, start, end in segments(data):
        if m == marker:
            return data[:start] + data[end:]
    raise AssertionError(f"no marker {marker:#x}")


def with_segment(data: bytes, marker: int, payload: bytes, at: int = 2) -> bytes:
    return data[:at] + bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload + data[at:]


def test_sample_release_member_by_member(tmp_path):
    summary = write_sample_raw(tmp_path, synsets=6, images=40)
    fast = total = 0
    for tar in sorted(tmp_path.glob("*.tar")):
        for item in iter_tar(str(tar)):
            if isinstance(item, Member):
                fast += same(item.data)
                total += 1
    assert total == summary.num_members
    assert fast > total // 2  # the ordinary photos go the fast way


def test_sample_release_records_equal_the_pillow_only_scan(tmp_path, monkeypatch):
    write_sample_raw(tmp_path, synsets=6, images=40)
    tars = sorted(str(t) for t in tmp_path.glob("*.tar"))
    records = [scan_tar(t) for t in tars]
    monkeypatch.setattr(probe_mod, "_probe_jpeg", lambda _data: None)
    assert records == [scan_tar(t) for t in tars]


@pytest.mark.parametrize("quality, subsampling", [(90, 2), (96, 0), (75, 1)])
def test_photos_like_the_benchmark(quality, subsampling):
    g = np.random.default_rng(7)
    for _ in range(12):
        w, h = imagenet_size_mix(g)
        buf = io.BytesIO()
        make_photo(w, h, g).save(buf, "JPEG", quality=quality, subsampling=subsampling)
        assert same(buf.getvalue())


@pytest.mark.parametrize("kw", [{}, {"progressive": True}, {"optimize": True}, {"quality": 100},
                                {"dpi": (72, 72)}, {"restart_marker_blocks": 1}])
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_kinds_of_jpeg(mode, kw):
    assert same(jpeg(mode=mode, **kw))


def test_exif_icc_and_comments(imgs):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation
    exif[0x011A] = 300.0
    exif[0x0128] = 2
    plain = jpeg()
    assert not same(jpeg(exif=exif.tobytes()))  # JFIF without a unit: Pillow reads the EXIF dpi
    assert not same(with_segment(plain, 0xE1, b"Exif\0\0garbage"))
    assert same(jpeg(exif=exif.tobytes(), dpi=(96, 96)))  # the JFIF dpi wins: no EXIF read
    assert same(jpeg(icc_profile=imgs.srgb_icc()))
    assert same(jpeg(comment=b"hello"))
    assert same(with_segment(plain, 0xE1, b"http://ns.adobe.com/xap/1.0/\0<x/>"))
    assert same(with_segment(plain, 0xEE, b"Adobe\0\x64\0\0\0\0\2"))
    assert same(with_segment(plain, 0xEE, b"Adobe\0\x64"))
    assert same(with_segment(plain, 0xE0, b"JFIF\0\1\2\2\0\x48\0\x48\0\0"))
    # Segments Pillow may fail on or do more with: left to Pillow, and still the same answer.
    for segment in [(0xE2, b"ICC_PROFILE\0\1"), (0xE2, b"MPF\0II*\0\x08\0\0\0"),
                    (0xED, b"Photoshop 3.0\x008BIM\x04"), (0xEE, b"Adobe"), (0xE0, b"JFIF\0\1")]:
        assert not same(with_segment(plain, *segment)), segment
    same(with_segment(plain, 0xE0, b"JFIF\0\1\2\1\0\x48\0"))  # cut density: no dpi


def test_mpo():
    buf = io.BytesIO()
    a, b = (make_photo(96, 64, np.random.default_rng(s)) for s in (1, 2))
    a.save(buf, "MPO", save_all=True, append_images=[b])
    assert not same(buf.getvalue())  # its MPF segment: left to Pillow
    assert probe_image(buf.getvalue()).format == "MPO"


def test_sizes_at_the_rules(imgs, huge_jpeg):
    for size in [(32, 8), (8, 32), (32, 32), (4000, 3000), (16384 * 2, 32), (16384, 768), (784, 800)]:
        assert same(imgs.flat_grey_jpeg(*size)), size
    assert same(jpeg((31, 400)))
    assert same(jpeg((1, 1)))
    assert same(jpeg((8000, 40), mode="L"))  # a panorama WebP cannot hold
    assert not same(huge_jpeg)  # above the full-decode limit: Pillow's draft decides
    assert probe_image(huge_jpeg).kept


def test_truncated_at_every_byte_of_the_header_and_some_of_the_scan():
    for data in (jpeg(), jpeg(mode="CMYK", progressive=True), jpeg(exif=b"Exif\0\0MM\0*\0\0\0\x08\0\0")):
        sos_end = segments(data)[-1][2]
        cuts = [*range(sos_end + 3), *range(sos_end + 3, len(data), 211), len(data) - 2, len(data) - 1]
        for cut in cuts:
            same(data[:cut])
        assert probe_image(data[: len(data) - 2]).needs_repair
        same(data + b"\0" * 100)
        assert not probe_image(data + b"\0" * 100).needs_repair
        same(data + b"\0" * 100 + b"x")


def test_odd_structures():
    plain = jpeg()
    sof = next(s for s in segments(plain) if s[0] == 0xC0)
    sos = segments(plain)[-1]
    cases = {
        "no SOF": without(plain, 0xC0),
        "no SOS": plain[: sos[1]] + b"\xff\xd9",
        "two SOFs": plain[: sof[1]] + plain[sof[1] : sof[2]] + plain[sof[1] :],
        "fill bytes": plain[:2] + b"\xff\xff\xff" + plain[2:],
        "fill before SOS": plain[: sos[1]] + b"\xff\xff" + plain[sos[1] :],
        "junk between segments": plain[: sof[1]] + b"\x00\x01" + plain[sof[1] :],
        "stuffed zero": plain[: sof[1]] + b"\xff\x00" + plain[sof[1] :],
        "RST before SOS": plain[: sof[1]] + b"\xff\xd0" + plain[sof[1] :],
        "second SOI": plain[: sof[1]] + b"\xff\xd8" + plain[sof[1] :],
        "unknown marker": plain[: sof[1]] + b"\xff\x02\x00\x04ab" + plain[sof[1] :],
        "length 0": plain[:2] + b"\xff\xfe\x00\x00" + plain[2:],
        "length 1": plain[:2] + b"\xff\xfe\x00\x01" + plain[2:],
        "only SOI": b"\xff\xd8\xff",
        "SOI and a marker": b"\xff\xd8\xff\xe0",
        "bad DQT": with_segment(plain, 0xDB, b"\x00" + b"\x01" * 10),
        "16-bit DQT": with_segment(plain, 0xDB, b"\x10" + b"\x00\x01" * 64),
        "DHP": with_segment(plain, 0xDE, plain[sof[1] + 4 : sof[2]]),
        "lossless SOF3": plain[: sof[1] + 1] + b"\xc3" + plain[sof[1] + 2 :],
        "SOF9": plain[: sof[1] + 1] + b"\xc9" + plain[sof[1] + 2 :],
        "12-bit": plain[: sof[1] + 4] + b"\x0c" + plain[sof[1] + 5 :],
        "zero height": plain[: sof[1] + 5] + b"\0\0" + plain[sof[1] + 7 :],
        "zero width": plain[: sof[1] + 7] + b"\0\0" + plain[sof[1] + 9 :],
        "2 components": plain[: sof[1] + 9] + b"\x02" + plain[sof[1] + 10 :],
        "SOF cut short": plain[: sof[1] + 2] + b"\x00\x09" + plain[sof[1] + 4 : sof[1] + 11] + plain[sof[2] :],
        "SOF one byte long": plain[: sof[1] + 2] + struct.pack(">H", sof[2] - sof[1] - 1) + plain[sof[1] + 4 :],
        "SOS cut": plain[: sos[1] + 6],
        "PNG named .JPEG": _png(),
        "empty": b"",
        "EOI only": b"\xff\xd8\xff\xd9",
    }
    answered = {name for name, data in cases.items() if same(data)}
    assert answered == {"fill bytes", "fill before SOS", "16-bit DQT"}  # the rest is Pillow's


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(buf, "PNG")
    return buf.getvalue()


def test_every_header_byte_mutated():
    rng = np.random.default_rng(3)
    for data in (jpeg((64, 48)), jpeg((64, 48), mode="L", progressive=True), jpeg((40, 40), mode="CMYK")):
        header_end = segments(data)[-1][2]
        for at in range(2, header_end):
            for value in {0x00, 0x01, 0x08, 0xFF, data[at] ^ 0x80, int(rng.integers(256))}:
                bad = bytearray(data)
                bad[at] = value
                same(bytes(bad))


def test_headers_longer_than_the_head_the_walk_reads_first():
    plain = jpeg()
    head = probe_mod._HEAD
    # A comment before the frame puts the frame, or a segment's edge, past the head: the walk is
    # then done again on the whole file, and still answers (the same as Pillow).
    for size in (head, head - 5, head - 2, head + 300, 10 * head):
        data = with_segment(plain, 0xFE, b"c" * size)
        assert same(data), size
        assert probe_image(data).width == 120
