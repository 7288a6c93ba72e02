"""SPEC.md's promises checked against a raw release unlike imnet sample-raw's (tests/spec_raw.py: CMYK,
16-bit grey, palette GIF, RGBA, EXIF GPS + XMP + ICC, 768/769 short sides, 1x1, truncated files
above and below 5%, empty and text members, a duplicate across synsets and one whose tar order is not
its sorted order, hostile member names), read back as users and the acceptance checks read it: tarfile
and webdataset for the shards, Pillow for the pixels, DuckDB (read-only) for the catalog, the raw
tars' own bytes for the offsets.

One `imnet build` of the tar layout (settings from the project's `.env`, one overridden by the
environment), one of the same files as extracted folders with the same settings into a fresh out
root (byte-identical shards; `imnet verify` then fails on a changed byte).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml
from PIL import Image, ImageFile

from tests.checks import catalog
from tests.conftest import imnet
from tests.spec_raw import IN1K_A, IN1K_B, OTHER_D, WNIDS, write_spec_raw

NUM_SHARDS = 7  # the environment's; .env says 5 (the environment wins)
PATTERN = "w21-{shard}-of-x.tar"
DOTENV = f"""IMNET_RAW_ROOT=raw
IMNET_OUT_ROOT=out
IMNET_CATALOG=catalog.duckdb
IMNET_NUM_SHARDS=5
IMNET_ALT_LABELS=in1k
IMNET_HOLDOUT=validation:1
IMNET_SHARD_PATTERN={PATTERN}
"""


def project(tmp: Path, layout: str) -> tuple[Path, dict[str, str], list]:
    """A project root holding `.env` and the raw release; `imnet build` run from outside it."""
    root = tmp / f"proj-{layout}"
    rows = write_spec_raw(root / "raw", layout)
    (root / ".env").write_text(DOTENV)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMNET_", "DAGSTER_HOME"))}
    env.update(IMNET_PROJECT_ROOT=str(root), IMNET_NUM_SHARDS=str(NUM_SHARDS), IMNET_WORKERS="2")
    imnet(["build"], env, cwd=tmp)
    return root, env, rows


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spec")
    return project(tmp, "tars")


def shards_of(root: Path) -> list[Path]:
    return [root / "out" / PATTERN.format(shard=f"{i:04d}") for i in range(NUM_SHARDS)]


def read_shard(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """The samples of one shard in order, split as webdataset splits them (first dot of the basename);
    each sample's members in their tar order."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tf.extractfile(m).read()
    return samples


def expected_size(w: int, h: int) -> tuple[int, int]:
    short = min(w, h)
    if short <= 768:
        return w, h
    return (768, round(h * 768 / w)) if w == short else (round(w * 768 / h), 768)


def expected_rgb(data: bytes) -> Image.Image:
    """SPEC's colour rule, written from SPEC: convert("RGB"), except 16-bit grey as round(v/257)."""
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    if img.mode.startswith("I;16"):
        v = np.asarray(img.convert("I"), dtype=np.float64)
        return Image.fromarray(np.floor(v / 257 + 0.5).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def webp_pixels(img: Image.Image) -> np.ndarray:
    """`img` through the same lossy WebP settings (the README's defaults), decoded."""
    buf = io.BytesIO()
    img.save(buf, "WEBP", quality=90, method=4)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.int16)


def test_settings_env_over_dotenv_relative_to_project(built):
    root, _, _ = built
    assert [p.exists() for p in shards_of(root)] == [True] * NUM_SHARDS
    assert not (root / "out" / PATTERN.format(shard=f"{NUM_SHARDS:04d}")).exists()
    assert (root / "catalog.duckdb").is_file()


def test_shard_members_order_and_fields(built):
    root, _, rows = built
    with catalog(root / "catalog.duckdb") as con:
        plan = con.execute("SELECT shard, key FROM plan ORDER BY shard, position").fetchall()
        labels = dict(con.execute("SELECT wnid, label FROM synsets").fetchall())
        images = {k: (w, t, wd, ht, sha) for k, w, t, wd, ht, sha in con.execute(
            "SELECT key, wnid, tar, width, height, sha256 FROM images WHERE status = 'kept'").fetchall()}
    assert labels == {w: i for i, w in enumerate(WNIDS)}
    in1k = {IN1K_A: 0, IN1K_B: 1}
    seen = []
    for path in shards_of(root):
        with tarfile.open(path) as tf:
            members = tf.getmembers()
        with open(path, "rb") as f:
            head = f.read(512)
        assert head[257:265] == b"ustar\x0000", "not a POSIX (ustar) tar"
        samples = read_shard(path)
        assert [m.name for m in members] == [f"{k}.{e}" for k, _ in samples for e in ("cls", "json", "webp")]
        for key, parts in samples:
            seen.append((path.name[4:8], key))
            wnid, _, ow, oh, _ = images[key]
            assert parts["cls"] == str(labels[wnid]).encode(), (key, parts["cls"])
            meta = json.loads(parts["json"])
            assert meta["filename"] == f"{wnid}/{key}.JPEG", meta
            assert (meta["label"], meta["class_name"]) == (labels[wnid], wnid), meta
            assert meta["label_in1k"] == in1k.get(wnid, -1), meta
            assert (meta["orig_width"], meta["orig_height"]) == (ow, oh), meta
            assert (meta["width"], meta["height"]) == expected_size(ow, oh), meta
            webp = parts["webp"]
            assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP" and b"VP8L" not in webp[:64], key
            img = Image.open(io.BytesIO(webp))
            assert (img.format, img.mode, img.size) == ("WEBP", "RGB", (meta["width"], meta["height"])), key
    assert seen == plan
    # every member the raw release means to keep is there, once
    assert sorted(k for _, k in seen) == sorted(images)
    assert len(seen) == sum(1 for r in rows if r[3] in ("kept", "repaired", "dup", "first"))


def test_sizes_and_colour(built):
    root, _, rows = built
    with catalog(root / "catalog.duckdb") as con:
        by_member = {(t, m): k for k, t, m in con.execute(
            "SELECT key, tar, member FROM images WHERE status = 'kept'").fetchall()}
    stored = {k: p for path in shards_of(root) for k, p in read_shard(path)}
    name = {(w, n): d for w, n, d, _ in rows}
    src = {by_member[(f"{w}.tar", n)]: d for (w, n), d in name.items()
           if (f"{w}.tar", n) in by_member}
    sizes = {k: Image.open(io.BytesIO(stored[k]["webp"])).size for k in ("n01440764_6", "n01440764_7")}
    assert sizes == {"n01440764_6": (1000, 768), "n01440764_7": (768, 1198)}
    for key in ("n01440764_1", "n01440764_2", "n01440764_3", "n01440764_4", "n01440764_5", "n01440764_20",
                "n01440764_21", "n01440764_9"):
        got = np.asarray(Image.open(io.BytesIO(stored[key]["webp"])).convert("RGB"), dtype=np.int16)
        want = webp_pixels(expected_rgb(src[key]))
        assert np.abs(got - want).max() <= 2, (key, np.abs(got - want).max())
    # 16-bit grey: v/257, not Pillow's clipping convert (which makes most pixels 255)
    grey = np.asarray(Image.open(io.BytesIO(stored["n01440764_2"]["webp"])).convert("L"), dtype=np.int16)
    assert (grey < 250).mean() > 0.5


def metadata(webp: bytes) -> tuple[dict, bytes | None, bool]:
    img = Image.open(io.BytesIO(webp))
    exif = img.getexif()
    tags = {**dict(exif), **{("exif", t): v for t, v in exif.get_ifd(0x8769).items()},
            **{("gps", t): v for t, v in exif.get_ifd(0x8825).items()}}
    return tags, img.info.get("icc_profile"), b"XMP " in webp


def test_metadata_rules(built):
    from tests.spec_raw import SRGB_ICC

    root, _, _ = built
    stored = {k: p for path in shards_of(root) for k, p in read_shard(path)}
    tags, icc, xmp = metadata(stored["n01440764_5"]["webp"])
    # only the colour-space tags: ColorSpace kept; Make, Orientation, DateTimeOriginal, GPS, XMP gone
    assert {t: v for t, v in tags.items() if t != 0x8769} == {("exif", 0xA001): 1}, tags
    assert not xmp
    assert icc == SRGB_ICC  # an RGB source's profile, unchanged
    assert metadata(stored["n01440764_21"]["webp"])[1] == SRGB_ICC  # RGB PNG
    # a CMYK and a greyscale source are not RGB sources: their profiles are not carried, even one
    # that claims RGB (their pixels went through convert("RGB"), not through the profile)
    for key in ("n01440764_1", "n01440764_20"):
        assert metadata(stored[key]["webp"])[1] is None, key


def test_balance_info_json_card_and_classes(built):
    root, _, rows = built
    out = root / "out"
    counts = [len(read_shard(p)) for p in shards_of(root)]
    n = sum(counts)
    assert counts == [n // NUM_SHARDS + (i < n % NUM_SHARDS) for i in range(NUM_SHARDS)], counts
    assert n % NUM_SHARDS != 0
    in1k_counts = [sum(json.loads(s["json"])["label_in1k"] >= 0 for _, s in read_shard(p)) for p in shards_of(root)]
    names = [p.name for p in shards_of(root)]
    assert json.loads((out / "_info.json").read_text()) == {
        "name": json.loads((out / "_info.json").read_text())["name"],
        "splits": {
            "train": {"name": "train", "filenames": names[:-1], "shard_lengths": counts[:-1],
                      "num_samples": sum(counts[:-1])},
            "validation": {"name": "validation", "filenames": names[-1:], "shard_lengths": counts[-1:],
                           "num_samples": counts[-1]},
            "train_in1k": {"name": "train_in1k", "alt_label": "label_in1k", "filenames": names[:-1],
                           "shard_lengths": in1k_counts[:-1], "num_samples": sum(in1k_counts[:-1])},
        },
    }
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert {"pretty_name", "license", "task_categories", "size_categories", "configs"} <= set(front), front
    assert front["license"] == "other"
    splits = {f["split"]: f["path"] for c in front["configs"] for f in c["data_files"]}
    assert splits == {"train": names[:-1], "validation": names[-1:], "train_in1k": names[:-1]}, splits
    for field in ("filename", "label", "class_name", "width", "height", "orig_width", "orig_height", "label_in1k"):
        assert f"`{field}`" in card, field
    lines = (out / "classes.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["label", "wnid", "lemma", "gloss", "count"]
    kept_per_wnid = {w: 0 for w in WNIDS}
    for _, s in (x for p in shards_of(root) for x in read_shard(p)):
        kept_per_wnid[json.loads(s["json"])["class_name"]] += 1
    assert [tuple(line.split("\t")) for line in lines[1:]] == [
        (str(i), w, "cell" if w == OTHER_D else f"lemma of {w}, other", f"gloss of {w}", str(kept_per_wnid[w]))
        for i, w in enumerate(WNIDS)]  # OTHER_D: not in words.txt, its lemma from the shipped table


def test_catalog_rows_offsets_and_duplicates(built):
    root, _, rows = built
    with catalog(root / "catalog.duckdb") as con:
        cols = {t: {c for (c, *_) in con.execute(f"DESCRIBE {t}").fetchall()}
                for t in ("synsets", "images", "plan", "shard_samples", "shards")}
        images = con.execute('SELECT key, tar, member, "offset", size, sha256, status, reason, duplicate_of '
                             'FROM images').fetchall()
    assert {"wnid", "label", "lemma", "gloss", "num_images", "num_kept"} <= cols["synsets"]
    assert {"key", "wnid", "tar", "member", "offset", "size", "sha256", "width", "height", "format", "mode",
            "status", "reason", "duplicate_of"} <= cols["images"]
    assert {"key", "shard", "position"} <= cols["plan"]
    assert {"key", "shard", "position", "width", "height", "webp_bytes", "webp_sha256", "repaired"} <= cols["shard_samples"]
    assert {"shard", "path", "num_samples", "bytes", "sha256", "run_id", "code_version", "written_at"} <= cols["shards"]
    # one row per raw member, at the member data's real byte offset (tarfile's, and the bytes there)
    found = {}
    for wnid in WNIDS:
        path = root / "raw" / f"{wnid}.tar"
        blob = path.read_bytes()
        with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tf:
            for m in tf.getmembers():
                found[(f"{wnid}.tar", m.offset_data)] = (m.size, hashlib.sha256(blob[m.offset_data:m.offset_data + m.size]).hexdigest())
    assert len(images) == len(rows) == len(found)
    assert {(t, o): (s, h) for _, t, _, o, s, h, *_ in images} == found
    assert sorted(st for *_, st, _, _ in images) == sorted(
        "excluded" if e == "excluded" else "kept" for *_, e in rows)
    assert all(reason for *_, st, reason, _ in images if st == "excluded")
    # duplicate_of: the first key in sorted order with the same sha256 (NULL for that key itself)
    groups: dict[str, list[str]] = {}
    for key, _, _, _, _, sha, *_ in images:
        groups.setdefault(sha, []).append(key)
    for key, _, _, _, _, sha, _, _, dup in images:
        first = min(groups[sha])
        assert dup == (None if key == first else first), (key, dup, sorted(groups[sha]))
    assert {k: d for k, *_, d in images if d} == {"n00005787_3": "n00005787_10", "n01443537_1": "n01440764_13"}
    # a repeated key: the file in the key's own synset's tar stays, not the one misplaced in the first tar
    held = {t: (st, reason) for k, t, _, _, _, _, st, reason, _ in images if k == f"{IN1K_B}_2"}
    assert held[f"{IN1K_B}.tar"] == ("kept", None), held
    assert held[f"{IN1K_A}.tar"][0] == "excluded", held
    assert held[f"{IN1K_A}.tar"][1].startswith(f"duplicate key: also in {IN1K_B}.tar at byte "), held


def test_webdataset_reads_every_sample(built):
    root, _, _ = built
    samples = list(wds.WebDataset([str(p) for p in shards_of(root)], shardshuffle=False).decode("pil"))
    expected = [k for p in shards_of(root) for k, _ in read_shard(p)]
    assert [s["__key__"] for s in samples] == expected
    assert all(set(s) >= {"cls", "json", "webp"} and s["webp"].mode == "RGB" for s in samples)
    assert all(s["cls"] == s["json"]["label"] for s in samples)


def test_lineage_names_source_and_shard(built):
    root, env, _ = built
    text = imnet(["lineage", "n01443537_2"], env, cwd=root.parent).stdout
    assert "n01440764.tar" in text and "member n01443537_2.JPEG" in text and "shard" in text, text
    blocks = {b.split("\n")[1]: b for b in text.strip().split("\n\n")}  # by its `source` line
    own = next(b for src, b in blocks.items() if f"{IN1K_B}.tar" in src)
    misplaced = next(b for src, b in blocks.items() if f"{IN1K_A}.tar" in src)
    assert "status       kept" in own and "shard" in own, text
    assert f"duplicate key: also in {IN1K_B}.tar" in misplaced, text
    # a raw stem that was sanitized (a dot in it) is found by that stem, naming the key it was kept under
    text = imnet(["lineage", f"{IN1K_A}_1.5"], env, cwd=root.parent).stdout
    assert f"raw name     {IN1K_A}_1.5.JPEG: kept under {IN1K_A}_1_5_h" in text and "shard" in text, text
    # and an excluded one says why
    text = imnet(["lineage", f"../{IN1K_A}_15.JPEG"], env, cwd=root.parent).stdout
    assert "raw name     ../" in text and "unsafe member name" in text, text


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return project(tmp_path_factory.mktemp("spec-folders"), "folders")


def test_folder_layout_byte_identical_then_verify_fails_on_a_changed_byte(built, folders):
    a = [hashlib.sha256(p.read_bytes()).hexdigest() for p in shards_of(built[0])]
    b = [hashlib.sha256(p.read_bytes()).hexdigest() for p in shards_of(folders[0])]
    assert a == b
    root, env, _ = folders
    assert imnet(["verify"], env, cwd=root.parent).returncode == 0
    shard = shards_of(root)[3]
    data = bytearray(shard.read_bytes())
    pos = data.index(b"VP8 ") + 40  # inside an image's bitstream
    data[pos] ^= 0x01
    shard.write_bytes(bytes(data))
    proc = imnet(["verify"], env, cwd=root.parent, check=False)
    assert proc.returncode != 0, proc.stdout
    assert "0003" in proc.stdout + proc.stderr


RELEASES = """
[release.full]
out_root = "out/full"
num_shards = 3
val_per_class = 2

[release.sub]
out_root = "out/sub"
synsets = "sub.txt"
codec = "jpeg"
num_shards = 2
shard_pattern = "sub-{shard}.tar"
"""


def test_releases_file_one_then_all(tmp_path):
    root = tmp_path / "proj"
    write_spec_raw(root / "raw", "tars")
    (root / "sub.txt").write_text(f"{IN1K_B}\nn00005787\n")
    (root / "releases.toml").write_text(RELEASES)
    (root / ".env").write_text("IMNET_RAW_ROOT=raw\nIMNET_CATALOG=catalog.duckdb\nIMNET_RELEASES=releases.toml\n"
                               "IMNET_ALT_LABELS=in1k\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMNET_", "DAGSTER_HOME"))}
    env.update(IMNET_PROJECT_ROOT=str(root), IMNET_WORKERS="2")
    imnet(["build", "--release", "sub"], env, cwd=tmp_path)
    assert sorted(p.name for p in (root / "out" / "sub").glob("*.tar")) == ["sub-0000.tar", "sub-0001.tar"]
    assert not list((root / "out" / "full").glob("*.tar"))
    imnet(["build"], env, cwd=tmp_path)
    # sub: labels are indexes in the release's own sorted synsets, JPEG members
    sub = [(k, s) for p in sorted((root / "out" / "sub").glob("sub-*.tar")) for k, s in read_shard(p)]
    assert {json.loads(s["json"])["class_name"] for _, s in sub} == {"n00005787", IN1K_B}
    # n01443537_2, also misplaced in n01440764.tar (a synset sub leaves out), is in sub's shards
    assert f"{IN1K_B}_2" in {k for k, _ in sub}
    for key, s in sub:
        meta = json.loads(s["json"])
        assert list(s) == ["cls", "json", "jpg"], key
        assert s["cls"] == str(meta["label"]).encode() == str(sorted(["n00005787", IN1K_B]).index(meta["class_name"])).encode()
        assert Image.open(io.BytesIO(s["jpg"])).format == "JPEG"
    # full: 2 kept images of each class in a validation split of their own shards, disjoint from train
    info = json.loads((root / "out" / "full" / "_info.json").read_text())["splits"]
    val = [k for f in info["validation"]["filenames"] for k, _ in read_shard(root / "out" / "full" / f)]
    train = [k for f in info["train"]["filenames"] for k, _ in read_shard(root / "out" / "full" / f)]
    assert not set(info["validation"]["filenames"]) & set(info["train"]["filenames"])
    assert not set(val) & set(train) and len(set(val + train)) == len(val + train)
    with catalog(root / "catalog.duckdb") as con:
        kept = con.execute("SELECT count(*) FROM images WHERE status = 'kept'").fetchone()[0]
        wnid_of = dict(con.execute("SELECT key, wnid FROM images WHERE status = 'kept'").fetchall())
    assert len(val) + len(train) == kept
    assert sorted(wnid_of[k] for k in val) == sorted(WNIDS * 2)
    assert info["train"]["shard_lengths"] == [11, 11, 11] and len(val) == info["validation"]["num_samples"]
    # lineage names every release holding the image
    text = imnet(["lineage", "n00005787_4"], env, cwd=tmp_path).stdout
    assert "release      full" in text and "release      sub" in text, text
