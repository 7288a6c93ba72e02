"""Eval tars as users give them (stages/eval_pool.py, storage/compressed_tar.py): compressed (gzip,
bzip2, xz; named .tar.gz, .tgz, or .tar though it is gzip) they are hashed member by member as the
plain tar is, not as one file; and the parts of a tar that are no member (a damaged header in the
middle) are recorded, not only logged: the catalog's eval_damage holds them and the dataset card
names them, while the readable members are hashed. Real JPEGs in real tars, real pool workers, a real
DuckDB catalog, a real build."""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import types

import duckdb
import pytest

from imnet_assets.release.card import card_url
from imnet_assets.stages.audit import encode_settings, run_audit
from imnet_assets.stages.decontam import eval_listing, hash_eval_set, refresh_eval_images
from imnet_assets.stages.shard import build_shard
from imnet_assets.storage.catalog import Catalog
from imnet_assets.storage.fs import StorageError
from tests.conftest import build_catalog_stages
from tests.core.test_features import _photo, settings_for, write_release
from tests.core.test_shard import write_raw_tar

QUIET = lambda _m: None  # noqa: E731


def members(n: int = 6) -> list[tuple[str, bytes]]:
    return [(f"val/ILSVRC2012_val_{i:08d}.JPEG", _photo(5000 + i)) for i in range(1, n + 1)]


def plain_tar(path, n: int = 6) -> bytes:
    write_raw_tar(path, members(n), tarfile.PAX_FORMAT)
    return path.read_bytes()


def damaged_in_the_middle(path) -> tuple[int, str]:
    """A plain tar of 6 JPEGs whose third member's header is overwritten (its checksum fails): the
    offset of that header, and the damaged member's name."""
    where = write_raw_tar(path, members(), tarfile.PAX_FORMAT)
    name = members()[2][0]
    header = where[name][0] - 512
    data = bytearray(path.read_bytes())
    data[header:header + 100] = b"\x55" * 100
    path.write_bytes(bytes(data))
    return header, name


def eval_rows(folder, tmp_path, log=QUIET) -> tuple[list[tuple], list[tuple]]:
    """(eval_images rows, eval_damage rows) of a real catalog once `folder` is the eval set."""
    settings = types.SimpleNamespace(eval_exclude=str(folder), workers=2, image_timeout=60.0)
    with Catalog(str(tmp_path / f"{folder.name}.duckdb")) as cat:
        refresh_eval_images(cat, settings, "run", log)
        images = cat.con.execute("SELECT file, sha256, phash, no_phash FROM eval_images ORDER BY file").fetchall()
        damage = cat.con.execute("SELECT file, at_byte, bytes, reason FROM eval_damage ORDER BY file").fetchall()
    return images, damage


def renamed(rows: list[tuple], old: str, new: str) -> list[tuple]:
    return [(f.replace(old, new, 1), *rest) for f, *rest in rows]


def test_a_compressed_eval_tar_is_hashed_member_by_member_as_the_plain_tar_is(tmp_path):
    raw = plain_tar(tmp_path / "pack.tar")
    folders = {"plain": ("pack.tar", raw), "gz": ("pack.tar.gz", gzip.compress(raw)),
               "misnamed": ("pack.tar", gzip.compress(raw)), "tgz": ("pack.tgz", gzip.compress(raw)),
               "bz2": ("pack.tar.bz2", bz2.compress(raw)), "xz": ("pack.tar.xz", lzma.compress(raw))}
    got = {}
    for folder, (name, data) in folders.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(data)
        logs: list[str] = []
        got[folder] = eval_rows(tmp_path / folder, tmp_path, logs.append)
        if folder != "plain":
            assert any(m.startswith(f"eval tar {name} is ") and "-compressed" in m for m in logs), logs
    plain, damage = got["plain"]
    assert len(plain) == 6 and damage == [] and all(p is not None for _f, _s, p, _w in plain)
    assert [f for f, *_ in plain] == [f"pack.tar/{n}" for n, _d in members()]
    assert got["misnamed"] == (plain, [])  # a gzip file named .tar: the plain tar's rows exactly
    for folder in ("gz", "tgz", "bz2", "xz"):
        assert got[folder] == (renamed(plain, "pack.tar/", f"{folders[folder][0]}/"), []), folder


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_a_file_named_as_a_tar_with_no_readable_member_is_recorded_damaged_not_hashed_whole(tmp_path, compressed):
    """Hashed as one image it was read whole into one worker (an eval tar of 6.4 GB whose first
    header is damaged), for a sha256 no raw image has and no pHash; nothing of it can be hashed,
    and the catalog and the card say so."""
    (tmp_path / "ev").mkdir()
    text = b"not a tar at all\n" * 100
    name = "notes.tar.gz" if compressed else "notes.tar"
    (tmp_path / "ev" / name).write_bytes(gzip.compress(text) if compressed else text)
    logs: list[str] = []
    images, damage = eval_rows(tmp_path / "ev", tmp_path, logs.append)
    assert images == []
    [(file, at, _size, reason)] = damage
    assert (file, at) == (name, 0), damage
    kind = "gzip-compressed eval tar" if compressed else "eval tar"
    assert reason == f"truncated or damaged {kind} {name}: {len(text)} unreadable bytes from byte 0 (not a tar)"
    assert any(m.startswith(f"eval tar {name} holds no readable member (") and m.endswith("nothing of it is hashed")
               for m in logs), logs


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_a_damaged_header_in_an_eval_tar_is_recorded_in_the_catalog_and_its_readable_members_hashed(
        tmp_path, compressed):
    (tmp_path / "ev").mkdir()
    header, lost = damaged_in_the_middle(tmp_path / "ev" / "val.tar")
    if compressed:
        (tmp_path / "ev" / "val.tar").write_bytes(gzip.compress((tmp_path / "ev" / "val.tar").read_bytes()))
    logs: list[str] = []
    images, damage = eval_rows(tmp_path / "ev", tmp_path, logs.append)
    assert [f for f, *_ in images] == [f"val.tar/{n}" for n, _d in members() if n != lost]
    assert all(p is not None for _f, _s, p, _w in images)
    [(file, at, size, reason)] = damage
    assert (file, at) == ("val.tar", header) and size > 512
    kind = "gzip-compressed eval tar" if compressed else "eval tar"
    assert reason == f"damaged {kind} val.tar: {size} unreadable bytes skipped at byte {header} (a damaged header; " \
                     "the member there is lost)"
    assert any(m.startswith(f"eval tar val.tar: {reason}; its 5 readable members are hashed") for m in logs), logs


def test_the_dataset_card_names_a_damaged_eval_tar(tmp_path):
    rel = write_release(tmp_path)
    (rel.eval / "extra").mkdir()
    header, _lost = damaged_in_the_middle(rel.eval / "extra" / "val.tar")
    s = settings_for(tmp_path, rel)
    build_catalog_stages(s)
    for key in s.partition_keys:
        build_shard(out_root=s.out_root, raw_root=s.raw_root, shard_key=key, shard_name=s.shard_name(key),
                    settings=encode_settings(s), workers=1, run_id=f"run-{key}")
    assert run_audit(s, "run-audit", log=QUIET).problems == []
    with duckdb.connect(s.catalog, read_only=True) as con:
        [(at, reason)] = con.execute("SELECT at_byte, reason FROM eval_damage WHERE file = 'extra/val.tar'").fetchall()
        hashed = con.execute("SELECT count(*) FROM eval_images WHERE file LIKE 'extra/val.tar/%'").fetchone()[0]
    assert at == header and hashed == 5
    card = open(card_url(s)).read()
    assert (f"- 1 damaged range in eval files could not be hashed, so the eval images there (if any) were not matched: "
            f"`extra/val.tar` at byte {header}: {reason} (catalog table `eval_damage`).") in card, card


def test_a_compressed_eval_tar_that_changed_since_it_was_listed_fails_naming_it_never_damage(tmp_path):
    """Its object ends before its listed size (cut on storage after the listing): the read says so and
    the hashing fails naming the file; nothing is taken for damaged data (SPEC "Failure behaviour")."""
    (tmp_path / "ev").mkdir()
    packed = gzip.compress(plain_tar(tmp_path / "pack.tar"))
    (tmp_path / "ev" / "val.tar.gz").write_bytes(packed)
    [entry] = eval_listing(str(tmp_path / "ev"))
    (tmp_path / "ev" / "val.tar.gz").write_bytes(packed[: len(packed) // 2])
    damaged: list = []
    with pytest.raises(StorageError, match=rf"val\.tar\.gz gave only {len(packed) // 2} bytes, not the {len(packed)} "
                                           "it was listed with: it changed since it was listed"):
        list(hash_eval_set([entry], 2, QUIET, damaged=damaged))
    assert damaged == []
