"""Issue 25: the JPEG codec of a release (`codec = "jpeg"`), on the sample raw release's real images:
every quirk follows the same sizing, colour and metadata rules as WebP; the bytes are the same in
another process and with another number of workers; a JPEG shard passes the shard check, a
corrupted byte fails it; webdataset, timm's way of reading and `imnet_assets.read` read it; and the
default WebP release's bytes and fingerprints are what they were before the codec was a setting."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, JpegImagePlugin

from imnet_assets import read
from imnet_assets.image import encode
from imnet_assets.image.decode import ImageRejected, decode, target_size
from imnet_assets.image.encode import EncodeSettings, encode_image
from imnet_assets.image.exif import rgb_icc_profile
from imnet_assets.image.jpeg_output import jpeg_frame_size, jpeg_problem
from imnet_assets.release.card import card_url
from imnet_assets.release.info import info_url
from imnet_assets.release.outroot import state_url
from imnet_assets.release.verify import verify_catalog_shard
from imnet_assets.sample.sample_raw import write_sample_raw
from imnet_assets.stages.audit import encode_settings, run_audit
from imnet_assets.stages.shard import build_shard, code_version, fingerprint
from imnet_assets.storage.catalog import Catalog
from tests.conftest import build_catalog_stages, local_settings, shard_verdict
from tests.core.test_shard_workers import corrupt_an_image_byte
from tests.shard_check import check_committed_shard

JPEG = EncodeSettings(codec="jpeg", quality=95)  # a JPEG release's default (Settings.jpeg_quality)
QUIET = lambda _m: None  # noqa: E731
# sha256 of the sorted {member: sha256 of its WebP, or the reason it is refused} of the 2 x 20 sample
# release (seed 0) under the default settings, as the encoder gave it before the codec was a
# setting (main at 511cfcd, Pillow 12.3.0): the default release's bytes have not moved.
WEBP_DIGEST_BEFORE = "cba17a5aa0fde0dbb97486400aadf71a6f7d64f92f8323208559a9643ac7223f"
# Colour-space EXIF tags the encoder keeps (IFD0, Exif IFD; their pointers), SPEC "Output".
IFD0_KEPT = {0x013E, 0x013F, 0x0211, 0x0212, 0x0213, 0x8769}
EXIF_KEPT = {0xA001, 0xA500, 0xA005}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw_jpeg")
    summary = write_sample_raw(root, synsets=2, images=20, seed=0)
    members: dict[str, bytes] = {}
    for tar in summary.tars:
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                members[m.name] = tf.extractfile(m).read()
    return types.SimpleNamespace(root=root, summary=summary, members=members, quirks=summary.quirks)


def _encode_all(members: dict[str, bytes], settings: EncodeSettings) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, data in members.items():
        try:
            out[name] = encode_image(data, settings)
        except ImageRejected as e:
            out[name] = e.reason
    return out


@pytest.fixture(scope="module")
def encoded(release):
    return types.SimpleNamespace(webp=_encode_all(release.members, EncodeSettings()),
                                 jpeg=_encode_all(release.members, JPEG))


def _digest(results: dict[str, object]) -> str:
    table = {k: (hashlib.sha256(v.webp).hexdigest() if isinstance(v, encode.Encoded) else v)
             for k, v in results.items()}
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()


def markers(jpeg: bytes) -> list[tuple[int, bytes]]:
    """(marker, first bytes of its segment) of each segment before the first scan."""
    assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"
    pos, out = 2, []
    while True:
        marker, length = jpeg[pos + 1], int.from_bytes(jpeg[pos + 2:pos + 4], "big")
        out.append((marker, jpeg[pos + 4:pos + 4 + min(length - 2, 14)]))
        if marker == 0xDA:
            return out
        pos += 2 + length


def pre_codec_image(data: bytes, max_short: int = 768) -> Image.Image:
    """The RGB image at its final size that both codecs store (the encoder's own decode, colour
    and resize steps: what the sizing and colour rules give)."""
    img, _orig, target, box, _repaired = decode(data, max_short)
    return encode._to_rgb_resized(img, target, box)


# ----------------------------------------------------------------------------- one image


def test_default_webp_bytes_are_those_before_the_codec_setting(encoded):
    assert _digest(encoded.webp) == WEBP_DIGEST_BEFORE


def test_jpeg_keeps_and_refuses_exactly_what_webp_does_at_the_same_sizes(release, encoded):
    refused = {k: v for k, v in encoded.webp.items() if isinstance(v, str)}
    assert refused == {k: v for k, v in encoded.jpeg.items() if isinstance(v, str)}
    q = release.quirks
    assert set(refused) == set(q["tiny"]) | set(q["undecodable"]) | set(q["empty"])
    for name, w in encoded.webp.items():
        if isinstance(w, str):
            continue
        j = encoded.jpeg[name]
        assert (j.width, j.height, j.orig_width, j.orig_height, j.repaired) == \
               (w.width, w.height, w.orig_width, w.orig_height, w.repaired), name
        assert j.webp[:3] == b"\xff\xd8\xff" and w.webp[:4] == b"RIFF"


def test_every_quirk_as_jpeg_follows_the_output_rules(release, encoded):
    q = release.quirks
    for name, enc in encoded.jpeg.items():
        if isinstance(enc, str):
            continue
        src = Image.open(io.BytesIO(release.members[name]))
        with Image.open(io.BytesIO(enc.webp)) as im:
            im.load()
            assert (im.format, im.mode) == ("JPEG", "RGB"), name
            assert im.size == (enc.width, enc.height) == target_size(*src.size), name
            assert jpeg_frame_size(enc.webp) == im.size
            # the fixed choices: baseline, 4:2:0, no comment, no XMP, no orientation
            assert JpegImagePlugin.get_sampling(im) == 2 and not im.info.get("progressive"), name
            assert "comment" not in im.info and "xmp" not in im.info, name
            exif = im.getexif()
            assert set(exif) <= IFD0_KEPT, (name, sorted(exif))
            assert set(exif.get_ifd(0x8769)) <= EXIF_KEPT and not exif.get_ifd(0x8825), name
            icc = im.info.get("icc_profile")
            decoded = im.copy()
        # segments: JFIF, EXIF only when a colour tag is kept, ICC only for an RGB profile, tables, frame
        kinds = {m for m, _ in markers(enc.webp)}
        assert kinds <= {0xE0, 0xE1, 0xE2, 0xDB, 0xC4, 0xC0, 0xDA}, (name, sorted(kinds))
        assert b"http://ns.adobe.com/xap" not in enc.webp and b"xmpmeta" not in enc.webp, name
        source_icc = src.info.get("icc_profile")
        assert icc == rgb_icc_profile(source_icc, src.mode), name
        # the pixels are the rule's (convert("RGB"), 16-bit grey scaled, resized) within JPEG's loss:
        # under 7.5 on these noisy photos at JPEG quality 90 (WebP's: 0.7 to 6.5); a wrong colour rule
        # (CMYK inverted, 16-bit grey clipped at 255) is off by tens
        want = np.asarray(pre_codec_image(release.members[name]), dtype=np.int16)
        got = np.asarray(decoded, dtype=np.int16)
        assert np.abs(got - want).mean() < 10, (name, np.abs(got - want).mean())

    def one(quirk: str):
        (name,) = q[quirk]
        return encoded.jpeg[name], release.members[name]

    enc, _ = one("exif_gps")  # camera, GPS gone; ColorSpace kept
    exif = Image.open(io.BytesIO(enc.webp)).getexif()
    assert exif.get_ifd(0x8769).get(0xA001) == 1 and 0x010F not in exif and not exif.get_ifd(0x8825)
    enc, data = one("icc")  # an RGB source's profile carried byte for byte
    assert Image.open(io.BytesIO(enc.webp)).info["icc_profile"] == Image.open(io.BytesIO(data)).info["icc_profile"]
    enc, _ = one("orientation")  # pixels as stored, the tag dropped
    assert 0x0112 not in Image.open(io.BytesIO(enc.webp)).getexif()
    enc, _ = one("truncated")
    assert enc.repaired is True
    enc, data = one("grey16")  # scaled to 8 bit (round(v/257)), not clipped at 255
    grey = np.asarray(Image.open(io.BytesIO(enc.webp)), dtype=np.float64)
    source = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64) / 257
    assert abs(grey.mean() - source.mean()) < 2 and grey.mean() < 200
    assert np.abs(grey[..., 0] - grey[..., 2]).max() <= 2  # grey stays grey
    for quirk in ("large", "huge"):
        for name in q[quirk]:
            assert min(encoded.jpeg[name].width, encoded.jpeg[name].height) == 768


@pytest.mark.parametrize("codec", ["webp", "jpeg"])
def test_max_short_edge_sizes_both_codecs(release, codec):
    (name,) = release.quirks["huge"]
    data = release.members[name]
    w, h = Image.open(io.BytesIO(data)).size
    enc = encode_image(data, EncodeSettings(codec=codec, max_short=300))
    assert (enc.width, enc.height) == target_size(w, h, 300) and min(enc.width, enc.height) == 300
    with Image.open(io.BytesIO(enc.webp)) as im:
        assert im.size == (enc.width, enc.height)


def test_jpeg_quality_is_the_settings(release):
    data = release.members[release.quirks["large"][0]]
    low, high = (encode_image(data, EncodeSettings(codec="jpeg", quality=q)).webp for q in (50, 90))
    assert len(low) < len(high)
    with pytest.raises(ValueError, match="JPEG quality"):
        EncodeSettings(codec="jpeg", quality=101)
    with pytest.raises(ValueError, match="codec"):
        EncodeSettings(codec="png")


def test_jpeg_bytes_are_the_same_in_another_process_with_or_without_simd(release, encoded, tmp_path):
    """A fresh interpreter (as every encode worker is) gives byte-identical JPEGs, and so does one
    whose libjpeg-turbo runs without SIMD (JSIMD_FORCENONE, libjpeg-turbo's switch): a worker on a
    CPU with other vector units (none, SSE2 only, AVX2) writes the same bytes."""
    kept = {k: v for k, v in release.members.items() if not isinstance(encoded.jpeg[k], str)}
    (tmp_path / "in.json").write_text(json.dumps({k: v.hex() for k, v in kept.items()}))
    child = (
        "import hashlib, json, sys\n"
        "from imnet_assets.image.encode import EncodeSettings, encode_image\n"
        "src = json.load(open(sys.argv[1]))\n"
        "s = EncodeSettings(codec='jpeg', quality=95)\n"
        "print(json.dumps({k: hashlib.sha256(encode_image(bytes.fromhex(v), s).webp).hexdigest()"
        " for k, v in src.items()}))\n"
    )
    here = {k: hashlib.sha256(encoded.jpeg[k].webp).hexdigest() for k in kept}
    assert len(here) >= 15
    for simd in ({}, {"JSIMD_FORCENONE": "1"}):
        env = {k: v for k, v in os.environ.items() if not k.startswith("JSIMD_")} | simd
        proc = subprocess.run([sys.executable, "-c", child, str(tmp_path / "in.json")], capture_output=True,
                              text=True, timeout=300, check=True, env=env)
        assert json.loads(proc.stdout) == here, simd


def test_the_codec_and_its_settings_are_in_the_fingerprint_and_webp_fingerprints_stay():
    digest = "d" * 64
    # computed at ENCODER_VERSION 3 (main at 511cfcd, before the codec was a setting, gave these at 2:
    # adding the codec setting made no WebP shard stale; version 3's ICC rule does, on purpose)
    assert fingerprint(digest, EncodeSettings()) == "37dbb7b176681b1b1449b99552851f703cd0db3bf9334d529cf3ab75746caf86"
    assert fingerprint(digest, EncodeSettings(alt_labels="in1k")) == \
        "565a4f7e2b73fcb0c9cf713f9319f5d705d596a087f3b6114bbba6debfbc1a2d"
    assert fingerprint(digest, EncodeSettings(quality=80, method=2, max_short=512)) == \
        "2e3fbdbc76f4902648c9f314dc2a9f14824ec72fe597ac0c7837c31012cd124c"
    assert code_version(EncodeSettings()) == "enc3-q90-m4-s768"
    jpeg = fingerprint(digest, JPEG)
    others = {fingerprint(digest, EncodeSettings(quality=95)), fingerprint(digest, EncodeSettings(codec="jpeg", quality=94)),
              fingerprint(digest, EncodeSettings(codec="jpeg", quality=95, max_short=512))}
    assert jpeg not in others and len(others) == 3
    # the WebP method does not touch a JPEG's bytes, so it does not make JPEG shards stale
    assert fingerprint(digest, EncodeSettings(codec="jpeg", quality=95, method=6)) == jpeg
    assert code_version(JPEG) == "enc3-jpeg-q95-s768"


def test_jpeg_problem_reads_the_frame_and_judges_what_it_cannot(release, encoded):
    enc = next(v for v in encoded.jpeg.values() if not isinstance(v, str))
    size = (enc.width, enc.height)
    assert jpeg_problem(enc.webp, size, decode=False) == jpeg_problem(enc.webp, size, decode=True) == ""
    assert "jpg header says JPEG RGB" in jpeg_problem(enc.webp, (size[0] + 1, size[1]), decode=False)
    cut = enc.webp[: len(enc.webp) // 2]
    assert jpeg_frame_size(cut) is None
    assert jpeg_problem(cut, size, decode=False) != "" and jpeg_problem(cut, size, decode=True) != ""
    grey = io.BytesIO()
    Image.new("L", size, 99).save(grey, "JPEG")
    assert "jpg header says JPEG L" in jpeg_problem(grey.getvalue(), size, decode=False)
    webp = encoded.webp[next(k for k, v in encoded.jpeg.items() if v is enc)].webp
    assert "WEBP" in jpeg_problem(webp, size, decode=False)


# ----------------------------------------------------------------------------- a JPEG release


@pytest.fixture(scope="module")
def built(release, tmp_path_factory):
    """The sample release built as a JPEG release in 2 shards, audited (the catalog stages, the
    shard runs and the audit as `imnet build` runs them, without Dagster)."""
    base = tmp_path_factory.mktemp("jpeg_release")
    s = dataclasses.replace(local_settings(release.root, base, IMNET_NUM_SHARDS=2), codec="jpeg")
    build_catalog_stages(s)
    results = {key: build_shard(out_root=s.out_root, raw_root=s.raw_root, shard_key=key, shard_name=s.shard_name(key),
                                settings=encode_settings(s), workers=1, run_id=f"run-{key}")
               for key in s.partition_keys}
    report = run_audit(s, "run-audit", log=QUIET)
    return types.SimpleNamespace(base=base, s=s, results=results, report=report,
                                 urls=[os.path.join(s.out_root, s.shard_name(k)) for k in s.partition_keys])


def test_a_jpeg_release_passes_the_shard_check_and_the_audit(built):
    assert encode_settings(built.s) == JPEG
    for key, result in built.results.items():
        assert result.problems == [] and result.num_samples > 0, result.problems
        assert check_committed_shard(built.s.out_root, key, built.s.shard_name(key), decode_every=1) == []
        assert shard_verdict(built.s.out_root, key, built.s.shard_name(key), result.fingerprint) == "fresh"
        # a WebP release's settings find the JPEG shard stale: changing the codec rebuilds
        webp = fingerprint(json.loads(Path(state_url(built.s.out_root, key)).read_text())["fingerprint"], JPEG)
        assert webp != result.fingerprint
    assert built.report.problems == []
    samples = 0
    for url in built.urls:
        with tarfile.open(url) as tf:
            names = tf.getnames()
            assert [n.rpartition(".")[2] for n in names] == ["cls", "json", "jpg"] * (len(names) // 3)
            for n in names[2::3]:
                meta = json.loads(tf.extractfile(n[: -len("jpg")] + "json").read())
                with Image.open(io.BytesIO(tf.extractfile(n).read())) as im:
                    assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (meta["width"], meta["height"]))
                samples += 1
    assert samples == sum(r.num_samples for r in built.results.values())


def test_a_jpeg_shard_is_the_same_bytes_with_two_workers(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built.s.out_root, out)
    key = built.s.partition_keys[0]
    again = build_shard(out_root=str(out), raw_root=built.s.raw_root, shard_key=key, shard_name=built.s.shard_name(key),
                        settings=JPEG, workers=2, run_id="run-again")
    assert again.problems == [] and again.sha256 == built.results[key].sha256


def test_a_corrupted_byte_in_a_jpeg_sample_fails_the_shard_check(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built.s.out_root, out)
    key = built.s.partition_keys[0]
    sample = corrupt_an_image_byte(str(out / built.s.shard_name(key)), "jpg", 0x10)
    for every in (0, 1):
        problems = check_committed_shard(str(out), key, built.s.shard_name(key), decode_every=every)
        assert any(f"sample {sample}: jpg payload" in p and "sha256 differs" in p for p in problems), problems


def test_a_byte_corrupted_after_the_commit_fails_the_in_run_check(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built.s.out_root, out)
    key = built.s.partition_keys[1]
    hit: list[str] = []
    result = build_shard(out_root=str(out), raw_root=built.s.raw_root, shard_key=key, shard_name=built.s.shard_name(key),
                         settings=JPEG, workers=1, run_id="run-bad", after_commit=lambda url: hit.append(corrupt_an_image_byte(url, "jpg", 0x10)))
    assert any(f"sample {hit[0]}: jpg payload" in p for p in result.problems), result.problems
    assert not Path(state_url(str(out), key)).exists()  # never recorded as committed


def test_imnet_verify_reads_a_jpeg_release_against_the_catalog(built):
    with Catalog(built.s.catalog, read_only=True) as cat:
        shards = {sh["shard"]: sh for sh in cat.dicts("verify_shards", {"release": built.s.release})}
        rows = cat.rows("verify_samples", {"shards": sorted(shards), "release": built.s.release})
    for key, sh in shards.items():
        mine = [tuple(r[1:]) for r in rows if r[0] == key]
        url = os.path.join(built.s.out_root, sh["path"])
        assert verify_catalog_shard(url, sh, mine, decode=True, ext="jpg") == []
        wrong = verify_catalog_shard(url, sh, mine, decode=False, ext="webp")
        assert any("members ['cls', 'json', 'jpg'], expected ['cls', 'json', 'webp']" in p for p in wrong)


def test_webdataset_timm_and_imnet_read_a_jpeg_release(built):
    info = json.loads(Path(info_url(built.s)).read_text())
    train = info["splits"]["train"]
    urls = [os.path.join(built.s.out_root, f) for f in train["filenames"]]
    # webdataset's own decoders: `.jpg` is an image extension
    got = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "json"))
    assert len(got) == train["num_samples"] > 0
    for img, cls, meta in got:
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (meta["width"], meta["height"])
        assert int(cls) == meta["label"]
    # timm's ReaderWds (timm/data/readers/reader_wds.py, timm 1.0.31): `_decode` takes the first of
    # input_key "jpg;png;webp" present in the sample, PIL-opens it and converts to RGB; the target is .cls
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        raw = wds.getfirst(sample, "jpg;png;webp")
        with io.BytesIO(raw) as b:
            img = Image.open(b)
            img.load()
        assert img.convert("RGB").size == tuple(json.loads(sample["json"])[k] for k in ("width", "height"))
        assert int(sample["cls"]) >= 0
        n += 1
    assert n == train["num_samples"]
    # this project's reader
    pairs = list(read.dataset(built.s.out_root, split="train"))
    assert len(pairs) == n and all(isinstance(img, Image.Image) for img, _ in pairs)


def test_the_card_of_a_jpeg_release_says_jpeg(built):
    text = Path(card_url(built.s)).read_text()
    assert "pretty_name: 'ImageNet Winter21 (JPEG, WebDataset)" in text or "ImageNet Winter21 (JPEG, WebDataset)" in text
    assert "- jpeg" in text and "- webp" not in text
    assert "`<key>.jpg` (the image, baseline JPEG, RGB)" in text
    assert "width of the stored JPEG" in text and "WebP" not in text
    assert 'to_tuple("jpg", "cls", "json")' in text and 'input_key="jpg"' in text
    assert "| `codec` | `jpeg` |" in text and "| `jpeg_quality` | `95` |" in text
    assert "enc3-jpeg-q95-s768" in text
