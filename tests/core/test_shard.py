"""One shard: tar layout, build from a plan slice over real raw tars, manifests, freshness, verify."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import types

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from imnet_assets.image.encode import EncodeSettings
from imnet_assets.release import changed_sources, freshness
from imnet_assets.release.changed_sources import SourceChanged
from imnet_assets.release.outroot import read_manifest, state_url
from imnet_assets.release.plan import SliceRow, read_slice, write_slice
from imnet_assets.release.sample_tar import _tarinfo, sample_members
from imnet_assets.release.verify import iter_samples
from imnet_assets.stages import shard as shard_mod
from imnet_assets.stages import shard_jobs as shard_jobs_mod
from imnet_assets.stages.shard import build_shard, fingerprint
from imnet_assets.storage.fs import read_json
from tests.conftest import shard_verdict
from tests.shard_check import check_committed_shard

KEY = "0001"
NAME = "imagenet12k-train-0001.tar"
ENC = EncodeSettings(quality=80, method=2)


# ----------------------------------------------------------------------------- fixtures


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    arr = (x * rng.uniform(0.2, 1, 3) + y * rng.uniform(0.2, 1, 3)) / 2 + rng.integers(0, 20, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_raw_tar(path, members: list[tuple[str, bytes]], tar_format: int = tarfile.USTAR_FORMAT,
                  ) -> dict[str, tuple[int, int]]:
    """A raw synset tar (pax can hold long names); returns member name -> (data offset, size)."""
    with tarfile.open(path, "w", format=tar_format) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        return {m.name: (m.offset_data, m.size) for m in tf.getmembers()}


SOURCES = {
    # wnid -> [(image number, width, height)]
    "n01440764": [(10026, 64, 48), (37, 40, 90), (512, 96, 96)],
    "n02102040": [(7, 120, 80), (8, 33, 50), (99, 70, 40)],
}


def planned(rows: list[list], order: list[int]) -> list[tuple]:
    """Slice rows (position first) taking `rows` in the given order."""
    return [(pos, *rows[i]) for pos, i in enumerate(order)]


ORDER = [4, 0, 5, 2, 1, 3]  # a shuffled plan order, not the raw order


def build(out, raw_root, workers=1, settings=ENC, name=NAME):
    return build_shard(out_root=str(out), raw_root=str(raw_root), shard_key=KEY, shard_name=name,
                       settings=settings, workers=workers, run_id="run-test")


@pytest.fixture
def built(raw, tmp_path):
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(raw.rows, ORDER))
    result = build(out, raw.root)
    return types.SimpleNamespace(out=out, raw=raw, result=result, tar=out / NAME,
                                 keys=[raw.rows[i][0] for i in ORDER])


def tar_names(path) -> list[str]:
    with tarfile.open(path) as tf:
        return tf.getnames()


# ----------------------------------------------------------------------------- layout


def test_sample_members_order_and_content():
    row = SliceRow(5, "n01440764_10026", "n01440764", 1234, "n01440764.tar", "n01440764_10026.JPEG",
                   1536, 999, "ab" * 32, 1000, 800, True)
    enc = types.SimpleNamespace(webp=b"RIFFxxxxWEBP", width=960, height=768, orig_width=1000,
                                orig_height=800, repaired=True)
    members = sample_members(row, enc)
    assert [n for n, _ in members] == ["n01440764_10026.cls", "n01440764_10026.json", "n01440764_10026.webp"]
    assert [n for n, _ in members] == sorted(n for n, _ in members)
    cls = members[0][1]
    assert cls == b"1234"  # ASCII decimal, no newline
    meta = json.loads(members[1][1].decode("utf-8"))
    assert meta["filename"] == "n01440764/n01440764_10026.JPEG"
    assert meta["label"] == 1234 and isinstance(meta["label"], int)
    assert meta["class_name"] == "n01440764"
    assert (meta["width"], meta["height"]) == (960, 768)
    assert (meta["orig_width"], meta["orig_height"]) == (1000, 800)
    assert members[2][1] == b"RIFFxxxxWEBP"
    # Canonical JSON: the same sample gives the same bytes.
    assert sample_members(row, enc)[1][1] == members[1][1]


def test_label_zero_is_written():
    row = SliceRow(0, "n0_1", "n0", 0, "n0.tar", "n0_1.JPEG", 512, 1, "0" * 64, 1, 1, False)
    enc = types.SimpleNamespace(webp=b"", width=1, height=1, orig_width=1, orig_height=1, repaired=False)
    assert sample_members(row, enc)[0] == ("n0_1.cls", b"0")


def test_tarinfo_has_fixed_metadata():
    info = _tarinfo("n01_1.webp", 1234)
    assert (info.name, info.size, info.mtime, info.mode) == ("n01_1.webp", 1234, 0, 0o444)
    assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", "")
    assert info.type == tarfile.REGTYPE
    a = _tarinfo("x.cls", 1).tobuf(tarfile.USTAR_FORMAT)
    b = _tarinfo("x.cls", 1).tobuf(tarfile.USTAR_FORMAT)
    assert a == b and len(a) == 512


# ----------------------------------------------------------------------------- building


def test_build_shard_is_readable_by_webdataset_in_plan_order(built):
    samples = list(wds.WebDataset([str(built.tar)], shardshuffle=False))
    assert [s["__key__"] for s in samples] == built.keys
    rows = {r[0]: r for r in built.raw.rows}
    for s in samples:
        key = s["__key__"]
        _, wnid, label, *_ , width, height, _ = rows[key]
        assert s["cls"] == str(label).encode()
        meta = json.loads(s["json"])
        assert meta["filename"] == f"{wnid}/{key}.JPEG"
        assert meta["class_name"] == wnid and meta["label"] == label
        assert (meta["orig_width"], meta["orig_height"]) == (width, height)
        with Image.open(io.BytesIO(s["webp"])) as im:
            assert im.format == "WEBP" and im.mode == "RGB"
            assert im.size == (meta["width"], meta["height"]) == (width, height)
    # Each sample is three consecutive members: .cls, .json, .webp, with fixed metadata.
    names = tar_names(built.tar)
    assert names == [f"{k}.{ext}" for k in built.keys for ext in ("cls", "json", "webp")]
    with tarfile.open(built.tar) as tf:
        for m in tf.getmembers():
            assert (m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) == (0, 0o444, 0, 0, "", "")
    assert sorted(os.listdir(built.out)) == ["_manifests", "_plan", NAME]  # no temporaries


def test_a_jpeg_shard_is_readable_by_webdataset_in_plan_order(raw, tmp_path):
    """Issue 25: a release with codec "jpeg" writes `<key>.jpg`, which webdataset decodes as an image;
    the JSON's width and height are the stored JPEG's (tests/core/test_jpeg_codec.py has the rest)."""
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(raw.rows, ORDER))
    result = build(out, raw.root, settings=EncodeSettings(codec="jpeg", quality=95))
    assert result.problems == [] and result.num_samples == 6
    assert tar_names(out / NAME) == [f"{raw.rows[i][0]}.{ext}" for i in ORDER for ext in ("cls", "json", "jpg")]
    got = list(wds.WebDataset([str(out / NAME)], shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "json"))
    assert [k for k, _, _ in got] == [raw.rows[i][0] for i in ORDER]
    for _key, img, meta in got:
        assert img.mode == "RGB" and img.size == (meta["width"], meta["height"]) == (meta["orig_width"], meta["orig_height"])
    assert check_committed_shard(str(out), KEY, NAME) == []


def test_manifest_and_state_agree_with_the_tar(built):
    data = built.tar.read_bytes()
    manifest = read_manifest(str(built.out), KEY)
    state = read_json(state_url(str(built.out), KEY))
    _, digest = read_slice(str(built.out), KEY)
    assert manifest["bytes"] == len(data) == built.result.bytes
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest() == built.result.sha256
    assert manifest["num_samples"] == len(manifest["samples"]) == 6 == built.result.num_samples
    assert manifest["planned"] == 6 and manifest["excluded"] == []
    assert manifest["plan_digest"] == digest
    assert manifest["fingerprint"] == fingerprint(digest, ENC)
    assert manifest["shard"] == KEY and manifest["path"] == NAME and manifest["run_id"] == "run-test"
    assert [s["key"] for s in manifest["samples"]] == built.keys
    assert [s["position"] for s in manifest["samples"]] == list(range(6))
    webps = {k: parts["webp"] for k, parts in iter_samples(str(built.tar))}
    for s in manifest["samples"]:
        assert s["webp_sha256"] == hashlib.sha256(webps[s["key"]]).hexdigest()
        assert s["webp_bytes"] == len(webps[s["key"]])
        assert s["repaired"] is False
    assert state.pop("stamp") == str(os.stat(built.out / manifest["path"]).st_mtime)  # the tar's, as committed
    mf = built.out / "_manifests" / f"{KEY}.json"  # the manifest's, likewise, and its sha256 (imnet verify)
    assert state.pop("manifest_stamp") == str(os.stat(mf).st_mtime) and state.pop("manifest_bytes") == mf.stat().st_size
    assert state.pop("manifest_sha256") == hashlib.sha256(mf.read_bytes()).hexdigest()
    assert state == {k: manifest[k] for k in ("shard", "path", "fingerprint", "bytes", "sha256", "num_samples", "run_id")}
    assert built.result.path == str(built.tar)


def test_undecodable_source_becomes_an_exclusion(raw, tmp_path):
    garbage = b"\xff\xd8\xff\xe0 this is not really a JPEG " * 20
    wnid = "n09999999"
    where = write_raw_tar(raw.root / f"{wnid}.tar", [(f"{wnid}_1.JPEG", garbage)])
    offset, size = where[f"{wnid}_1.JPEG"]
    bad = [f"{wnid}_1", wnid, 2, f"{wnid}.tar", f"{wnid}_1.JPEG", offset, size,
           hashlib.sha256(garbage).hexdigest(), 100, 100, False]
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned([*raw.rows[:3], bad], [0, 3, 1, 2]))
    result = build(out, raw.root)
    manifest = read_manifest(str(out), KEY)
    assert result.planned == 4 and result.num_samples == 3
    assert [e["key"] for e in manifest["excluded"]] == [f"{wnid}_1"]
    assert manifest["excluded"][0]["position"] == 1
    assert manifest["excluded"][0]["reason"]
    assert result.excluded == manifest["excluded"]
    assert [s["key"] for s in manifest["samples"]] == [raw.rows[i][0] for i in (0, 1, 2)]
    assert [s["position"] for s in manifest["samples"]] == [0, 2, 3]
    assert f"{wnid}_1.webp" not in tar_names(out / NAME)
    assert check_committed_shard(str(out), KEY, NAME) == []


def test_changed_source_bytes_fail_the_run_naming_tar_and_member_and_mark_the_tar(raw, tmp_path):
    """Bytes that changed since indexing are no property of the image: never an exclusion. The
    run fails naming the tar and member, commits nothing, and marks the tar for the index."""
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(raw.rows, ORDER))
    victim = raw.rows[1]  # n01440764_37
    tar_path = raw.root / victim[3]
    with open(tar_path, "r+b") as f:  # same length, different bytes
        f.seek(victim[5] + victim[6] // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SourceChanged, match=rf"raw tar {victim[3]} member {victim[4]} at byte {victim[5]}: sha256"):
        build(out, raw.root)
    assert sorted(os.listdir(out)) == ["_manifests", "_plan"]  # no shard, no manifest, no commit record
    assert list(changed_sources.pending(str(out))) == [victim[3]]


def test_raw_tar_shorter_than_indexed_fails_the_run_naming_tar_and_member(raw, tmp_path):
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(raw.rows, ORDER))
    last = raw.rows[2]  # the last member of the first tar
    with open(raw.root / last[3], "r+b") as f:
        f.truncate(last[5] + last[6] // 2)
    with pytest.raises(SourceChanged, match=rf"raw tar {last[3]} member {last[4]} .*a read of {last[6] // 2} of"):
        build(out, raw.root, workers=2)
    assert read_manifest(str(out), KEY) is None
    assert list(changed_sources.pending(str(out))) == [last[3]]


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unreadable_raw_tar_fails_the_run_and_commits_nothing(raw, tmp_path, workers):
    """A tar that cannot be read is no fault of its images: excluding them would publish a shard
    that a later run, with the storage back, never rebuilds. The run fails naming the tar."""
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(raw.rows, ORDER))
    gone = raw.root / "n02102040.tar"
    os.rename(gone, tmp_path / "away.tar")
    with pytest.raises(shard_jobs_mod.SourceUnreadable, match=r"cannot read raw tar .*n02102040\.tar at byte \d+ "
                       r"\(for n02102040_\d+\): FileNotFoundError"):
        build(out, raw.root, workers=workers)
    assert sorted(os.listdir(out)) == ["_plan"]  # no shard, no manifest, no temporary file
    os.rename(tmp_path / "away.tar", gone)
    assert build(out, raw.root, workers=workers).num_samples == 6


def test_a_raw_tar_back_within_the_retries_is_read(raw, tmp_path):
    """A read that fails for a moment (a network file system or S3 hiccup) is tried again."""
    import threading

    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(raw.rows, ORDER))
    tar = raw.root / "n02102040.tar"
    os.rename(tar, tmp_path / "away.tar")
    back = threading.Timer(0.2, os.rename, (tmp_path / "away.tar", tar))
    back.start()
    try:
        result = build(out, raw.root)
    finally:
        back.join()
    assert result.num_samples == 6 and result.excluded == []


def test_check_committed_shard_finds_nothing_wrong_with_a_good_shard(built):
    assert check_committed_shard(str(built.out), KEY, NAME) == []
    assert check_committed_shard(str(built.out), KEY, NAME, decode_every=0) == []
    assert check_committed_shard(str(built.out), KEY, NAME, decode_every=16) == []


def test_check_committed_shard_reports_a_tampered_tar(built):
    data = bytearray(built.tar.read_bytes())
    with tarfile.open(built.tar) as tf:
        webp = next(m for m in tf.getmembers() if m.name.endswith(".webp"))
    data[webp.offset_data + webp.size // 2] ^= 0x55
    built.tar.write_bytes(bytes(data))
    problems = check_committed_shard(str(built.out), KEY, NAME)
    assert any("sha256" in p for p in problems)
    assert any(webp.name[: -len(".webp")] in p for p in problems)


def test_check_committed_shard_reports_a_garbled_json_instead_of_raising(built):
    data = bytearray(built.tar.read_bytes())
    with tarfile.open(built.tar) as tf:
        js = next(m for m in tf.getmembers() if m.name.endswith(".json"))
    data[js.offset_data] = ord("]")  # no longer a JSON document
    built.tar.write_bytes(bytes(data))
    problems = check_committed_shard(str(built.out), KEY, NAME)
    key = js.name[: -len(".json")]
    assert any(f"sample {key}: .json does not parse" in p for p in problems), problems
    assert any("tar sha256 differs" in p for p in problems)


def test_check_committed_shard_reports_a_cut_tar_instead_of_raising(built):
    data = built.tar.read_bytes()
    built.tar.write_bytes(data[: len(data) // 2 + 100])
    problems = check_committed_shard(str(built.out), KEY, NAME)
    assert any("tar unreadable after" in p for p in problems), problems
    assert any("tar sha256 differs" in p for p in problems)
    assert any("plan wants" in p for p in problems)


def test_check_committed_shard_reports_a_missing_sample_even_with_a_consistent_manifest(built):
    """A tar lacking a planned sample, its manifest rewritten to match the tar's bytes."""
    with tarfile.open(built.tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for m, payload in members[:-3]:
            tf.addfile(m, io.BytesIO(payload))
    built.tar.write_bytes(buf.getvalue())
    manifest = read_manifest(str(built.out), KEY)
    manifest.update(bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    (built.out / "_manifests" / f"{KEY}.json").write_text(json.dumps(manifest))
    problems = check_committed_shard(str(built.out), KEY, NAME)
    assert len(problems) == 1
    assert "holds 5 samples, plan wants 6" in problems[0] and built.keys[-1] in problems[0]


def corrupt_pixels_consistently(built, index: int) -> str:
    """Damage the image data of the index-th WebP in the tar, then rewrite the manifest so every
    hash agrees with the damaged bytes (what only a pixel decode can still catch). Returns its key."""
    with tarfile.open(built.tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    webps = [i for i, (m, _) in enumerate(members) if m.name.endswith(".webp")]
    m, payload = members[webps[index]]
    damaged = payload[:40] + b"\xff" * (len(payload) - 40)  # header intact, VP8 partitions garbled
    members[webps[index]] = (m, damaged)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data))
    built.tar.write_bytes(buf.getvalue())
    key = m.name[: -len(".webp")]
    manifest = read_manifest(str(built.out), KEY)
    manifest.update(bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    for rec in manifest["samples"]:
        if rec["key"] == key:
            rec["webp_sha256"] = hashlib.sha256(damaged).hexdigest()
    (built.out / "_manifests" / f"{KEY}.json").write_text(json.dumps(manifest))
    return key


def test_check_committed_shard_decodes_every_nth_sample_and_every_repaired_one(built):
    key = corrupt_pixels_consistently(built, 2)
    assert check_committed_shard(str(built.out), KEY, NAME, decode_every=0) == []  # hashes and header agree
    assert check_committed_shard(str(built.out), KEY, NAME, decode_every=4) == []  # samples 0 and 4 decode fine
    for every in (1, 2):  # sample 2 is decoded
        problems = check_committed_shard(str(built.out), KEY, NAME, decode_every=every)
        assert len(problems) == 1 and key in problems[0] and "does not decode" in problems[0], problems
    manifest = read_manifest(str(built.out), KEY)
    for rec in manifest["samples"]:
        rec["repaired"] = rec["key"] == key
    (built.out / "_manifests" / f"{KEY}.json").write_text(json.dumps(manifest))
    problems = check_committed_shard(str(built.out), KEY, NAME, decode_every=0)  # repaired: always decoded
    assert len(problems) == 1 and key in problems[0], problems


def test_check_committed_shard_without_manifest(built):
    os.unlink(built.out / "_manifests" / f"{KEY}.json")
    assert check_committed_shard(str(built.out), KEY, NAME) == [f"shard {KEY}: no manifest"]


def test_check_committed_shard_reports_another_plan(built):
    write_slice(str(built.out), KEY, planned(built.raw.rows, list(reversed(ORDER))))
    problems = check_committed_shard(str(built.out), KEY, NAME)
    assert any("another plan" in p for p in problems)


# ----------------------------------------------------------------------------- freshness


def test_shard_state_transitions(raw, tmp_path):
    out = tmp_path / "out"
    digest = write_slice(str(out), KEY, planned(raw.rows, ORDER))
    want = fingerprint(digest, ENC)
    assert shard_verdict(str(out), KEY, NAME, want) == "missing"
    build(out, raw.root)
    assert shard_verdict(str(out), KEY, NAME, want) == "fresh"
    assert shard_verdict(str(out), KEY, NAME, fingerprint(digest, EncodeSettings(quality=81, method=2))) == "stale"
    assert shard_verdict(str(out), KEY, NAME, None) == "stale"
    # The tar changed size on storage: stale.
    tar_path = out / NAME
    data, mtime = tar_path.read_bytes(), tar_path.stat().st_mtime_ns
    tar_path.write_bytes(data + b"\0" * 512)
    assert shard_verdict(str(out), KEY, NAME, want) == "stale"
    # The same bytes written again: not the file committed (its mtime), so stale, until the time is back.
    tar_path.write_bytes(data)
    assert shard_verdict(str(out), KEY, NAME, want) == "stale"
    os.utime(tar_path, ns=(mtime, mtime))
    assert shard_verdict(str(out), KEY, NAME, want) == "fresh"
    # A new plan for this shard: stale until rebuilt.
    new_digest = write_slice(str(out), KEY, planned(raw.rows, list(reversed(ORDER))))
    new_want = fingerprint(new_digest, ENC)
    assert shard_verdict(str(out), KEY, NAME, new_want) == "stale"
    build(out, raw.root)
    assert shard_verdict(str(out), KEY, NAME, new_want) == "fresh"
    # The tar or its state file gone: missing.
    os.unlink(tar_path)
    assert shard_verdict(str(out), KEY, NAME, new_want) == "missing"
    build(out, raw.root)
    os.unlink(out / "_manifests" / f"{KEY}.state.json")
    assert shard_verdict(str(out), KEY, NAME, new_want) == "missing"


def test_a_shard_look_needs_its_manifest_listing():
    # None means "the manifest is gone: stale"; a caller that forgot it would make every shard stale
    with pytest.raises(TypeError, match="manifest"):
        freshness.ShardLook(KEY, NAME, {"fingerprint": "f"}, (10, "s"))
    assert freshness.ShardLook(KEY, NAME, None, None, None).manifest is None


def test_fingerprint_depends_on_plan_quality_method_and_size():
    base = fingerprint("d" * 64, EncodeSettings(quality=90, method=4))
    assert base == fingerprint("d" * 64, EncodeSettings(quality=90, method=4))
    others = [
        fingerprint("e" * 64, EncodeSettings(quality=90, method=4)),
        fingerprint("d" * 64, EncodeSettings(quality=89, method=4)),
        fingerprint("d" * 64, EncodeSettings(quality=90, method=5)),
        fingerprint("d" * 64, EncodeSettings(quality=90, method=4, max_short=512)),
    ]
    assert len({base, *others}) == 5


def test_fingerprint_depends_on_the_encoder_version(monkeypatch):
    before = fingerprint("d" * 64, ENC)
    monkeypatch.setattr(shard_mod, "ENCODER_VERSION", shard_mod.ENCODER_VERSION + "-next")
    assert fingerprint("d" * 64, ENC) != before


# ----------------------------------------------------------------------------- determinism


def test_building_twice_gives_identical_bytes(built):
    first = built.tar.read_bytes()
    first_samples = read_manifest(str(built.out), KEY)["samples"]
    build(built.out, built.raw.root)
    assert built.tar.read_bytes() == first
    assert read_manifest(str(built.out), KEY)["samples"] == first_samples
    assert sorted(os.listdir(built.out / "_manifests")) == [f"{KEY}.json", f"{KEY}.state.json"]


def test_one_and_two_workers_give_identical_bytes(raw, tmp_path):
    results = []
    for workers in (1, 2):
        out = tmp_path / f"out-{workers}"
        write_slice(str(out), KEY, planned(raw.rows, ORDER))
        results.append(build(out, raw.root, workers=workers))
    assert results[0].num_samples == results[1].num_samples == 6
    assert (tmp_path / "out-1" / NAME).read_bytes() == (tmp_path / "out-2" / NAME).read_bytes()
    assert results[0].sha256 == results[1].sha256


def test_leftovers_of_an_interrupted_run_are_removed(built):
    # the writer named in the temporary name is a process that has exited (a fixed number, as this
    # test once used, can be a live process on a busy machine: its file is then rightly kept)
    writer = subprocess.Popen([sys.executable, "-c", ""])
    writer.wait()
    leftover = built.out / f".{NAME}.tmp-{writer.pid}-0123abcd"
    leftover.write_bytes(b"half a shard")
    build(built.out, built.raw.root)
    assert not leftover.exists()
    assert check_committed_shard(str(built.out), KEY, NAME) == []


def test_empty_slice_gives_an_empty_valid_shard(tmp_path):
    out = tmp_path / "out"
    write_slice(str(out), KEY, [])
    result = build(out, tmp_path)
    assert result.num_samples == 0 and result.planned == 0
    assert tar_names(out / NAME) == []
    assert check_committed_shard(str(out), KEY, NAME) == []


def test_zero_byte_source_has_a_reason_with_two_workers(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    where = write_raw_tar(root / "n00000001.tar", [("n00000001_1.JPEG", b"")])
    row = ["n00000001_1", "n00000001", 0, "n00000001.tar", "n00000001_1.JPEG", *where["n00000001_1.JPEG"],
           hashlib.sha256(b"").hexdigest(), 1, 1, False]
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned([row], [0]))
    result = build(out, root, workers=2)
    assert [e["key"] for e in result.excluded] == ["n00000001_1"]
    assert result.excluded[0]["reason"]
