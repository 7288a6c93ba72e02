"""Images the index keeps but the encoder refuses, across re-plans: they stay planned, refused and
recorded with their reason, so the plan and the shards depend on the raw release alone, never on
what an earlier audit found; and `imnet lineage` gives a sample's index in its shard tar."""

from __future__ import annotations

import hashlib
import io
import shutil
import zlib
from pathlib import Path

import duckdb
import pytest
import webdataset as wds
from PIL import Image

from imnet_assets.image.probe import probe_image
from imnet_assets.release.lineage import lineage_rows
from imnet_assets.sample.sample_raw import write_sample_raw
from imnet_assets.stages.audit import encode_settings, expected_shard_fingerprints, run_audit
from imnet_assets.stages.fingerprints import stale_stages
from imnet_assets.stages.shard import build_shard
from imnet_assets.storage.catalog import Catalog
from tests.conftest import build_catalog_stages, local_settings, shard_verdict
from tests.core.test_shard import write_raw_tar

QUIET = lambda _m: None  # noqa: E731
BAD = "n03000000_2"  # a PNG (named .JPEG) whose pixel data is corrupt: a fine header, no pixels


def jpeg(seed: int, size=(96, 80)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (seed * 50 % 256, 120, 30)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def corrupt_png() -> bytes:
    """A PNG whose IDAT holds zlib data that does not inflate (its header is intact)."""
    buf = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").save(buf, "PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT") + 4
    length = int.from_bytes(data[at - 8 : at - 4], "big")
    data[at + 2 : at + length] = bytes(b ^ 0x5A for b in data[at + 2 : at + length])
    crc = zlib.crc32(bytes(data[at - 4 : at + length]))
    data[at + length : at + length + 4] = crc.to_bytes(4, "big")
    return bytes(data)


def raw_release(root: Path) -> Path:
    write_sample_raw(root, synsets=2, images=12, seed=0)
    write_raw_tar(root / "n03000000.tar", [("n03000000_1.JPEG", jpeg(1)), (f"{BAD}.JPEG", corrupt_png()),
                                     ("n03000000_3.JPEG", jpeg(3))])
    # The same key again, a good copy, in a tar that sorts later: the first copy is the one kept.
    write_raw_tar(root / "n03500000.tar", [(f"{BAD}.JPEG", jpeg(9)), ("n03500000_1.JPEG", jpeg(4))])
    return root


def build_all(settings) -> dict[str, str]:
    """Every stage, every shard, the audit; returns shard name -> sha256 of its bytes."""
    build_catalog_stages(settings)
    for key in settings.partition_keys:
        if shard_verdict(settings.out_root, key, settings.shard_name(key),
                       expected_shard_fingerprints(settings).get(key)) != "fresh":
            build_shard(out_root=settings.out_root, raw_root=settings.raw_root, shard_key=key,
                        shard_name=settings.shard_name(key), settings=encode_settings(settings),
                        workers=1, run_id=f"run-{key}")
    assert run_audit(settings, "run-audit", log=QUIET).problems == []
    return {k: hashlib.sha256(Path(settings.out_root, settings.shard_name(k)).read_bytes()).hexdigest()
            for k in settings.partition_keys}


def rows(settings, text: str) -> list[tuple]:
    with duckdb.connect(settings.catalog, read_only=True) as con:
        return con.execute(text).fetchall()


def verdicts(settings) -> list[tuple]:
    return rows(settings, "SELECT key, tar, status, excluded_at, reason FROM images "
                          "WHERE key = 'n03000000_2' OR status = 'excluded' ORDER BY key, tar, \"offset\"")


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    base = tmp_path_factory.mktemp("encode-exclusions")
    settings = local_settings(raw_release(base / "raw"), base, IMNET_NUM_SHARDS=2)
    return base, settings, build_all(settings)


def test_the_corrupt_png_is_kept_by_the_index_and_refused_by_the_encoder(first):
    assert probe_image(corrupt_png()).status == "kept"
    _base, settings, _shas = first
    found = dict(((k, t), (st, at, r)) for k, t, st, at, r in verdicts(settings))
    status, at, reason = found[(BAD, "n03000000.tar")]
    assert (status, at) == ("excluded", "encode") and reason.startswith("encode: ")
    status, at, reason = found[(BAD, "n03500000.tar")]
    assert (status, at) == ("excluded", "index") and reason.startswith("duplicate key: also in n03000000.tar")
    assert rows(settings, "SELECT count(*) FROM shard_samples WHERE key = 'n03000000_2'") == [(0,)]


def test_a_re_plan_keeps_the_refused_image_planned_refused_and_recorded(first, tmp_path):
    base, settings, shas = first
    before = verdicts(settings)
    planned = rows(settings, "SELECT count(*) FROM plan")
    # A gloss.txt edit makes the synset manifest stale, and nothing else.
    gloss = Path(settings.raw_root, "gloss.txt")
    gloss.write_text(gloss.read_text().replace("\t", "\tedited: ", 1))
    assert stale_stages(settings, log=QUIET) == ["synset_manifest"]
    # Re-plan anyway (as after any index change): same plan, so every shard stays fresh and the
    # audit finds the same exclusions, however many times this is done.
    for _ in range(2):
        assert build_all(settings) == shas
        assert rows(settings, "SELECT count(*) FROM plan") == planned
        assert verdicts(settings) == before
    # A fresh build of a copy of the raw release gives the same shards.
    shutil.copytree(settings.raw_root, tmp_path / "raw")
    fresh = local_settings(tmp_path / "raw", tmp_path, IMNET_NUM_SHARDS=2)
    assert build_all(fresh) == shas
    assert verdicts(fresh) == before


def test_lineage_gives_the_index_in_the_shard_tar(first):
    _base, settings, _shas = first
    ((shard, refused_at),) = rows(settings, "SELECT shard, position FROM shard_exclusions")
    later = rows(settings, f"SELECT key, position FROM shard_samples WHERE shard = '{shard}' "
                           f"AND position > {refused_at} ORDER BY position")
    assert later, "the refused image should not be its shard's last"
    keys = [s["__key__"] for s in wds.WebDataset(str(Path(settings.out_root, settings.shard_name(shard))),
                                                 shardshuffle=False)]
    with Catalog(settings.catalog, read_only=True) as cat:
        for key, plan_position in later:
            (got,) = [r for r in lineage_rows(cat, key) if r["shard"] == shard]
            assert got["plan_position"] == plan_position
            assert keys[got["position"]] == key and got["position"] == plan_position - 1
        (refused,) = [r for r in lineage_rows(cat, BAD) if r["shard"] is not None]
        assert refused["position"] is None and refused["plan_position"] == refused_at
