"""The index's memory is bounded whatever a raw member's size (stages/index.py): a synset tar holding a
member of more bytes than any image the project decodes (perceptual.MAX_DECODED_BYTES: a video or an
archive packed into it), or a synset folder holding such a file, is never held whole by a scan worker
nor by the stage's process. Its sha256 is streamed as it is read; it is excluded, "too large: N bytes
...", its bytes counted, so conservation holds; every other row is the one a scan without it gives.
Real sparse files (no disk, every byte read), real tars, real pool workers in a real process whose
peak RSS (VmHWM of it and every process under it) is read from /proc while it runs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tracemalloc

from imnet_assets.image.perceptual import MAX_DECODED_BYTES, too_many_bytes
from imnet_assets.sample.sample_raw import write_sample_raw
from imnet_assets.stages.index import scan_tar
from imnet_assets.storage.rawtar import ByteCount, Damage, Member, iter_tar
from tests.core.test_eval_sizes import finished_with_peaks, zeros_sha256

BIG = 600 << 20  # over MAX_DECODED_BYTES, sparse: no disk, but every byte is read
PEAK_LIMIT = 300 << 20  # bytes any one process may peak at (a worker at rest: ~100 MB)

# The raw, synset and index stages for the settings in argv[1] (IMNET_* variables, JSON), with two pool
# workers; prints the images rows and the conservation problems of the catalog.
INDEX = """
import json, sys
from imnet_assets.settings import Settings
from imnet_assets.stages.audit import conservation_problems
from imnet_assets.stages.filtered_index import build_filtered_index
from imnet_assets.stages.raw_tars import build_raw_tars
from imnet_assets.stages.synset_manifest import build_synset_manifest
from imnet_assets.storage.catalog import Catalog
settings = Settings.from_env(json.loads(sys.argv[1]))
for stage in (build_raw_tars, build_synset_manifest, build_filtered_index):
    stage(settings, "run", log=lambda m: None)
with Catalog(settings.catalog) as cat:
    rows = cat.con.execute("SELECT key, tar, member, \\"offset\\", size, sha256, width, height, format, mode, status, "
                           "reason FROM images ORDER BY tar, \\"offset\\"").fetchall()
    print(json.dumps({"rows": rows, "conservation": conservation_problems(cat)}))
"""


def indexed_with_peaks(raw: str, folder, env: dict | None = None) -> tuple[dict, dict[int, int]]:
    """The catalog's images rows and conservation problems once `raw` is indexed in a real process,
    and the peak RSS (bytes) of it and of each process under it (pool workers, the forkserver)."""
    settings = {"IMNET_RAW_ROOT": raw, "IMNET_OUT_ROOT": str(folder / "out"),
                "IMNET_CATALOG": str(folder / "catalog.duckdb"), "IMNET_WORKERS": "2"}
    proc = subprocess.Popen([sys.executable, "-c", INDEX, json.dumps(settings)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/tmp", env={**os.environ, **(env or {})})
    return finished_with_peaks(proc)


def with_sparse_member(path, name: str, size: int, at: int) -> int:
    """Rewrite the tar at `path` with a member `name` of `size` zero bytes (a hole: no disk) put after
    its `at` first members. Returns the offset of the new member's data."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    big = tarfile.TarInfo(name)
    big.size = size
    with open(path, "wb") as f:
        for i, (info, data) in enumerate(members):
            if i == at:
                f.write(big.tobuf(tarfile.USTAR_FORMAT))
                offset = f.tell()
                f.seek(size + -size % 512, os.SEEK_CUR)
            f.write(info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512))
        f.write(bytes(1024))
    return offset


def rows_of(rows: list, source: str) -> list:
    """`images` rows of one source as comparable tuples: without `offset` (a tar's move past the big member)."""
    return sorted(tuple(r[:3] + r[4:]) for r in rows if r[1] == source)


def scanned(url: str) -> list:
    return sorted((r.key, r.tar, r.member, r.size, r.sha256, r.width, r.height, r.format, r.mode, r.status, r.reason)
                  for r in scan_tar(url))


def check_too_large(rows: dict, peaks: dict, source: str, name: str, before: list) -> None:
    assert len(peaks) >= 3, peaks  # the process, the forkserver, the workers
    assert max(peaks.values()) < PEAK_LIMIT, {pid: peak >> 20 for pid, peak in peaks.items()}
    assert rows["conservation"] == []  # every byte counted (raw_tars.size), one row per member
    mine = rows_of(rows["rows"], source)
    big = [r for r in mine if r[2] == name]
    assert big == [(name[:-5], source, name, BIG, zeros_sha256(BIG), None, None, None, None, "excluded",
                    too_many_bytes(BIG))]
    assert too_many_bytes(BIG).startswith("too large: 629,145,600 bytes, over the 512,000,000 ")
    assert [tuple(r) for r in mine if r[2] != name] == [tuple(r) for r in before]  # the others: as without it
    assert sum(r[-2] == "kept" for r in before) > 5


def test_a_raw_tar_member_too_large_to_be_an_image_is_hashed_streaming_and_excluded(tmp_path):
    assert BIG > MAX_DECODED_BYTES
    raw = tmp_path / "raw"
    summary = write_sample_raw(raw, synsets=2, images=12, seed=3)
    tar = raw / f"{summary.wnids[0]}.tar"
    before = scanned(str(tar))
    name = f"{summary.wnids[0]}_999999.JPEG"
    with_sparse_member(tar, name, BIG, at=5)
    assert os.stat(tar).st_blocks * 512 < 16 << 20  # sparse
    rows, peaks = indexed_with_peaks(str(raw), tmp_path)
    check_too_large(rows, peaks, tar.name, name, before)


def test_a_synset_folder_file_too_large_to_be_an_image_is_hashed_streaming_and_excluded(tmp_path):
    raw = tmp_path / "raw"
    summary = write_sample_raw(raw, synsets=2, images=12, seed=3, layout="folders")
    folder = raw / summary.wnids[0]
    before = scanned(str(folder) + "/")
    name = f"{summary.wnids[0]}_999999.JPEG"
    with open(folder / name, "wb") as f:
        f.truncate(BIG)
    rows, peaks = indexed_with_peaks(str(raw), tmp_path)
    check_too_large(rows, peaks, f"{folder.name}/", name, before)


def test_the_tarfile_walk_hashes_a_member_over_max_data_in_pieces_and_counts_it(tmp_path):
    """A pax tar (tarfile's walk, not the fast one) with a sparse member over max_data: hashed, not held."""
    path = tmp_path / "n00000001.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("n00000001_1.JPEG")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # a pax member of BIG zeros before the end of the archive
        f.seek(size - 1024)
        info = tarfile.TarInfo("n00000001_2.JPEG")
        info.size = BIG
        info.pax_headers = {"comment": "pax"}
        f.write(info.tobuf(tarfile.PAX_FORMAT))
        f.seek(BIG, os.SEEK_CUR)
        f.write(bytes(1024))
    counted = ByteCount()
    tracemalloc.start()
    items = list(iter_tar(str(path), views=True, counted=counted, max_data=MAX_DECODED_BYTES, hash_over=True))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20, peak
    assert [(type(m), m.name, m.size, m.sha256) for m in items] == [
        (Member, "n00000001_1.JPEG", 3, None), (Member, "n00000001_2.JPEG", BIG, zeros_sha256(BIG))]
    assert items[1].data is None
    assert (counted.structure, counted.damaged) == (os.path.getsize(path), 0)


def test_a_damaged_size_field_counts_the_rest_of_the_tar_as_damage_without_holding_it(tmp_path):
    """A header whose size claims more than the tar holds: the damage runs to its end, counted in pieces."""
    path = tmp_path / "n00000001.tar"
    info = tarfile.TarInfo("n00000001_1.JPEG")
    info.size = 4 * BIG  # more than there is
    with open(path, "wb") as f:
        f.write(info.tobuf(tarfile.USTAR_FORMAT))
        f.truncate(512 + BIG)
    counted = ByteCount()
    tracemalloc.start()
    items = list(iter_tar(str(path), counted=counted))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20, peak
    assert len(items) == 1 and isinstance(items[0], Damage) and items[0].reason.startswith("truncated raw tar")
    assert (counted.structure, counted.damaged) == (512, BIG)



def test_on_s3_a_member_and_a_file_over_the_limit_are_read_in_ranged_pieces_never_whole(tmp_path, monkeypatch):
    """The remote read paths: a large tar's prefetched ranged reads (prefetch.PrefetchedFile, under the
    walk's pieces), and a folder's file streamed in exact ranged pieces instead of its one whole-object
    GET (fs.read_many). moto answers a ranged GET by copying the whole object, so the objects here are
    40 MiB and the limit 8 MiB (the index's scan in this process, as a pool worker runs it): the same
    rows, and no GET of the big objects asks for more than one piece of them."""
    from imnet_assets.image import perceptual
    from imnet_assets.stages import index
    from imnet_assets.storage import fs
    from imnet_assets.storage.pieces import PIECE
    from tests.s3server import MotoS3

    size, limit = 40 << 20, 8 << 20
    monkeypatch.setattr(perceptual, "MAX_DECODED_BYTES", limit)
    monkeypatch.setattr(index, "MAX_DECODED_BYTES", limit)
    raw = tmp_path / "raw"
    summary = write_sample_raw(raw, synsets=1, images=12, seed=3)
    wnid = summary.wnids[0]
    name = f"{wnid}_999999.JPEG"
    (raw / wnid).mkdir()
    with tarfile.open(raw / f"{wnid}.tar") as tf:
        for m in tf.getmembers():
            (raw / wnid / m.name).write_bytes(tf.extractfile(m).read())
    with open(raw / wnid / name, "wb") as f:
        f.truncate(size)
    with_sparse_member(raw / f"{wnid}.tar", name, size, at=5)
    big = (name[:-5], None, name, size, zeros_sha256(size), None, None, None, None, "excluded", too_many_bytes(size))
    with MotoS3() as s3, monkeypatch.context() as env:
        for k, v in s3.env().items():
            env.setenv(k, v)
        client = s3.client()
        client.create_bucket(Bucket="raw")
        s3.put_tree(client, raw, "raw", "r")
        for source in (f"{wnid}.tar", f"{wnid}/"):
            url = f"s3://raw/r/{source}"
            local = scanned(f"{raw}/{source}")
            mark = s3.mark()
            listed = fs.size(url) if source.endswith(".tar") else None
            records = scan_tar(url, depth=4, size=listed)
            if listed is not None:
                index.check_accounted(source, records, listed)
            rows = sorted((r.key, r.tar, r.member, r.size, r.sha256, r.width, r.height, r.format, r.mode, r.status,
                           r.reason) for r in records)
            assert [r for r in rows if r[2] == name] == [(*big[:1], source, *big[2:])]
            assert [r for r in rows if r[2] != name] == [r for r in local if r[2] != name]
            key = f"r/{source}" + ("" if source.endswith(".tar") else name)
            reads = [r for r in s3.since(mark) if r.method == "GET" and r.key == key]
            spans = [int(b) - int(a) + 1 if r.range else size
                     for r in reads for a, _, b in [(r.range or "-").removeprefix("bytes=").partition("-")]]
            assert reads and max(spans) <= PIECE + 1, (source, max(spans))


def test_a_folder_file_that_grew_past_the_limit_after_the_listing_is_not_read_whole(tmp_path):
    """A synset folder's file listed small that is a 600 MiB file when it is read (a video being copied
    in while the index runs): read_files reads it only to one byte past its listed size, so the scan
    sees that it changed (FolderChanged) without having held it."""
    from imnet_assets.storage.rawfolders import list_files, read_files

    folder = tmp_path / "n00000001"
    folder.mkdir()
    (folder / "a.JPEG").write_bytes(b"\xff\xd8small")
    (folder / "b.JPEG").write_bytes(b"\xff\xd8growing")
    entries = list_files(str(folder) + "/")
    with open(folder / "b.JPEG", "r+b") as f:
        f.truncate(BIG)  # sparse: no disk
    tracemalloc.start()
    try:
        got = [(e.path, len(d)) for e, d in read_files(str(folder) + "/", entries, None, max_bytes=MAX_DECODED_BYTES)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == [("a.JPEG", 7), ("b.JPEG", len(b"\xff\xd8growing") + 1)]  # one byte past its listing: changed
    assert peak < 16 << 20, peak


def _header_over_the_limit(path, kind: bytes, claimed: int, held: bytes, rest: int) -> None:
    """A tar: a member, a GNU long name or pax header claiming `claimed` bytes of data whose first are
    `held` (`rest` bytes after its header block, sparse), then a member and the archive's end."""
    first, last = tarfile.TarInfo("n00000001_1.JPEG"), tarfile.TarInfo("n00000001_2.JPEG")
    first.size = last.size = 3
    header = tarfile.TarInfo("././@LongLink")
    header.type, header.size = kind, claimed
    with open(path, "wb") as f:
        f.write(first.tobuf(tarfile.USTAR_FORMAT) + b"abc" + bytes(509) + header.tobuf(tarfile.USTAR_FORMAT) + held)
        f.seek(1024 + rest)
        f.write(last.tobuf(tarfile.USTAR_FORMAT) + b"xyz" + bytes(509) + bytes(1024))


def test_a_long_name_or_pax_header_of_hundreds_of_megabytes_is_damage_never_held(tmp_path):
    """A GNU long name or a pax header is at most a few KB as any tar writer makes it: one whose size
    field claims more (damaged; a hostile tar) is a damaged header, stepped over, its bytes counted as
    they are read; never its claimed size read or allocated at once (tarfile's read of a long name's or
    pax header's data allocates what the size field says: 2.4 GB for a damaged one over a 48 MB tar)."""
    big = 48 << 20  # far over any header, small enough that tarfile steps over it block by block quickly
    cases = {"long-name": (tarfile.GNUTYPE_LONGNAME, big, b"a" * 100, big),
             "pax": (tarfile.XHDTYPE, big, b"20 comment=abcdefgh\n", big),
             "damaged-size": (tarfile.GNUTYPE_LONGNAME, 4 * BIG, b"", big)}
    for case, (kind, claimed, held, rest) in cases.items():
        path = tmp_path / f"{case}.tar"
        _header_over_the_limit(path, kind, claimed, held, rest + -rest % 512)
        for mapped in (False, True) if case == "long-name" else (False,):  # a map: the fast walk's only
            counted = ByteCount()
            tracemalloc.start()
            try:
                items = list(iter_tar(str(path), views=True, mapped=mapped, counted=counted,
                                      max_data=MAX_DECODED_BYTES, hash_over=True))
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 40 << 20, (case, mapped, peak)  # the walk's 16 MiB chunk
            assert counted.total == os.path.getsize(path), (case, counted)
            members = [m.name for m in items if isinstance(m, Member)]
            assert members[0] == "n00000001_1.JPEG" and isinstance(items[1], Damage), (case, items)
            if case != "damaged-size":  # the member after the stepped-over header is still found
                assert members == ["n00000001_1.JPEG", "n00000001_2.JPEG"], (case, items)


def test_a_long_name_or_pax_header_over_the_limit_in_a_compressed_tar_is_damage_never_held(tmp_path):
    """The same rule in a compressed (eval) tar's stream walk (compressed_tar, rawtar.MAX_HEADER_DATA):
    a long name or pax header claiming more is a damaged header, stepped over and recorded, the member
    after it still found; never gathered whole (tarfile's stream reads all a header's size field says)."""
    import gzip

    from imnet_assets.storage.compressed_tar import iter_compressed_tar

    big = 48 << 20
    for case, kind, held in (("long-name", tarfile.GNUTYPE_LONGNAME, b"a" * 100),
                             ("pax", tarfile.XHDTYPE, b"20 comment=abcdefgh\n")):
        plain, packed = tmp_path / f"{case}.tar", tmp_path / f"{case}.tar.gz"
        _header_over_the_limit(plain, kind, big, held, big)
        packed.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=1))
        tracemalloc.start()
        try:
            items = list(iter_compressed_tar(str(packed), "gzip", max_data=MAX_DECODED_BYTES))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert [m.name for m in items if isinstance(m, Member)] == ["n00000001_1.JPEG", "n00000001_2.JPEG"], items
        damage = [d for d in items if isinstance(d, Damage)]
        assert len(damage) == 1 and damage[0].offset == 1024, damage  # the header, stepped over
        assert peak < 40 << 20, (case, peak)  # the stream's kept bytes (2 x 4 MiB), reads ahead: not the 48 MiB
