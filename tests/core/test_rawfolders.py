"""The extracted layout of the raw release, read in place (storage/rawfolders.py): a root of
per-synset folders `<wnid>/<wnid>_<n>.JPEG` gives the same catalog rows (but where the bytes are)
and byte-identical shards as the tar layout of the same files; lineage names the file; a changed
file makes only its synset's index stale; a root with neither layout says what it holds."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tarfile
import types
from pathlib import Path

import duckdb
import pytest

from imnet_assets.sample.sample_raw import write_sample_raw
from imnet_assets.stages.audit import encode_settings
from imnet_assets.stages.filtered_index import build_filtered_index
from imnet_assets.stages.fingerprints import stale_stages
from imnet_assets.stages.raw_tars import build_raw_tars
from imnet_assets.stages.shard import build_shard
from imnet_assets.storage.inventory import RawLayoutError, list_raw
from imnet_assets.storage.member_names import printable_name, raw_name
from imnet_assets.storage.rawfolders import list_files
from tests.conftest import build_catalog_stages, build_env, environ, imnet, local_settings

QUIET = lambda _m: None  # noqa: E731
SYNSETS, IMAGES, NUM_SHARDS = 4, 12, 3
IMAGE_COLUMNS = ("key, wnid, size, sha256, width, height, format, mode, status, "
                 "regexp_replace(coalesce(reason, ''), 'also in .*', 'also in (where)') AS reason, needs_repair, "
                 "phash, duplicate_of")


def tars_of_folders(folders: Path, tars: Path) -> None:
    """The tar layout of the same files: `<wnid>.tar` per synset folder, its files as members in
    the folder's listing order, named by their paths inside it; words.txt / gloss.txt copied."""
    tars.mkdir(parents=True)
    for folder in sorted(p for p in folders.iterdir() if p.is_dir() and not p.name.startswith(".")):
        with tarfile.open(tars / f"{folder.name}.tar", "w", format=tarfile.GNU_FORMAT) as tf:
            for entry in list_files(str(folder) + "/"):
                data = (folder / entry.path).read_bytes()
                info = tarfile.TarInfo(entry.path)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    for name in ("words.txt", "gloss.txt"):
        shutil.copy(folders / name, tars / name)


def build_all(raw: Path, folder: Path):
    settings = local_settings(raw, folder, IMNET_NUM_SHARDS=NUM_SHARDS)
    build_catalog_stages(settings)
    for key in settings.partition_keys:
        build_shard(out_root=settings.out_root, raw_root=settings.raw_root, shard_key=key,
                    shard_name=settings.shard_name(key), settings=encode_settings(settings), workers=1,
                    run_id=f"run-{key}")
    return settings


def shard_digests(settings) -> dict[str, str]:
    return {k: hashlib.sha256(Path(settings.out_root, settings.shard_name(k)).read_bytes()).hexdigest()
            for k in settings.partition_keys}


def query(settings, text: str) -> list[tuple]:
    with duckdb.connect(settings.catalog, read_only=True) as con:
        return con.execute(text).fetchall()


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """A sample release written as folders, the tar layout of the same files, each built whole."""
    base = tmp_path_factory.mktemp("layouts")
    summary = write_sample_raw(base / "folders", synsets=SYNSETS, images=IMAGES, seed=3, layout="folders")
    tars_of_folders(base / "folders", base / "tars")
    return types.SimpleNamespace(
        base=base, summary=summary,
        folders=build_all(base / "folders", base / "built-folders"),
        tars=build_all(base / "tars", base / "built-tars"),
    )


def test_sample_raw_writes_the_extracted_layout_with_the_files_the_tars_hold(tmp_path):
    tars = write_sample_raw(tmp_path / "t", synsets=4, images=12, seed=1)
    folders = write_sample_raw(tmp_path / "f", synsets=4, images=12, seed=1, layout="folders")
    assert folders.wnids == tars.wnids and folders.sources == [tmp_path / "f" / w for w in tars.wnids]
    # every hostile name a file in a folder can have is given; absolute and `..` names are not
    assert set(tars.hostile) - set(folders.hostile) == {"dotdot", "absolute"}
    for wnid in tars.wnids:
        with tarfile.open(tmp_path / "t" / f"{wnid}.tar") as tf:
            in_tar = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        files = {e.path: (tmp_path / "f" / wnid / e.path).read_bytes() for e in list_files(str(tmp_path / "f" / wnid))}
        assert len(files) == IMAGES and sorted(files) == sorted(folders.members[wnid])
        same = {n for n in in_tar if n in files}
        assert all(in_tar[n] == files[n] for n in same)
        assert len(same) >= IMAGES - 2  # all but the absolute and `..` names
    assert (tmp_path / "f" / "words.txt").read_bytes() == (tmp_path / "t" / "words.txt").read_bytes()
    assert not [p for p in (tmp_path / "f").iterdir() if p.name.startswith(".")]  # no temporary left


def test_folders_and_their_tars_build_byte_identical_shards(both):
    f, t = both.folders, both.tars
    assert list_raw(f.raw_root, log=QUIET).layout == "folders"
    assert list_raw(t.raw_root, log=QUIET).layout == "tars"
    assert shard_digests(f) == shard_digests(t)
    order = " ORDER BY key, sha256"
    rows = query(f, f"SELECT {IMAGE_COLUMNS} FROM images{order}")
    assert rows == query(t, f"SELECT {IMAGE_COLUMNS} FROM images{order}")
    assert len(rows) == SYNSETS * IMAGES
    kinds = {r[9].split(":")[0] for r in rows if r[8] == "excluded"}
    assert "duplicate key" in kinds and any("tiny" in k or "small" in k for k in kinds), kinds
    # labels: the index in the sorted list of synsets, lemmas and glosses from words.txt / gloss.txt
    synsets = "SELECT wnid, label, lemma, gloss, num_images, num_kept FROM synsets ORDER BY wnid"
    assert query(f, synsets) == query(t, synsets)
    assert [r[:2] for r in query(f, synsets)] == [(w, i) for i, w in enumerate(sorted(both.summary.wnids))]
    assert query(f, "SELECT key, shard, position FROM plan ORDER BY key") == \
        query(t, "SELECT key, shard, position FROM plan ORDER BY key")
    # where the bytes are: the folder, the file's path inside it, its number in the listing
    located = query(f, "SELECT tar, member, \"offset\", size, sha256 FROM images WHERE sha256 IS NOT NULL")
    for tar, member, number, size, sha in located:
        assert re.fullmatch(r"n\d{8}/", tar)
        data = Path(f.raw_root, tar, raw_name(member)).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha)
        assert list_files(str(Path(f.raw_root, tar)))[number].path == raw_name(member)
    assert query(f, "SELECT tar, wnid, num_members FROM raw_tars ORDER BY tar") == \
        [(f"{w}/", w, IMAGES) for w in sorted(both.summary.wnids)]
    assert query(f, "SELECT sum(size) FROM raw_tars") == query(f, "SELECT sum(size) FROM images")
    assert stale_stages(f, log=QUIET) == []


def test_hostile_file_names_keep_the_rules_of_the_tar_layout(both):
    f = both.folders
    odd = both.summary.hostile
    assert {"not_utf8", "newline", "folder", "repeated_key", "long", "dot_in_stem"} <= set(odd)
    rows = {m: (k, s, r) for k, m, s, r in query(f, "SELECT key, member, status, reason FROM images")}
    newline = rows[printable_name(odd["newline"])]
    assert newline[1] == "kept" and re.fullmatch(r"[A-Za-z0-9_-]+", newline[0])
    assert rows[printable_name(odd["not_utf8"])][1] == "kept"
    assert rows[odd["folder"]][0] == odd["folder"].rsplit("/", 1)[1].rsplit(".", 1)[0]
    # of two files with the same key, the one in the synset folder itself stays (listing order)
    assert rows[odd["repeated_key"]][1:] == ("excluded", rows[odd["repeated_key"]][2])
    first = odd["repeated_key"].split("/", 1)[1]  # again/<first> repeats <first>'s key
    assert rows[odd["repeated_key"]][2] == f"duplicate key: also in {first[:9]}/{first}"
    assert rows[odd["repeated_key"].split("/", 1)[1]][1] == "kept"


def test_lineage_names_the_file(both, tmp_path):
    f = both.folders
    key, tar, member, number = query(
        f, "SELECT key, tar, member, \"offset\" FROM images WHERE status = 'kept' ORDER BY key LIMIT 1")[0]
    env = build_env(tmp_path, f.raw_root, IMNET_OUT_ROOT=f.out_root, IMNET_CATALOG=f.catalog,
                    IMNET_NUM_SHARDS=str(NUM_SHARDS))
    out = imnet(["lineage", key], env).stdout
    path = os.path.join(f.raw_root, tar, member)
    assert os.path.isfile(path)
    assert f"source       {path}  (a file of the synset folder {tar})" in out
    assert f"file {number} of the folder's listing, read whole" in out


def test_a_changed_added_or_removed_file_reindexes_only_its_synset(both, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(both.base / "folders", raw, symlinks=True)
    settings = local_settings(raw, tmp_path, IMNET_NUM_SHARDS=NUM_SHARDS)
    shutil.copy(both.folders.catalog, settings.catalog)
    shutil.copytree(both.folders.out_root, settings.out_root)
    # copytree keeps mtimes (copy2): the copy lists as the original did
    assert stale_stages(settings, log=QUIET) == []
    wnids = sorted(both.summary.wnids)
    before = query(settings, "SELECT tar, mtime FROM raw_tars ORDER BY tar")

    def reindex() -> list[str]:
        said: list[str] = []
        build_raw_tars(settings, "r", log=said.append)
        build_filtered_index(settings, "i", log=said.append)
        return [m for m in said if m.startswith("indexing ")]

    victim = next(p for p in sorted((raw / wnids[1]).iterdir()) if p.is_file())
    victim.write_bytes(victim.read_bytes()[:-10])  # changed in place
    assert stale_stages(settings, log=QUIET)[:1] == ["raw_tars"]
    now = query(settings, "SELECT tar, mtime FROM raw_tars ORDER BY tar")
    assert now == before  # stale, not yet rebuilt
    assert reindex() == ["indexing 1 of 4 tars (3 unchanged)"]
    changed = dict(query(settings, "SELECT tar, mtime FROM raw_tars"))
    assert [t for t, m in before if changed[t] != m] == [f"{wnids[1]}/"]
    size = query(settings, f"SELECT size FROM images WHERE tar = '{wnids[1]}/' AND member = '{victim.name}'")
    assert size == [(victim.stat().st_size,)]

    (raw / wnids[2] / "extra.JPEG").write_bytes(victim.read_bytes())  # added
    assert reindex() == ["indexing 1 of 4 tars (3 unchanged)"]
    assert query(settings, f"SELECT num_members FROM raw_tars WHERE tar = '{wnids[2]}/'") == [(IMAGES + 1,)]
    (raw / wnids[2] / "extra.JPEG").unlink()  # removed
    assert reindex() == ["indexing 1 of 4 tars (3 unchanged)"]
    assert query(settings, f"SELECT num_members FROM raw_tars WHERE tar = '{wnids[2]}/'") == [(IMAGES,)]
    # words.txt beside the folders, as beside the tars: the synset manifest only
    (raw / "words.txt").write_text((raw / "words.txt").read_text().replace("\t", "\tchanged, ", 1))
    assert stale_stages(settings, log=QUIET)[:1] == ["synset_manifest"]


def test_files_that_are_not_regular_are_recorded_never_opened(tmp_path):
    raw = tmp_path / "raw"
    write_sample_raw(raw, synsets=2, images=4, seed=0, layout="folders", hostile_names=False)
    wnid = sorted(p.name for p in raw.iterdir() if p.is_dir())[0]
    os.mkfifo(raw / wnid / f"{wnid}_9.JPEG")  # reading it would wait forever
    os.symlink(raw / "nowhere", raw / wnid / f"{wnid}_8.JPEG")
    os.symlink(raw / wnid / f"{wnid}_9.JPEG", raw / wnid / "to_fifo.JPEG")
    target = next(p for p in sorted((raw / wnid).iterdir()) if p.is_file() and not p.is_symlink())
    os.symlink(target, raw / wnid / f"{wnid}_7.JPEG")  # a link to a file is followed
    settings = local_settings(raw, tmp_path, IMNET_NUM_SHARDS=2)
    build_catalog_stages(settings)
    rows = dict(query(settings, f"SELECT member, coalesce(reason, status) FROM images WHERE tar = '{wnid}/'"))
    assert rows[f"{wnid}_9.JPEG"] == f"not a regular file (FIFO) in raw folder {wnid}/"
    assert rows[f"{wnid}_8.JPEG"] == f"not a regular file (broken link) in raw folder {wnid}/"
    assert rows["to_fifo.JPEG"] == f"not a regular file (link to a FIFO) in raw folder {wnid}/"
    os.symlink(raw / wnid, raw / wnid / "loop")
    linked = query(settings, f"SELECT sha256 FROM images WHERE tar = '{wnid}/' AND member = '{wnid}_7.JPEG'")
    assert linked == [(hashlib.sha256(target.read_bytes()).hexdigest(),)]
    assert len(rows) == 4 + 4
    build_raw_tars(settings, "r2", log=QUIET)
    build_filtered_index(settings, "i2", log=QUIET)
    rows = dict(query(settings, f"SELECT member, reason FROM images WHERE tar = '{wnid}/'"))
    assert rows["loop"] == f"not a regular file (link to a folder) in raw folder {wnid}/"


def test_a_root_with_neither_layout_says_what_it_found_and_what_is_accepted(tmp_path):
    raw = tmp_path / "photos"
    raw.mkdir()
    for name in ("a.JPEG", "notes.txt", "n01440764.tar.gz"):
        (raw / name).write_bytes(b"x")
    (raw / "train").mkdir()
    (raw / "n0144076").mkdir()  # one digit short
    settings = local_settings(raw, tmp_path)
    with pytest.raises(RawLayoutError) as caught:
        build_raw_tars(settings, "r", log=QUIET)
    text = str(caught.value)
    assert "found 3 files and 2 folders" in text and "train/" in text and "notes.txt" in text
    assert "none named like n01440764.tar or n01440764/" in text
    assert "per-synset tars" in text and "per-synset folders" in text and "winter21_whole.tar.gz" in text
    assert "sample-raw" not in text and "write" not in text
    assert sorted(os.listdir(raw)) == sorted(["a.JPEG", "notes.txt", "n01440764.tar.gz", "train", "n0144076"])


def test_imnet_build_says_what_a_root_with_neither_layout_holds(tmp_path):
    raw = tmp_path / "photos"
    (raw / "cats").mkdir(parents=True)
    (raw / "cats" / "1.jpg").write_bytes(b"x")
    env = build_env(tmp_path, raw)
    proc = imnet(["build"], env, check=False)
    assert proc.returncode != 0
    assert "found 0 files and 1 folders (cats/), none named like n01440764.tar or n01440764/" in proc.stdout
    assert [p.name for p in raw.iterdir()] == ["cats"]


def test_a_root_with_both_layouts_is_refused(tmp_path):
    write_sample_raw(tmp_path / "raw", synsets=2, images=3, seed=0, hostile_names=False)
    wnid = sorted(p.name for p in (tmp_path / "raw").glob("*.tar"))[0][:-4]
    (tmp_path / "raw" / wnid).mkdir()
    with pytest.raises(RawLayoutError, match=rf"both per-synset tars \(2, e.g. n\d+\.tar\) and per-synset "
                                             rf"folders \(1, e.g. {wnid}/\)"):
        list_raw(str(tmp_path / "raw"), log=QUIET)


def build_shards_in_a_fresh_process(settings) -> None:
    """Every shard run of `settings`, in a process started with this one's environment (the S3
    variables set just now). The encode workers (a pool of one with IMNET_WORKERS=1) are forked
    by their process's forkserver, which took its environment when it started, as in every `imnet`
    or Dagster process; this test process's started long before the variables were set."""
    import pickle
    import subprocess
    import sys

    runs = [(settings.out_root, settings.raw_root, k, settings.shard_name(k), encode_settings(settings))
            for k in settings.partition_keys]
    code = ("import pickle, sys\nfrom imnet_assets.stages.shard import build_shard\n"
            "for out, raw, key, name, enc in pickle.loads(sys.stdin.buffer.read()):\n"
            "    r = build_shard(out_root=out, raw_root=raw, shard_key=key, shard_name=name, settings=enc, "
            "workers=1, run_id=f'run-{key}')\n"
            "    assert not r.problems, r.problems\n")
    subprocess.run([sys.executable, "-c", code], input=pickle.dumps(runs), check=True, timeout=600)


def test_an_s3_prefix_of_folders_reads_each_file_once_whole(tmp_path, monkeypatch):
    """The same folders under an s3:// prefix: listed one prefix per synset, each file read with
    one GET by the index and one by the shard runs; the shards equal the local build's."""
    from imnet_assets.storage import rawfolders
    from tests.core.worker_patch import patched_worker
    from tests.s3server import MotoS3

    monkeypatch.setattr(rawfolders, "REMOTE_BATCH", 4)  # several batches per folder, one fetched ahead

    local = tmp_path / "local"
    write_sample_raw(local, synsets=3, images=6, seed=5, layout="folders", hostile_names=False)
    expected = build_all(local, tmp_path / "built-local")
    with MotoS3() as s3, environ(**s3.env()):
        client = s3.client()
        client.create_bucket(Bucket="raw")
        keys = s3.put_tree(client, local, "raw", "w21")
        files = [k for k in keys if k.count("/") == 2]
        mark = s3.mark()
        settings = local_settings("s3://raw/w21", tmp_path / "built-s3", IMNET_NUM_SHARDS=NUM_SHARDS)
        with patched_worker(rawfolders.__name__, "REMOTE_BATCH", 4):  # the index reads in its worker
            build_catalog_stages(settings)
        indexing = s3.since(mark)
        mark = s3.mark()
        build_shards_in_a_fresh_process(settings)
        shard_runs = s3.since(mark)
        assert stale_stages(settings, log=QUIET) == []
        client.put_object(Bucket="raw", Key=files[0], Body=b"changed")
        assert stale_stages(settings, log=QUIET)[:1] == ["raw_tars"]
    assert shard_digests(settings) == shard_digests(expected)
    # the root listed by folder (with a delimiter), each synset folder by its own prefix: never one
    # listing of the whole release, one page per 1,000 of its 13M files in a row
    lists = {r.query for r in indexing if r.method == "GET" and "list-type" in r.query}
    assert lists == {"list-type=2&prefix=w21%2F&delimiter=%2F&encoding-type=url"} | {
        f"list-type=2&prefix=w21%2F{w}%2F&delimiter=&encoding-type=url" for w in {k.split("/")[1] for k in files}}
    gets = [r for r in indexing if r.method == "GET" and r.key in files]
    # each file fetched once per catalog stage that reads bytes (the index), whole
    assert sorted(r.key for r in gets) == sorted(files)
    kept = query(settings, "SELECT count(*) FROM plan")[0][0]
    reads = [r for r in shard_runs if r.method == "GET" and r.key in files]
    assert len(reads) == kept and len({r.key for r in reads}) == kept
    assert not [r for r in shard_runs if r.method == "GET" and r.key not in files and r.bucket == "raw"]


def test_many_folders_are_listed_by_processes_as_by_threads(tmp_path, monkeypatch):
    from imnet_assets.storage import rawfolders

    wnids = [f"n{i:08d}" for i in range(1, 8)]
    for i, wnid in enumerate(wnids):
        (tmp_path / wnid / "sub").mkdir(parents=True)
        for j in range(i + 1):
            (tmp_path / wnid / f"{wnid}_{j}.JPEG").write_bytes(b"x" * j)
        (tmp_path / wnid / "sub" / "a.JPEG").write_bytes(b"y")
    in_threads = rawfolders.list_synset_folders(str(tmp_path), wnids)
    monkeypatch.setattr(rawfolders, "PROCESS_FOLDERS", 2)
    monkeypatch.setattr(rawfolders, "FOLDERS_PER_TASK", 3)
    assert rawfolders.list_synset_folders(str(tmp_path), wnids) == in_threads
    assert [(e["name"], e["files"], e["size"]) for e in in_threads] == [
        (f"{w}/", i + 2, sum(range(i + 1)) + 1) for i, w in enumerate(wnids)]
    assert [e.path for e in rawfolders.list_files(str(tmp_path / wnids[2]) + "/")] == [
        f"{wnids[2]}_0.JPEG", f"{wnids[2]}_1.JPEG", f"{wnids[2]}_2.JPEG", "sub/a.JPEG"]


def test_a_folder_that_changes_while_it_is_indexed_fails_the_scan_recording_nothing(tmp_path):
    from imnet_assets.stages.index import scan_folder
    from imnet_assets.storage.rawfolders import FolderChanged, list_synset_folders

    write_sample_raw(tmp_path / "raw", synsets=2, images=3, seed=0, layout="folders", hostile_names=False)
    wnid = sorted(p.name for p in (tmp_path / "raw").iterdir() if p.is_dir())[0]
    listed = list_synset_folders(str(tmp_path / "raw"), [wnid])[0]
    assert len(scan_folder(listed["url"], size=listed["size"])) == 3
    victim = sorted((tmp_path / "raw" / wnid).iterdir())[0]
    victim.write_bytes(victim.read_bytes() + b"more")
    with pytest.raises(FolderChanged, match=rf"raw folder {wnid}/ holds \d+ bytes of files now, \d+ when it was listed"):
        scan_folder(listed["url"], size=listed["size"])
