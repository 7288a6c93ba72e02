"""release/verify.py on hand-made shard tars of real WebPs: the per-sample rules, the read-back,
pixels already decoded elsewhere, expected tar digests, and the order report."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
from PIL import Image

from imnet_assets.release.verify import ExpectedSample, order_problem, read_back

WNID = "n01440764"


def webp(seed: int, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (seed * 50 % 256, 100, 150)).save(buf, "WEBP", quality=80)
    return buf.getvalue()


def sample(key: str, seed: int, label: int = 3) -> tuple[ExpectedSample, list[tuple[str, bytes]]]:
    data = webp(seed)
    exp = ExpectedSample(key=key, label=label, wnid=WNID, webp_sha256=hashlib.sha256(data).hexdigest(),
                         webp_bytes=len(data), width=40, height=30, orig_width=40, orig_height=30,
                         source_sha256="ab" * 32)
    meta = {"filename": f"{WNID}/{key}.JPEG", "label": label, "class_name": WNID, "width": 40, "height": 30,
            "orig_width": 40, "orig_height": 30, "source_sha256": "ab" * 32}
    return exp, [(f"{key}.cls", str(label).encode()), (f"{key}.json", json.dumps(meta).encode()),
                 (f"{key}.webp", data)]


def write_tar(path, members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def shard(tmp_path):
    made = [sample(f"{WNID}_{i}", i) for i in range(6)]
    expected = [e for e, _ in made]
    members = [m for _, ms in made for m in ms]
    path = tmp_path / "shard.tar"
    data = write_tar(path, members)
    return path, expected, members, data


def check(path, expected, **kw):
    return read_back(str(path), expected, record="catalog", source="catalog", **kw)


def test_a_good_shard_has_no_problems_with_or_without_decoding(shard):
    path, expected, _members, data = shard
    sha = hashlib.sha256(data).hexdigest()
    assert check(path, expected, tar_sha256=sha, tar_bytes=len(data), decode_every=1) == []
    assert check(path, expected, decode_every=0) == []


def test_expected_tar_digest_and_size_are_compared(shard):
    path, expected, _members, data = shard
    problems = check(path, expected, tar_sha256="0" * 64, tar_bytes=len(data) + 1)
    assert problems[0] == f"{len(data)} bytes, the catalog says {len(data) + 1}"
    assert problems[1].startswith("tar sha256 differs from the catalog: tar sha256 ")
    assert "every sample's payload matches" in problems[-1]


def garble_pixels(members, index: int) -> tuple[list, str]:
    """The index-th sample's WebP with its header intact and its VP8 data garbled."""
    name, data = members[3 * index + 2]
    bad = data[:40] + b"\xff" * (len(data) - 40)
    members = list(members)
    members[3 * index + 2] = (name, bad)
    return members, hashlib.sha256(bad).hexdigest()


def test_pixels_decoded_in_the_workers_are_not_decoded_again(shard, tmp_path):
    path, expected, members, _ = shard
    members, sha = garble_pixels(members, 2)
    write_tar(path, members)
    key = expected[2].key
    expected[2] = ExpectedSample(**{**expected[2].__dict__, "webp_sha256": sha})
    problems = check(path, expected, decode_every=1)
    assert len(problems) == 1 and problems[0].startswith(f"sample {key}: webp does not decode"), problems
    # Its hash ties the bytes to the ones a worker decoded: only the others are decoded here.
    assert check(path, expected, decode_every=1, decoded={key}) == []
    # A repaired sample is decoded whatever decode_every says.
    expected[2] = ExpectedSample(**{**expected[2].__dict__, "repaired": True})
    assert len(check(path, expected, decode_every=0)) == 1


@pytest.mark.parametrize("damage", ["cls", "json field", "json garbage", "member order", "header size"])
def test_each_per_sample_rule_names_the_sample(shard, damage):
    path, expected, members, _ = shard
    members = list(members)
    key = expected[1].key
    if damage == "cls":
        members[3] = (members[3][0], b"4")
    elif damage == "json field":
        meta = json.loads(members[4][1])
        meta["class_name"] = "n00000000"
        members[4] = (members[4][0], json.dumps(meta).encode())
    elif damage == "json garbage":
        members[4] = (members[4][0], b"[1, 2")
    elif damage == "member order":
        members[3], members[4] = members[4], members[3]
    else:
        expected[1] = ExpectedSample(**{**expected[1].__dict__, "width": 41})
    write_tar(path, members)
    problems = check(path, expected)
    want = {"cls": f"sample {key}: .cls b'4' != label 3",
            "json field": f"sample {key}: .json fields ['class_name'] differ from the catalog",
            "json garbage": f"sample {key}: .json does not parse",
            "member order": f"sample {key}: members ['json', 'cls', 'webp'], expected ['cls', 'json', 'webp']",
            "header size": f"sample {key}: webp header says WEBP 40x30 (the catalog says 41x30)"}[damage]
    assert problems[0].startswith(want), problems
    # (a recorded size that is not the file's also disagrees with the sample's .json)
    assert len(problems) == 1 + (damage == "header size"), problems


def test_a_cut_tar_is_reported_not_raised(shard):
    path, expected, _members, data = shard
    path.write_bytes(data[: len(data) // 2])
    problems = check(path, expected, tar_sha256=hashlib.sha256(data).hexdigest())
    assert any(p.startswith("tar unreadable after ") and "tar structure damaged at byte" in p for p in problems)
    assert any(p.startswith("holds ") and "catalog wants 6; missing [" in p for p in problems)


def test_order_problem_names_missing_extra_duplicated_and_reordered_keys():
    want = [f"k{i}" for i in range(10)]
    assert order_problem(want, want, "plan") is None
    got = want[:3] + ["k2", "x1"] + want[4:]
    text = order_problem(got, want, "plan")
    assert text == "holds 11 samples, plan wants 10; missing ['k3']; not planned ['x1']; duplicated ['k2']"
    assert order_problem(list(reversed(want)), want, "plan").endswith("; the same samples in another order")


def test_order_problem_is_linear_at_a_real_shard_size():
    """12,843 samples (a real shard) with every other one missing: answered at once (the former
    report rebuilt a set per key and counted each key in a list: ~10^8 steps here)."""
    want = [f"n{i:08d}_{i}" for i in range(12_843)]
    got = want[::2] + want[:100:2]
    text = order_problem(got, want, "catalog")
    assert text.startswith(f"holds {len(got)} samples, catalog wants 12843; missing ['n00000001_1', ")
    assert "and 6416 more" in text and "duplicated [" in text


@pytest.mark.parametrize("mode,meta", [("RGB", {}), ("RGB", {"exif": True, "icc": True}), ("L", {}),
                                       ("RGBA", {}), ("RGB", {"lossless": True})])
def test_riff_webp_size_agrees_with_pillow_and_refuses_what_is_not_laid_out_right(mode, meta):
    """The header read the shard check uses instead of opening each WebP with Pillow: the same size
    as Pillow for what the encoder writes (VP8, VP8X with EXIF and ICC), and lossless, grey and
    alpha layouts; None for a cut, padded or mislabelled file (Pillow then judges it)."""
    from PIL import ImageCms

    from imnet_assets.image.webp_output import riff_webp_size, webp_problem

    img = Image.new(mode, (123, 77))
    img.putpixel((5, 5), 200 if mode == "L" else (200, 10, 30, 255)[: len(mode)])
    kwargs = {"quality": 90, "method": 4, "lossless": meta.get("lossless", False)}
    if meta.get("exif"):
        exif = Image.Exif()
        exif[0x010F] = "imnet"
        kwargs["exif"] = exif.tobytes()
    if meta.get("icc"):
        kwargs["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    img.save(buf, "WEBP", **kwargs)
    webp = buf.getvalue()
    with Image.open(io.BytesIO(webp)) as im:
        pillow = im.size
    assert pillow == (123, 77)
    got = riff_webp_size(webp)
    assert got in (pillow, None)  # None: a layout left to Pillow (alpha)
    if mode != "RGBA":
        assert got == pillow
    assert webp_problem(webp, (123, 77), decode=False) == ""
    assert "123x77" in webp_problem(webp, (124, 77), decode=False)
    for bad in (webp[:-7], webp + b"\0\0", webp[:12] + b"XXXX" + webp[16:]):
        assert riff_webp_size(bad) is None
    for bad in (webp[:-7], webp[:12] + b"XXXX" + webp[16:]):  # (libwebp reads past trailing zeros)
        assert webp_problem(bad, (123, 77), decode=False) != ""
