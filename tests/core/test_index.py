"""The filtered index over hostile and damaged raw tars: every member becomes exactly one record
with a safe key, damage and unsafe names become exclusions with reasons naming the tar, and
duplicate keys across tars keep the first copy (by tar name, then offset)."""

from __future__ import annotations

import hashlib
import os
import re
import tarfile

import duckdb
import pytest

from imnet_assets.settings import Settings
from imnet_assets.stages.filtered_index import build_filtered_index
from imnet_assets.stages.index import scan_tar
from imnet_assets.stages.raw_tars import build_raw_tars
from imnet_assets.stages.scan_pool import scan_tars
from imnet_assets.stages.synset_manifest import build_synset_manifest
from tests.core.test_rawtar import jpeg, layout, make_tar

SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")


def write(path, members) -> bytes:
    data = make_tar(members)
    path.write_bytes(data)
    return data


def hostile_members():
    sym = tarfile.TarInfo("n00000001_90.JPEG")
    sym.type, sym.linkname = tarfile.SYMTYPE, "../../etc/passwd"
    hard = tarfile.TarInfo("n00000001_91.JPEG")
    hard.type, hard.linkname = tarfile.LNKTYPE, "n00000001_1.JPEG"
    return [
        ("n00000001_1.JPEG", jpeg(1)),
        ("sub/n00000001_2.JPEG", jpeg(2)),
        ("../evil.JPEG", jpeg(3)),
        ("/etc/evil.JPEG", jpeg(4)),
        ("a/../../evil2.JPEG", jpeg(5)),
        sym,
        hard,
        ("n00000001 3.JPEG", jpeg(6)),
    ]


def test_hostile_names_get_safe_keys_or_recorded_exclusions(tmp_path):
    data = write(tmp_path / "n00000001.tar", hostile_members())
    records = scan_tar(str(tmp_path / "n00000001.tar"))
    by_member = {r.member: r for r in records}
    assert len(records) == 8  # one record per member, none dropped
    assert all(SAFE_KEY.match(r.key) for r in records), [r.key for r in records]
    assert all(r.wnid == "n00000001" and r.tar == "n00000001.tar" for r in records)

    assert by_member["n00000001_1.JPEG"].status == "kept"
    sub = by_member["sub/n00000001_2.JPEG"]
    assert (sub.key, sub.status) == ("n00000001_2", "kept")
    assert by_member["n00000001 3.JPEG"].key.startswith("n00000001_3_h")  # sanitized: a digest of the name
    for name in ("../evil.JPEG", "a/../../evil2.JPEG"):
        r = by_member[name]
        assert r.status == "excluded" and "unsafe member name" in r.reason and "'..'" in r.reason
        assert "evil" not in r.key
    r = by_member["/etc/evil.JPEG"]
    assert r.status == "excluded" and "absolute" in r.reason and "evil" not in r.key
    assert by_member["n00000001_90.JPEG"].status == "excluded"
    assert "symlink" in by_member["n00000001_90.JPEG"].reason
    assert by_member["n00000001_91.JPEG"].status == "excluded"
    assert "hard link" in by_member["n00000001_91.JPEG"].reason
    # Where the data is recorded, it points at exactly the member's bytes.
    for r in records:
        if r.sha256:
            assert hashlib.sha256(data[r.offset : r.offset + r.size]).hexdigest() == r.sha256
    keys = [r.key for r in records]
    assert len(keys) == len(set(keys))  # fallback keys of refused names are distinct


def test_truncated_tar_keeps_its_readable_members_and_records_the_tail(tmp_path):
    files = [(f"n00000002_{i}.JPEG", jpeg(i)) for i in range(1, 6)]
    full = make_tar(files)
    fourth = layout(full)[3]
    for variant, cut in (("mid-member", fourth.offset_data + 100), ("mid-header", fourth.offset + 300)):
        path = tmp_path / variant / "n00000002.tar"
        path.parent.mkdir()
        path.write_bytes(full[:cut])
        records = scan_tar(str(path))
        kept = [r for r in records if r.status == "kept"]
        assert [r.member for r in kept] == [n for n, _ in files[:3]], variant
        excluded = [r for r in records if r.status == "excluded"]
        assert len(excluded) == 1, variant
        tail = excluded[0]
        assert "n00000002.tar" in tail.reason and "truncated" in tail.reason, variant
        assert SAFE_KEY.match(tail.key), variant
        if variant == "mid-member":
            assert (tail.key, tail.member, tail.offset) == ("n00000002_4", files[3][0], fourth.offset_data)
        else:
            assert tail.offset == fourth.offset and tail.member == ""


def test_parallel_scan_gives_the_same_records_as_a_serial_one(tmp_path):
    urls = []
    for t in range(3):
        wnid = f"n0000001{t}"
        write(tmp_path / f"{wnid}.tar", [(f"{wnid}_{i}.JPEG", jpeg(i + t)) for i in range(4)])
        urls.append(str(tmp_path / f"{wnid}.tar"))
    serial = list(scan_tars(urls, workers=1))
    parallel = list(scan_tars(urls, workers=2))
    assert parallel == serial
    assert [u for u, _ in parallel] == urls


def index_release(raw, tmp_path) -> list[tuple]:
    s = Settings.from_env({"IMNET_RAW_ROOT": str(raw), "IMNET_OUT_ROOT": str(tmp_path / "out"),
                           "IMNET_CATALOG": str(tmp_path / "catalog.duckdb"), "IMNET_WORKERS": "1"})
    quiet = lambda _m: None  # noqa: E731
    build_raw_tars(s, "test-run", quiet)
    build_synset_manifest(s, "test-run", quiet)
    build_filtered_index(s, "test-run", quiet)
    with duckdb.connect(s.catalog, read_only=True) as con:
        return con.execute(
            'SELECT key, tar, member, "offset", status, reason FROM images ORDER BY tar, "offset"'
        ).fetchall()


def test_duplicate_keys_keep_the_first_by_tar_then_offset(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    a = write(raw / "n00000001.tar", [("n00000001_1.JPEG", jpeg(1)), ("sub/n00000001_1.JPEG", jpeg(2)),
                                      ("n00000001_2.JPEG", jpeg(3))])
    write(raw / "n00000002.tar", [("n00000002_1.JPEG", jpeg(4)), ("n00000001_1.JPEG", jpeg(5)),
                                  ("n00000001_2.jpeg", jpeg(6))])
    first_offset = layout(a)[0].offset_data
    second_offset = layout(a)[2].offset_data
    rows = index_release(raw, tmp_path)
    assert len(rows) == 6
    status = {(tar, member): (st, reason) for _k, tar, member, _o, st, reason in rows}
    assert status[("n00000001.tar", "n00000001_1.JPEG")] == ("kept", None)
    assert status[("n00000001.tar", "n00000001_2.JPEG")] == ("kept", None)
    assert status[("n00000002.tar", "n00000002_1.JPEG")] == ("kept", None)
    for where, first in ((("n00000001.tar", "sub/n00000001_1.JPEG"), first_offset),
                         (("n00000002.tar", "n00000001_1.JPEG"), first_offset),
                         (("n00000002.tar", "n00000001_2.jpeg"), second_offset)):
        st, reason = status[where]
        assert st == "excluded" and reason.startswith("duplicate key"), where
        assert f"n00000001.tar at byte {first}" in reason, where
    kept = [k for k, *_rest, st, _r in rows if st == "kept"]
    assert len(kept) == len(set(kept)) == 3

    # When the first copy goes away, the next one (by tar, then offset) takes its place.
    os.remove(raw / "n00000001.tar")
    rows = index_release(raw, tmp_path)
    status = {(tar, member): (st, reason) for _k, tar, member, _o, st, reason in rows}
    assert status == {
        ("n00000002.tar", "n00000002_1.JPEG"): ("kept", None),
        ("n00000002.tar", "n00000001_1.JPEG"): ("kept", None),
        ("n00000002.tar", "n00000001_2.jpeg"): ("kept", None),
    }


def test_damaged_tar_rows_load_into_the_catalog_with_reasons(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    full = make_tar([(f"n00000003_{i}.JPEG", jpeg(i)) for i in range(1, 4)])
    (raw / "n00000003.tar").write_bytes(full[: layout(full)[2].offset_data + 50])
    write(raw / "n00000004.tar", hostile_members())
    rows = index_release(raw, tmp_path)
    assert len(rows) == 3 + 8
    excluded = {(tar, member): reason for _k, tar, member, _o, st, reason in rows if st == "excluded"}
    assert "truncated raw tar n00000003.tar" in excluded[("n00000003.tar", "n00000003_3.JPEG")]
    assert {m for t, m in excluded if t == "n00000004.tar"} == {
        "../evil.JPEG", "/etc/evil.JPEG", "a/../../evil2.JPEG", "n00000001_90.JPEG", "n00000001_91.JPEG"}
    assert all(excluded.values())


def test_truncated_images_are_trial_decoded_at_index_time(tmp_path):
    # Exact balance: an image the encoder would refuse for the 5% rule is excluded by the index,
    # before the plan; one from which enough decodes stays kept and marked for repair.
    from imnet_assets.image.decode import ImageRejected
    from imnet_assets.image.encode import EncodeSettings, encode_image
    from tests.core.test_encode import _photo_jpeg

    data = _photo_jpeg()
    almost_nothing, a_tenth = data[: len(data) // 50], data[: len(data) // 10]
    write(tmp_path / "n00000002.tar", [("n00000002_1.JPEG", almost_nothing), ("n00000002_2.JPEG", a_tenth),
                                       ("n00000002_3.JPEG", data)])
    by_key = {r.key: r for r in scan_tar(str(tmp_path / "n00000002.tar"))}
    refused = by_key["n00000002_1"]
    assert refused.status == "excluded" and not refused.needs_repair
    with pytest.raises(ImageRejected) as exc:  # exactly the reason the encoder gives
        encode_image(almost_nothing, EncodeSettings())
    assert refused.reason == exc.value.reason and "only the top" in refused.reason
    assert (by_key["n00000002_2"].status, by_key["n00000002_2"].needs_repair) == ("kept", True)
    assert (by_key["n00000002_3"].status, by_key["n00000002_3"].needs_repair) == ("kept", False)


def test_cut_short_images_of_formats_without_an_end_marker_are_trial_decoded(tmp_path):
    # A TIFF or BMP has no end marker for the probe to miss (formats.looks_truncated): the index
    # decodes it to know whether the encoder's 5% rule refuses it, so that shards balance exactly
    import io

    import numpy as np
    from PIL import Image

    from imnet_assets.image.decode import ImageRejected
    from imnet_assets.image.encode import EncodeSettings, encode_image

    noise = Image.fromarray(np.random.default_rng(7).integers(0, 256, (300, 120, 3), dtype=np.uint8))
    files = {}
    for fmt in ("TIFF", "BMP"):
        out = io.BytesIO()
        noise.save(out, fmt)
        data = out.getvalue()
        files[f"n00000005_{fmt}1.JPEG"], files[f"n00000005_{fmt}2.JPEG"] = data[: len(data) // 40], data
        files[f"n00000005_{fmt}3.JPEG"] = data[: len(data) // 2]
    write(tmp_path / "n00000005.tar", list(files.items()))
    by_key = {r.key: r for r in scan_tar(str(tmp_path / "n00000005.tar"))}
    for fmt in ("TIFF", "BMP"):
        with pytest.raises(ImageRejected) as exc:
            encode_image(files[f"n00000005_{fmt}1.JPEG"], EncodeSettings())
        assert "rows decoded" in exc.value.reason
        assert (by_key[f"n00000005_{fmt}1"].status, by_key[f"n00000005_{fmt}1"].reason) == ("excluded", exc.value.reason)
        assert by_key[f"n00000005_{fmt}2"].status == by_key[f"n00000005_{fmt}3"].status == "kept", fmt


def test_version_3_scans_of_tars_holding_jpegs_alone_stand_after_the_upgrade(tmp_path):
    # INDEX_VERSION 4 changed the trial decode for images other than JPEG only: of tars scanned by
    # version 3, those holding another format are read again, the others keep their rows unread
    import io

    from PIL import Image

    from imnet_assets.stages.fingerprints import INDEX_VERSION

    png = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(png, "PNG")
    raw = tmp_path / "raw"
    raw.mkdir()
    write(raw / "n00000006.tar", [("n00000006_1.JPEG", jpeg(1)), ("n00000006_2.JPEG", png.getvalue())])
    write(raw / "n00000007.tar", [("n00000007_1.JPEG", jpeg(3))])
    write(raw / "n00000008.tar", [("n00000008_1.JPEG", jpeg(4)), ("n00000008_2.JPEG", jpeg(5))])
    rows = index_release(raw, tmp_path)
    catalog = str(tmp_path / "catalog.duckdb")
    with duckdb.connect(catalog) as con:  # as a version-3 indexer left it
        con.execute("UPDATE tar_scans SET index_version = '3'")
    s = Settings.from_env({"IMNET_RAW_ROOT": str(raw), "IMNET_OUT_ROOT": str(tmp_path / "out"),
                           "IMNET_CATALOG": catalog, "IMNET_WORKERS": "1"})
    said = []
    build_filtered_index(s, "test-run-2", said.append)
    assert "indexing 1 of 3 tars (2 unchanged)" in said
    with duckdb.connect(catalog, read_only=True) as con:
        assert con.execute("SELECT DISTINCT index_version FROM tar_scans").fetchall() == [(INDEX_VERSION,)]
        again = con.execute('SELECT key, tar, member, "offset", status, reason FROM images ORDER BY tar, "offset"')
        assert again.fetchall() == rows
