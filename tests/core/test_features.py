"""Issue 17, beyond the release, on a small raw release of real JPEG photos with real synset ids:
eval-set decontamination (byte-identical and near copies, nested folders and a tar of eval images),
exact duplicates (`duplicate_of`, IMNET_DEDUP), `label_in1k` and the `train_in1k` split
(IMNET_ALT_LABELS=in1k), lemmas from the shipped synset table, and the dataset card."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import types
from pathlib import Path

import duckdb
import pytest
import webdataset as wds
from PIL import Image

from imnet_assets.image import perceptual
from imnet_assets.release.altlabels import in1k_labels
from imnet_assets.release.card import card_url
from imnet_assets.release.info import info_url
from imnet_assets.release.verify import iter_samples
from imnet_assets.sample.photos import make_photo
from imnet_assets.stages.audit import check_info, encode_settings, run_audit
from imnet_assets.stages.filtered_index import build_filtered_index
from imnet_assets.stages.fingerprints import INDEX_VERSION, _h, stale_stages
from imnet_assets.stages.shard import build_shard
from imnet_assets.storage.catalog import Catalog
from imnet_assets.storage.inventory import list_raw
from tests.conftest import build_catalog_stages, local_settings
from tests.core.test_shard import write_raw_tar

QUIET = lambda _m: None  # noqa: E731
IN1K = ["n01440764", "n01443537"]  # tench, goldfish: ImageNet-1k synsets
NOT_IN1K = ["n00005787", "n00006024"]  # benthos, heterotroph: Winter21 synsets outside ImageNet-1k
WNIDS = sorted(IN1K + NOT_IN1K)
PER_SYNSET = 6


def _jpeg(im: Image.Image, q: int = 90) -> bytes:
    out = io.BytesIO()
    im.convert("RGB").save(out, "JPEG", quality=q)
    return out.getvalue()


def _photo(seed: int, w: int = 200, h: int = 150) -> bytes:
    return _jpeg(make_photo(w, h, random.Random(seed)))


def write_release(base: Path) -> types.SimpleNamespace:
    """Raw tars (no words.txt / gloss.txt), exact duplicates, and an eval folder."""
    raw, ev = base / "raw", base / "eval"
    raw.mkdir()
    images: dict[str, bytes] = {}
    for si, wnid in enumerate(WNIDS):
        for n in range(1, PER_SYNSET + 1):
            images[f"{wnid}_{n}"] = _photo(100 * si + n)
    # Exact duplicates: a copy in another synset, and two copies in one synset.
    images[f"{WNIDS[3]}_90"] = images[f"{WNIDS[0]}_2"]
    images[f"{WNIDS[1]}_91"] = images[f"{WNIDS[1]}_3"]
    images[f"{WNIDS[1]}_92"] = images[f"{WNIDS[1]}_3"]
    for wnid in WNIDS:
        write_raw_tar(raw / f"{wnid}.tar", [(f"{k}.JPEG", d) for k, d in sorted(images.items()) if k.startswith(wnid)])

    def pil(key: str) -> Image.Image:
        return Image.open(io.BytesIO(images[key]))

    def resized(key: str, factor: float) -> Image.Image:
        im = pil(key)
        return im.resize((round(im.width * factor), round(im.height * factor)), Image.Resampling.LANCZOS)

    webp = io.BytesIO()
    pil(f"{WNIDS[2]}_1").save(webp, "WEBP", quality=80)
    png = io.BytesIO()
    resized(f"{WNIDS[3]}_4", 1.5).save(png, "PNG")
    overlaps = {  # raw key -> eval file (relative to the eval root)
        f"{WNIDS[0]}_1": "val/a/b/ILSVRC2012_val_00000001.JPEG",  # byte-identical
        f"{WNIDS[0]}_4": "val/c/ILSVRC2012_val_00000002.JPEG",  # re-encoded at quality 50
        f"{WNIDS[1]}_2": "other/deep/er/still/x.jpg",  # resized to half, re-encoded
        f"{WNIDS[3]}_4": "upscaled.png",  # resized up, PNG
        f"{WNIDS[2]}_1": "pack.tar/inner/ILSVRC2012_val_00000005.webp",  # WebP, inside a tar
        f"{WNIDS[2]}_5": "pack.tar/ILSVRC2012_val_00000006.JPEG",  # byte-identical, inside a tar
    }
    files = {
        "val/a/b/ILSVRC2012_val_00000001.JPEG": images[f"{WNIDS[0]}_1"],
        "val/c/ILSVRC2012_val_00000002.JPEG": _jpeg(pil(f"{WNIDS[0]}_4"), 50),
        "other/deep/er/still/x.jpg": _jpeg(resized(f"{WNIDS[1]}_2", 0.5), 85),
        "upscaled.png": png.getvalue(),
        # unrelated images, and a file that is no image
        "val/unrelated_1.JPEG": _photo(9001),
        "val/a/unrelated_2.JPEG": _photo(9002, 320, 240),
        "LICENSE.txt": b"not an image\n",
    }
    for name, data in files.items():
        (ev / name).parent.mkdir(parents=True, exist_ok=True)
        (ev / name).write_bytes(data)
    write_raw_tar(ev / "pack.tar", [("inner/ILSVRC2012_val_00000005.webp", webp.getvalue()),
                                 ("ILSVRC2012_val_00000006.JPEG", images[f"{WNIDS[2]}_5"]),
                                 ("unrelated_3.JPEG", _photo(9003))])
    return types.SimpleNamespace(raw=raw, eval=ev, images=images, overlaps=overlaps)


def settings_for(base: Path, rel: types.SimpleNamespace, **env):
    values = {"IMNET_NUM_SHARDS": 2, "IMNET_EVAL_EXCLUDE": str(rel.eval), "IMNET_ALT_LABELS": "in1k"}
    values.update(env)
    return local_settings(rel.raw, base, **values)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("features")
    rel = write_release(base)
    s = settings_for(base, rel)
    build_catalog_stages(s)
    for key in s.partition_keys:
        build_shard(out_root=s.out_root, raw_root=s.raw_root, shard_key=key, shard_name=s.shard_name(key),
                    settings=encode_settings(s), workers=1, run_id=f"run-{key}")
    report = run_audit(s, "run-audit", log=QUIET)
    assert report.problems == []
    return types.SimpleNamespace(base=base, rel=rel, s=s, report=report)


def query(s, text: str) -> list[tuple]:
    with duckdb.connect(s.catalog, read_only=True) as con:
        return con.execute(text).fetchall()


def samples(s) -> dict[str, dict]:
    out = {}
    for key in s.partition_keys:
        for k, parts in iter_samples(os.path.join(s.out_root, s.shard_name(key))):
            out[k] = json.loads(parts["json"])
    return out


# ----------------------------------------------------------------------------- perceptual hash


def test_phash_survives_reencoding_and_resizing_and_separates_unrelated_photos():
    src = _photo(1, 400, 300)
    im = Image.open(io.BytesIO(src))
    h = perceptual.image_hash(src)
    half = _jpeg(im.resize((200, 150), Image.Resampling.LANCZOS), 80)
    for copy in (_jpeg(im, 50), half, _jpeg(im.convert("L"), 90)):
        assert perceptual.distance(h, perceptual.image_hash(copy)) <= perceptual.NEAR_DUPLICATE_BITS
    others = [perceptual.image_hash(_photo(seed, 400, 300)) for seed in range(2, 12)]
    assert min(perceptual.distance(h, o) for o in others) > perceptual.NEAR_DUPLICATE_BITS
    assert perceptual.image_hash(b"not an image") is None and perceptual.image_hash(src[: len(src) // 3]) is None
    assert -(1 << 63) <= h < (1 << 63)


def test_band_join_finds_every_pair_within_the_threshold_and_no_other(tmp_path):
    """overlaps_settle.sql's multi-index hashing against a brute-force count, on random hashes with
    planted near copies at every distance 0..12 (the band join must miss none within the threshold)."""
    rng = random.Random(7)
    evals = [rng.getrandbits(64) for _ in range(40)]
    raw, want = [], set()
    for i, e in enumerate(evals):
        d = i % 13
        bits = rng.sample(range(64), d)
        h = e
        for b in bits:
            h ^= 1 << b
        raw.append((f"n00000001_{i}", h))
        if d <= perceptual.NEAR_DUPLICATE_BITS:
            want.add(f"n00000001_{i}")
    raw += [(f"n00000001_{1000 + j}", rng.getrandbits(64)) for j in range(400)]
    brute = {k for k, h in raw if min(perceptual.distance(h, e) for e in evals) <= perceptual.NEAR_DUPLICATE_BITS}
    assert brute == want
    with Catalog(str(tmp_path / "c.duckdb")) as cat:
        for i, (k, h) in enumerate(raw):
            cat.con.execute("INSERT INTO images (key, wnid, tar, \"offset\", sha256, status, phash) VALUES "
                            "(?, 'n00000001', 'n00000001.tar', ?, ?, 'kept', ?)",
                            [k, i, k, perceptual.signed64(h)])
        for i, e in enumerate(evals):
            cat.con.execute("INSERT INTO eval_images (file, sha256, phash) VALUES (?, ?, ?)", [f"e{i}", f"sha{i}", perceptual.signed64(e)])
        cat.run("overlaps_settle", {"threshold": perceptual.NEAR_DUPLICATE_BITS,
                                    "radius": perceptual.NEAR_DUPLICATE_BITS // 4, "dedup": "off"})
        got = {k for (k,) in cat.con.execute("SELECT key FROM images WHERE starts_with(reason, 'eval overlap: ')")
               .fetchall()}
    assert got == want


# ----------------------------------------------------------------------------- the built release


def test_exactly_the_overlapping_raw_images_are_excluded_naming_the_eval_file(built):
    rows = query(built.s, "SELECT key, reason FROM images WHERE starts_with(reason, 'eval overlap: ')")
    assert dict(rows) == {k: f"eval overlap: {f}" for k, f in built.rel.overlaps.items()}
    kinds = dict(query(built.s, "SELECT key, distance FROM eval_overlaps"))
    assert kinds[f"{WNIDS[0]}_1"] == -1 and kinds[f"{WNIDS[2]}_5"] == -1  # byte-identical
    assert all(0 <= kinds[k] <= perceptual.NEAR_DUPLICATE_BITS for k in built.rel.overlaps if kinds[k] != -1)
    assert query(built.s, "SELECT count(*) FROM eval_images")[0][0] == 10  # 7 files + 3 tar members
    assert not set(built.rel.overlaps) & set(samples(built.s))  # none reached a shard
    reasons = {r["reason"]: r["images"] for r in built.report.reasons}
    assert reasons["eval overlap"] == len(built.rel.overlaps)  # the audit counts them


def test_exact_duplicates_are_recorded_and_kept_by_default(built):
    dups = dict(query(built.s, "SELECT key, duplicate_of FROM images WHERE duplicate_of IS NOT NULL"))
    assert dups == {f"{WNIDS[3]}_90": f"{WNIDS[0]}_2", f"{WNIDS[1]}_91": f"{WNIDS[1]}_3",
                    f"{WNIDS[1]}_92": f"{WNIDS[1]}_3"}
    groups = query(built.s, "SELECT first_key, copies, keys FROM duplicate_groups ORDER BY first_key")
    assert groups == [(f"{WNIDS[0]}_2", 2, f"{WNIDS[0]}_2 {WNIDS[3]}_90"),
                      (f"{WNIDS[1]}_3", 3, f"{WNIDS[1]}_3 {WNIDS[1]}_91 {WNIDS[1]}_92")]
    written = samples(built.s)
    assert set(dups) | set(dups.values()) <= set(written)  # IMNET_DEDUP=off keeps every copy


def test_every_sample_carries_its_imagenet1k_label(built):
    labels = in1k_labels()
    assert labels["n01440764"] == 0 and labels["n01443537"] == 1 and len(labels) == 1000
    written = samples(built.s)
    assert len(written) == 4 * PER_SYNSET + 3 - len(built.rel.overlaps)
    for key, meta in written.items():
        assert meta["label_in1k"] == labels.get(meta["class_name"], -1), key
    assert {m["label_in1k"] for m in written.values()} == {-1, 0, 1}


def test_info_json_train_in1k_split_counts_only_imagenet1k_samples(built):
    info = json.loads(open(info_url(built.s)).read())
    train, alt = info["splits"]["train"], info["splits"]["train_in1k"]
    assert alt["alt_label"] == "label_in1k" and alt["name"] == "train_in1k"
    assert alt["filenames"] == train["filenames"]
    for fname, n_all, n_in1k in zip(train["filenames"], train["shard_lengths"], alt["shard_lengths"]):
        metas = [json.loads(s["json"]) for s in
                 wds.WebDataset([os.path.join(built.s.out_root, fname)], shardshuffle=False)]
        assert len(metas) == n_all
        assert sum(1 for m in metas if m["label_in1k"] >= 0) == n_in1k
    assert alt["num_samples"] == sum(alt["shard_lengths"]) < train["num_samples"]
    assert check_info(built.s) == []  # the audit's check agrees with what it wrote


def test_timm_style_reading_of_the_alt_split_gives_only_imagenet1k_labels(built):
    """What timm's ReaderWds does with a split's `alt_label` (timm/data/readers/reader_wds.py,
    `_parse_split_info` and `_decode`): the target is json[alt_label], and a negative one drops the
    sample. Read that way, train_in1k yields num_samples samples, every label in 0..999."""
    info = json.loads(open(info_url(built.s)).read())
    split = info["splits"]["train_in1k"]
    targets = []
    urls = [os.path.join(built.s.out_root, f) for f in split["filenames"]]
    for sample in wds.WebDataset(urls, shardshuffle=False):
        target = int(json.loads(sample["json"])[split["alt_label"]])
        if target >= 0:
            targets.append(target)
    assert len(targets) == split["num_samples"] > 0
    assert set(targets) <= set(range(1000)) and set(targets) == {0, 1}


def test_lemmas_come_from_the_shipped_table_without_words_txt(built):
    assert not (built.rel.raw / "words.txt").exists()
    rows = dict(query(built.s, "SELECT wnid, lemma FROM synsets"))
    assert rows["n01440764"] == "tench, Tinca tinca" and rows["n01443537"] == "goldfish, Carassius auratus"
    assert rows["n00005787"] == "benthos"
    assert query(built.s, "SELECT gloss FROM synsets WHERE wnid = 'n01443537'")[0][0].startswith("small golden")


def test_the_dataset_card_states_the_counts(built):
    text = open(card_url(built.s)).read()
    n = len(samples(built.s))
    assert f"| samples | {n:,} |" in text
    assert "| classes (synsets with samples) | 4 of 4 |" in text
    assert "| index | eval overlap | 6 |" in text
    assert "2 groups, 3 later copies" in text and "6 near duplicates" not in text
    assert "2 byte-identical and 4 near duplicates" in text
    assert "image-net.org" in text and "create_dataset" in text and "wds.WebDataset" in text
    assert "`IMNET_ALT_LABELS` | `in1k`" in text


# ----------------------------------------------------------------------------- changing the settings


@pytest.fixture
def copy(built, tmp_path):
    shutil.copy(built.s.catalog, tmp_path / "catalog.duckdb")
    shutil.copytree(built.s.out_root, tmp_path / "out")
    return tmp_path


def test_dedup_exact_excludes_later_copies_and_off_brings_them_back(built, copy):
    s = settings_for(copy, built.rel, IMNET_DEDUP="exact")
    assert "filtered_index" in stale_stages(s, log=QUIET)
    facts = build_filtered_index(s, "run-dedup", log=QUIET)
    assert facts["tars_scanned"] == 0 and facts["dedup_excluded"] == 3
    assert ("duplicate of", 3) in facts["reasons"]  # one kind of reason, not one per key
    rows = dict(query(s, "SELECT key, reason FROM images WHERE starts_with(reason, 'duplicate of ')"))
    assert rows == {f"{WNIDS[3]}_90": f"duplicate of {WNIDS[0]}_2", f"{WNIDS[1]}_91": f"duplicate of {WNIDS[1]}_3",
                    f"{WNIDS[1]}_92": f"duplicate of {WNIDS[1]}_3"}
    assert query(s, f"SELECT status FROM images WHERE key = '{WNIDS[1]}_3'") == [("kept",)]
    off = settings_for(copy, built.rel)
    build_filtered_index(off, "run-off", log=QUIET)
    assert query(s, "SELECT count(*) FROM images WHERE starts_with(reason, 'duplicate of ')")[0][0] == 0
    assert query(s, "SELECT count(*) FROM images WHERE duplicate_of IS NOT NULL")[0][0] == 3


def test_dedup_exact_keeps_a_copy_whose_first_lost_its_key(tmp_path):
    # n01443537_2 three times: a file misplaced in n01440764.tar (first by tar, but not the key's own
    # synset: it loses the key) and twice in n01443537.tar, the later one with n01443537_9's bytes.
    # The first copy by key is that later _2, which the repeated key excludes: decided apart, _9 was
    # excluded as its copy and those bytes were gone.
    a, b = IN1K
    raw = tmp_path / "raw"
    raw.mkdir()
    same = _photo(7)
    write_raw_tar(raw / f"{a}.tar", [(f"{a}_1.JPEG", _photo(1)), (f"{b}_2.JPEG", _photo(2))])
    at = write_raw_tar(raw / f"{b}.tar", [(f"{b}_2.JPEG", _photo(5)), (f"x/{b}_2.JPEG", same), (f"{b}_9.JPEG", same),
                                          (f"{b}_3.JPEG", _photo(3)), (f"{b}_4.JPEG", _photo(3))])[f"{b}_2.JPEG"][0]
    s = local_settings(raw, tmp_path, IMNET_NUM_SHARDS=2, IMNET_DEDUP="exact")
    build_catalog_stages(s)
    rows = query(s, 'SELECT key, tar, status, reason FROM images ORDER BY key, tar, "offset"')
    assert rows == [(f"{a}_1", f"{a}.tar", "kept", None),
                    (f"{b}_2", f"{a}.tar", "excluded", f"duplicate key: also in {b}.tar at byte {at}"),
                    (f"{b}_2", f"{b}.tar", "kept", None),
                    (f"{b}_2", f"{b}.tar", "excluded", f"duplicate key: also in {b}.tar at byte {at}"),
                    (f"{b}_3", f"{b}.tar", "kept", None),
                    (f"{b}_4", f"{b}.tar", "excluded", f"duplicate of {b}_3"),
                    (f"{b}_9", f"{b}.tar", "kept", None)]
    # every exclusion for a key or a copy names a row that stays: of the key's own synset's bytes none is gone
    assert query(s, f"SELECT count(DISTINCT sha256) FROM images WHERE tar = '{b}.tar'") == \
        query(s, f"SELECT count(DISTINCT sha256) FROM images WHERE tar = '{b}.tar' AND status = 'kept'")
    # and with IMNET_DEDUP=off the same keys are settled as before, every copy kept
    off = local_settings(raw, tmp_path, IMNET_NUM_SHARDS=2)
    build_filtered_index(off, "run-off", log=QUIET)
    settled = 'SELECT key, tar, status FROM images WHERE status = \'excluded\' ORDER BY key, tar, "offset"'
    assert query(s, settled) == [(f"{b}_2", f"{a}.tar", "excluded"), (f"{b}_2", f"{b}.tar", "excluded")]

    # An index settled by the earlier rule (the misplaced file kept the key) and recorded with the
    # fingerprint that rule's code gave is stale, and settled again without a tar read again.
    listing = list_raw(off.raw_root)
    with Catalog(off.catalog) as cat:
        cat.con.execute("UPDATE images SET status = 'excluded', reason = 'duplicate key: also in old' "
                    f"WHERE key = '{b}_2' AND tar = '{b}.tar' AND \"offset\" = {at}")
        cat.con.execute(f"UPDATE images SET status = 'kept', reason = NULL WHERE key = '{b}_2' AND tar = '{a}.tar'")
        cat.set_stage("filtered_index", _h("filtered_index", listing.tars_fingerprint, INDEX_VERSION), "old")
    assert "filtered_index" in stale_stages(off, log=QUIET)
    facts = build_filtered_index(off, "run-again", log=QUIET)
    assert facts["tars_scanned"] == 0
    assert query(s, settled) == [(f"{b}_2", f"{a}.tar", "excluded"), (f"{b}_2", f"{b}.tar", "excluded")]


def test_a_changed_eval_set_is_matched_again_without_rescanning_tars(built, copy, tmp_path):
    ev = tmp_path / "eval2"
    shutil.copytree(built.rel.eval, ev)
    os.remove(ev / "val" / "a" / "b" / "ILSVRC2012_val_00000001.JPEG")
    s = local_settings(built.rel.raw, copy, IMNET_NUM_SHARDS=2, IMNET_EVAL_EXCLUDE=str(ev), IMNET_ALT_LABELS="in1k")
    assert stale_stages(s, log=QUIET)[:1] == ["filtered_index"]
    facts = build_filtered_index(s, "run-eval2", log=QUIET)
    assert facts["tars_scanned"] == 0 and facts["eval_overlaps_exact"] == 1 and facts["eval_overlaps_near"] == 4
    assert query(s, f"SELECT status, reason FROM images WHERE key = '{WNIDS[0]}_1'") == [("kept", None)]
    assert "filtered_index" not in stale_stages(s, log=QUIET)
    # no eval set at all: nothing excluded for overlap
    none = local_settings(built.rel.raw, copy, IMNET_NUM_SHARDS=2)
    build_filtered_index(none, "run-none", log=QUIET)
    assert query(s, "SELECT count(*) FROM images WHERE starts_with(reason, 'eval overlap')")[0][0] == 0


def test_the_filtered_index_asset_shows_duplicates_and_eval_overlaps_in_dagster(built, tmp_path):
    """Materialized through a real (ephemeral) Dagster instance: the UI's metadata carries the
    counts and the largest duplicate groups."""
    from dagster import AssetKey, DagsterInstance, materialize

    from imnet_assets.defs.assets import filtered_index, raw_tars, synset_manifest

    s = settings_for(tmp_path, built.rel)
    with DagsterInstance.ephemeral() as instance:
        result = materialize([raw_tars.make(s), synset_manifest.make(s), filtered_index.make(s)], instance=instance)
        assert result.success
        mat = instance.get_latest_materialization_event(
            AssetKey("filtered_index")).asset_materialization
    md = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    assert md["duplicate_groups"] == 2 and md["duplicate_copies"] == 3
    assert md["eval_overlaps_exact"] == 2 and md["eval_overlaps_near"] == 4 and md["eval_images"] == 10
    rows = mat.metadata["largest_duplicate_groups"].records
    assert [(r.data["first_key"], r.data["copies"]) for r in rows] == [(f"{WNIDS[1]}_3", 3), (f"{WNIDS[0]}_2", 2)]


def test_an_s3_eval_prefix_hashes_like_the_same_local_folder(built, monkeypatch):
    """IMNET_EVAL_EXCLUDE=s3://...: the same files (nested, a tar among them) on moto's real S3
    server give the same names and hashes as the local folder."""
    import uuid

    from imnet_assets.stages.decontam import eval_listing, hash_eval_set
    from tests.s3server import MotoS3

    local = sorted(hash_eval_set(eval_listing(str(built.rel.eval)), 2, QUIET))
    with MotoS3(secret=f"evalSecret-{uuid.uuid4().hex}") as server:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(k)
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        bucket = f"eval-{uuid.uuid4().hex[:12]}"
        client = server.client()
        client.create_bucket(Bucket=bucket)
        server.put_tree(client, built.rel.eval, bucket, "imagenet/val")
        remote = sorted(hash_eval_set(eval_listing(f"s3://{bucket}/imagenet/val"), 2, QUIET))
    assert remote == local and len(local) == 10


def test_settings_read_the_three_variables_and_refuse_unknown_modes():
    from imnet_assets.settings import Settings, SettingsError

    d = Settings.from_env({})
    assert (d.eval_exclude, d.dedup, d.alt_labels) == (None, "off", "")
    s = Settings.from_env({"IMNET_EVAL_EXCLUDE": "s3://bucket/val/", "IMNET_DEDUP": "EXACT", "IMNET_ALT_LABELS": "in1k"})
    assert (s.eval_exclude, s.dedup, s.alt_labels) == ("s3://bucket/val", "exact", "in1k")
    assert Settings.from_env({"IMNET_EVAL_EXCLUDE": " ", "IMNET_DEDUP": "", "IMNET_ALT_LABELS": ""}) == d
    for name, value in (("IMNET_DEDUP", "near"), ("IMNET_ALT_LABELS", "in21k")):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: value})


def test_a_missing_eval_folder_is_a_clear_error(tmp_path):
    from imnet_assets.stages.decontam import eval_listing

    with pytest.raises(FileNotFoundError, match="IMNET_EVAL_EXCLUDE"):
        eval_listing(str(tmp_path / "nowhere"))
