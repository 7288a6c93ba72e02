"""A raw tar changed in place since indexing, keeping its size and mtime (the listing cannot see
it): the shard run that reads a changed source fails naming the tar and the member, commits
nothing and excludes nothing, and marks the tar under the out root; the index and the plan are
then stale; the next index scans that tar again and removes the mark; the plan is made again; and
the release ends as a clean build of the changed raw data would make it."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import duckdb
import pytest

from imnet_assets.release import changed_sources
from imnet_assets.release.changed_sources import SourceChanged
from imnet_assets.release.outroot import state_url
from imnet_assets.sample.sample_raw import write_sample_raw
from imnet_assets.settings import Settings
from imnet_assets.stages.audit import encode_settings, run_audit
from imnet_assets.stages.filtered_index import build_filtered_index
from imnet_assets.stages.fingerprints import stale_stages
from imnet_assets.stages.shard import build_shard
from imnet_assets.stages.shuffled_plan import build_shuffled_plan
from imnet_assets.storage.fs import read_json
from tests.conftest import build_catalog_stages, local_settings

QUIET = lambda _m: None  # noqa: E731
SHARDS = 2


def settings_for(raw: Path, folder: Path) -> Settings:
    return local_settings(raw, folder, IMNET_NUM_SHARDS=SHARDS)


def build_all(s: Settings, workers: int = 1) -> None:
    for key in s.partition_keys:
        build_shard(out_root=s.out_root, raw_root=s.raw_root, shard_key=key, shard_name=s.shard_name(key),
                    settings=encode_settings(s), workers=workers, run_id=f"run-{key}")


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def rows(s: Settings, query: str) -> list[tuple]:
    with duckdb.connect(s.catalog, read_only=True) as con:
        return sorted(con.execute(query).fetchall())


def change_in_place(path: Path, offset: int, size: int) -> None:
    """Flip the low bit of a few bytes in the middle of a JPEG's entropy-coded data (no 0xFF
    marker made or broken: it still decodes), then put the tar's times back: same size, same mtime."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset + size // 2)
        chunk = bytearray(f.read(32))
        for i, b in enumerate(chunk):
            if b not in (0xFE, 0xFF) and (i == 0 or chunk[i - 1] != 0xFF):
                chunk[i] ^= 0x01
        f.seek(offset + size // 2)
        f.write(chunk)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size


@pytest.fixture
def built(tmp_path):
    write_sample_raw(tmp_path / "raw", synsets=2, images=10, seed=5)
    s = settings_for(tmp_path / "raw", tmp_path / "a")
    build_catalog_stages(s)
    build_all(s)
    return s


def test_a_source_changed_in_place_fails_its_run_marks_the_tar_and_the_next_build_heals(built, tmp_path):
    s = built
    key, tar, member, offset, size, shard = rows(
        s, 'SELECT key, tar, member, "offset", size, shard FROM plan WHERE size > 20000 ORDER BY key LIMIT 1')[0]
    change_in_place(Path(s.raw_root) / tar, offset, size)
    assert stale_stages(s, log=QUIET) == []  # the listing cannot tell

    final = Path(s.out_root) / s.shard_name(shard)
    before = final.read_bytes()
    with pytest.raises(SourceChanged) as caught:  # through the shared worker pool: the error pickles whole
        build_shard(out_root=s.out_root, raw_root=s.raw_root, shard_key=shard, shard_name=s.shard_name(shard),
                    settings=encode_settings(s), workers=2, run_id="run-changed")
    err = caught.value
    assert (err.tar, err.member) == (tar, member) and "sha256" in err.found
    assert tar in str(err) and member in str(err)
    # nothing committed, nothing excluded: the run's commit record is gone, the tar was not replaced
    assert read_json(state_url(s.out_root, shard)) is None and not os.path.exists(state_url(s.out_root, shard))
    assert final.read_bytes() == before and not list(final.parent.glob(f"*{s.shard_name(shard)}.tmp*"))
    marks = changed_sources.pending(s.out_root)
    assert list(marks) == [tar] and marks[tar].doc["member"] == member and marks[tar].doc["shard"] == shard
    assert tar in marks[tar].describe()
    assert stale_stages(s, log=QUIET) == ["filtered_index", "shuffled_plan"]

    build_filtered_index(s, "run-reindex", log=QUIET)
    assert changed_sources.pending(s.out_root) == {}
    assert stale_stages(s, log=QUIET) == ["shuffled_plan"]  # its rows changed: planned again
    build_shuffled_plan(s, "run-replan", log=QUIET)
    assert stale_stages(s, log=QUIET) == []
    build_all(s)
    assert not rows(s, "SELECT key FROM images WHERE status = 'excluded' AND reason LIKE '%changed%'")

    # A clean build of the changed raw data: the same catalog rows and byte-identical shards.
    clean = settings_for(Path(s.raw_root), tmp_path / "clean")
    build_catalog_stages(clean)
    build_all(clean)
    for query in ('SELECT key, tar, "offset", size, sha256, status, reason FROM images',
                  'SELECT key, shard, position, sha256 FROM plan', "SELECT * FROM tar_scans"):
        assert rows(s, query) == rows(clean, query), query
    for k in s.partition_keys:
        assert sha(Path(s.out_root) / s.shard_name(k)) == sha(Path(clean.out_root) / clean.shard_name(k))


def test_a_mark_made_again_while_the_index_ran_is_kept(built):
    """The index removes only the marks it acted on: a shard run that marked the tar again since
    keeps its mark, and the index stays stale."""
    s = built
    tar = sorted(p.name for p in Path(s.raw_root).glob("*.tar"))[0]
    err = SourceChanged("x", tar, f"{tar[:-4]}_1.JPEG", "sha256 0")
    changed_sources.mark(s.out_root, err, 512, 100, "0" * 64, "0000", "run-a")
    seen = changed_sources.pending(s.out_root)
    # while a tar is marked, an audit of the shards as they are (the sensor asks for one once every
    # shard is in) fails naming it, and writes no _info.json
    report = run_audit(s, "run-audit", log=QUIET)
    assert any(p.startswith(f"raw tar {tar} changed since indexing") for p in report.problems), report.problems
    assert not report.info_written
    changed_sources.mark(s.out_root, err, 512, 100, "0" * 64, "0001", "run-b")  # marked again since
    assert changed_sources.clear(s.out_root, seen) == []
    assert list(changed_sources.pending(s.out_root)) == [tar]
    assert changed_sources.clear(s.out_root, changed_sources.pending(s.out_root)) == [tar]
    assert changed_sources.pending(s.out_root) == {}


def test_a_source_cut_short_fails_its_run_naming_tar_and_member(built):
    s = built
    key, tar, member, offset, size, shard = rows(
        s, 'SELECT key, tar, member, "offset", size, shard FROM plan ORDER BY "offset" DESC LIMIT 1')[0]
    path = Path(s.raw_root) / tar
    shutil.copy(path, path.with_suffix(".keep"))
    with open(path, "r+b") as f:
        f.truncate(offset + size // 2)  # the tar lost the end of that member (and the end blocks)
    with pytest.raises(SourceChanged) as caught:
        build_shard(out_root=s.out_root, raw_root=s.raw_root, shard_key=shard, shard_name=s.shard_name(shard),
                    settings=encode_settings(s), workers=1, run_id="run-short")
    assert (caught.value.tar, caught.value.member) == (tar, member)
    assert f"a read of {size // 2} of its {size} bytes" in caught.value.found
    assert list(changed_sources.pending(s.out_root)) == [tar]
