"""The synthetic raw release: layout, quirks (checked on the real bytes), determinism, photo realism."""

from __future__ import annotations

import io
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile, UnidentifiedImageError

from imnet_assets.sample.photos import imagenet_size_mix, make_photo
from imnet_assets.sample.sample_raw import QUIRK_NAMES, TAR_MTIME, SampleSummary, write_sample_raw

REQUIRED_QUIRKS = {
    "cmyk", "grey", "png_as_jpeg", "palette_png", "gif_as_jpeg", "truncated", "tiny", "large", "huge",
    "exif_gps", "xmp", "icc", "orientation", "undecodable", "empty", "one_bit", "grey16",
}  # fmt: skip


@pytest.fixture(scope="module")
def small_release(tmp_path_factory) -> tuple[Path, SampleSummary]:
    root = tmp_path_factory.mktemp("raw_small")
    return root, write_sample_raw(root, synsets=2, images=20, seed=0)


@pytest.fixture(params=["default", "small"])
def release(request, sample_release, small_release) -> tuple[Path, SampleSummary, int, int]:
    """(root, summary, synsets, images) for the default 6x40 release and a minimal 2x20 one."""
    if request.param == "default":
        return (*sample_release, 6, 40)
    return (*small_release, 2, 20)


def read_tar(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tf:
        return [(m, tf.extractfile(m).read()) for m in tf.getmembers()]


def all_members(root: Path, summary: SampleSummary) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for wnid in summary.wnids:
        for info, data in read_tar(root / f"{wnid}.tar"):
            out[info.name] = data
    return out


def open_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def test_layout(release):
    root, summary, synsets, images = release
    tars = sorted(p.name for p in root.glob("*.tar"))
    assert tars == [f"{w}.tar" for w in summary.wnids]
    assert len(summary.wnids) == synsets
    assert summary.wnids == sorted(set(summary.wnids))
    assert all(re.fullmatch(r"n\d{8}", w) for w in summary.wnids)
    assert summary.num_members == summary.total_members == synsets * images
    assert not list(root.glob("*.tmp"))

    for wnid in summary.wnids:
        raw = (root / f"{wnid}.tar").read_bytes()
        assert raw[257:263] == b"ustar\x00"  # POSIX ustar headers
        members = read_tar(root / f"{wnid}.tar")
        names = [m.name for m, _ in members]
        assert names == summary.members[wnid]
        assert len(names) == images
        numbers = []
        hostile = set(summary.hostile.values())
        for info, data in members:
            assert info.isreg() and info.size == len(data)
            assert (info.mtime, info.uid, info.gid, info.mode) == (TAR_MTIME, 0, 0, 0o644)
            if info.name in hostile:  # the names no stage may crash on (HOSTILE_NAMES)
                continue
            m = re.fullmatch(rf"{wnid}_(\d+)\.JPEG", info.name)
            assert m, info.name
            numbers.append(int(m.group(1)))
        assert len(set(numbers)) == len(numbers) == images - sum(n in hostile for n in names)


def test_words_and_gloss(release):
    root, summary, _, _ = release
    for name in ("words.txt", "gloss.txt"):
        text = (root / name).read_text("utf-8")
        assert text.endswith("\n")
        lines = text.splitlines()
        parsed = dict(line.split("\t") for line in lines)  # exactly one tab per line
        assert len(parsed) == len(lines)
        assert all(v.strip() for v in parsed.values())
        assert set(summary.wnids) <= set(parsed)  # like the real files, a few extra wnids too
        assert list(parsed) == sorted(parsed)


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        write_sample_raw(tmp_path, synsets=0)
    with pytest.raises(ValueError):
        write_sample_raw(tmp_path, images=0)


def test_tiny_release_has_the_first_quirks(tmp_path):
    summary = write_sample_raw(tmp_path, synsets=1, images=3, seed=3)
    assert summary.num_members == 3
    assert set(summary.quirks) == {"cmyk", "grey", "png_as_jpeg"}
    assert len(list(tmp_path.glob("*.tar"))) == 1


# ---------------------------------------------------------------------------------------------
# Quirks, checked on the real bytes
# ---------------------------------------------------------------------------------------------


def test_every_quirk_present(release):
    _, summary, _, _ = release
    assert REQUIRED_QUIRKS <= set(summary.quirks) == set(QUIRK_NAMES)
    assert all(summary.quirks.values())


def test_quirks_are_what_they_claim(release, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    root, summary, _, _ = release
    data = all_members(root, summary)
    q = summary.quirks
    assert all(name in data for names in q.values() for name in names)

    def one(name: str) -> bytes:
        assert len(q[name]) == 1, q[name]
        return data[q[name][0]]

    img = open_image(one("cmyk"))
    assert (img.format, img.mode) == ("JPEG", "CMYK")
    img = open_image(one("grey"))
    assert (img.format, img.mode) == ("JPEG", "L")
    img = open_image(one("png_as_jpeg"))
    assert (img.format, img.mode) == ("PNG", "RGBA")
    img = open_image(one("palette_png"))
    assert (img.format, img.mode) == ("PNG", "P") and "transparency" in img.info
    img = open_image(one("gif_as_jpeg"))
    assert img.format == "GIF"
    img = open_image(one("one_bit"))
    assert (img.format, img.mode) == ("PNG", "1")
    img = open_image(one("grey16"))
    assert (img.format, img.mode) == ("PNG", "I;16")

    truncated = one("truncated")
    assert truncated.startswith(b"\xff\xd8") and not truncated.endswith(b"\xff\xd9")
    img = Image.open(io.BytesIO(truncated))
    assert img.format == "JPEG"
    with pytest.raises(OSError):
        img.load()
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert open_image(truncated).size == img.size  # repairable
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)

    tiny_sizes = sorted(open_image(data[n]).size for n in q["tiny"])
    assert all(min(s) < 32 for s in tiny_sizes)
    assert (20, 300) in tiny_sizes and (24, 24) in tiny_sizes
    for name in q["large"]:
        img = Image.open(io.BytesIO(data[name]))
        assert img.format == "JPEG" and min(img.size) > 768
    assert any(min(Image.open(io.BytesIO(data[n])).size) <= 1600 for n in q["large"])
    huge = Image.open(io.BytesIO(one("huge")))
    assert min(huge.size) >= 3000 and q["huge"][0] in q["large"]
    huge.load()

    img = open_image(one("exif_gps"))
    exif = img.getexif()
    gps = exif.get_ifd(0x8825)
    assert gps and 2 in gps and 4 in gps  # GPSLatitude, GPSLongitude
    assert exif.get(0x010F) and exif.get(0x0110)  # Make, Model
    assert exif.get_ifd(0x8769).get(0xA001) == 1  # ColorSpace sRGB

    xmp_bytes = one("xmp")
    assert b"http://ns.adobe.com/xap/1.0/\x00" in xmp_bytes
    assert b"x:xmpmeta" in open_image(xmp_bytes).info["xmp"]

    icc = open_image(one("icc")).info.get("icc_profile")
    assert icc
    assert ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.xcolor_space == "RGB "

    assert open_image(one("orientation")).getexif().get(0x0112) == 6
    assert open_image(one("orientation_8")).getexif().get(0x0112) == 8

    assert len(q["undecodable"]) == 2
    assert any(data[n].startswith(b"\xff\xd8\xff") for n in q["undecodable"])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # not even repairable
    for name in q["undecodable"]:
        assert data[name]
        with pytest.raises((UnidentifiedImageError, OSError)):
            open_image(data[name])
    assert one("empty") == b""
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(b""))


def test_other_members_are_normal_rgb_jpegs(release):
    root, summary, _, _ = release
    data = all_members(root, summary)
    quirky = {n for names in summary.quirks.values() for n in names}
    normal = [n for n in data if n not in quirky]
    assert len(normal) == summary.num_members - len(quirky)
    sizes = []
    for name in normal:
        img = open_image(data[name])
        assert (img.format, img.mode) == ("JPEG", "RGB"), name
        assert data[name].endswith(b"\xff\xd9")
        assert "exif" not in img.info and "icc_profile" not in img.info
        sizes.append(img.size)
    assert sum(max(s) <= 500 for s in sizes) >= len(sizes) // 2  # mostly ImageNet-typical sizes


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_deterministic(small_release, tmp_path):
    root, summary = small_release
    again = write_sample_raw(tmp_path / "again", synsets=2, images=20, seed=0)
    assert again.wnids == summary.wnids and again.quirks == summary.quirks
    files = sorted(p.name for p in root.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in files:
        assert (root / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name

    other = write_sample_raw(tmp_path / "other", synsets=2, images=20, seed=1)
    assert other.wnids != summary.wnids


# ---------------------------------------------------------------------------------------------
# Photos and sizes
# ---------------------------------------------------------------------------------------------


def jpeg_size(img: Image.Image, quality: int = 90) -> int:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return len(buf.getvalue())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_make_photo_compresses_like_a_photo(seed):
    img = make_photo(500, 375, random.Random(seed))
    assert (img.mode, img.size) == ("RGB", (500, 375))
    size = jpeg_size(img)
    assert 40_000 <= size <= 300_000, size
    arr = np.asarray(img, dtype=np.float32)
    assert arr.std() > 20  # not flat colour
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 10_000


def test_make_photo_deterministic_and_accepts_both_rngs():
    a = make_photo(320, 240, random.Random(7))
    b = make_photo(320, 240, random.Random(7))
    assert a.tobytes() == b.tobytes()
    c = make_photo(320, 240, np.random.default_rng(7))
    d = make_photo(320, 240, np.random.default_rng(7))
    assert c.tobytes() == d.tobytes()
    assert a.tobytes() != make_photo(320, 240, random.Random(8)).tobytes()
    with pytest.raises(TypeError):
        make_photo(10, 10, 7)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [(1, 1), (20, 300), (24, 24), (47, 49), (333, 500)])
def test_make_photo_any_size(size):
    assert make_photo(*size, random.Random(0)).size == size


def test_make_photo_large_has_photo_like_bit_rate():
    img = make_photo(3000, 2000, random.Random(0))
    assert img.size == (3000, 2000)
    bpp = 8 * jpeg_size(img) / (3000 * 2000)
    assert 0.8 < bpp < 6, bpp


def test_imagenet_size_mix():
    rng = random.Random(0)
    sizes = [imagenet_size_mix(rng) for _ in range(4000)]
    assert sizes[:50] == [imagenet_size_mix(r) for r in [random.Random(0)] for _ in range(50)]
    assert all(w >= 1 and h >= 1 and max(w, h) <= 3000 for w, h in sizes)
    typical = sum(max(w, h) == 500 and min(w, h) >= 300 for w, h in sizes)
    medium = sum(800 <= max(w, h) <= 1600 for w, h in sizes)
    large = sum(max(w, h) > 1600 for w, h in sizes)
    small = sum(max(w, h) <= 300 for w, h in sizes)
    assert typical > 0.7 * len(sizes)
    assert 0.03 * len(sizes) < medium < 0.2 * len(sizes)
    assert 0 < large < 0.05 * len(sizes)
    assert 0 < small < 0.1 * len(sizes)
    assert {(500, 375), (500, 333), (375, 500)} <= set(sizes)
    portrait = sum(h > w for w, h in sizes)
    assert 0.05 * len(sizes) < portrait < 0.5 * len(sizes)
    # numpy generators work too
    assert imagenet_size_mix(np.random.default_rng(1)) == imagenet_size_mix(np.random.default_rng(1))


def test_hostile_member_names_by_default_and_on_request(sample_release, tmp_path):
    from imnet_assets.sample.sample_raw import HOSTILE_NAMES

    root, summary = sample_release
    assert set(summary.hostile) == {kind for kind, _ in HOSTILE_NAMES}
    in_tars = {m for names in summary.members.values() for m in names}
    assert set(summary.hostile.values()) <= in_tars
    assert len(summary.hostile["long"].encode()) > 100  # more than a ustar name field holds
    plain = write_sample_raw(tmp_path, synsets=2, images=20, hostile_names=False)
    assert plain.hostile == {}
    assert all(re.fullmatch(r"n\d{8}_\d+\.JPEG", m) for names in plain.members.values() for m in names)
