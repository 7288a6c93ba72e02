"""The fast tar walk (large chunks, headers parsed by hand) against tarfile itself: for clean,
GNU, pax, cut and damaged tars, `iter_tar` yields exactly what the tarfile-only walk yields
(same members, offsets and bytes, same damage with the same reasons)."""

from __future__ import annotations

import io
import tarfile

import pytest

from imnet_assets.storage import rawtar, tar_window
from imnet_assets.storage.rawtar import Damage, Member, _iter_fileobj, _tarfile_walk
from tests.core.test_rawtar import jpeg, layout, make_tar, special_infos

FILES = [(f"n00000001_{i}.JPEG", jpeg(i)) for i in range(1, 5)]


def as_rows(items) -> list[tuple]:
    return [(type(i).__name__, i.name, i.offset, i.size, bytes(i.data) if isinstance(i, Member) else i.reason)
            for i in items]


@pytest.fixture(params=["memory", "file", "mapped file"])
def walks(request, tmp_path):
    """(fast walk, tarfile walk) over the same bytes: from memory (the chunked reads fsspec files
    get), from a local file read in chunks, or from a memory-mapped local file (pool workers)."""
    count = iter(range(1 << 30))

    def walk(data: bytes, views: bool = False) -> tuple[list[tuple], list[tuple]]:
        if request.param == "memory":
            def source():
                return io.BytesIO(data)
        else:
            path = tmp_path / f"{next(count)}.tar"
            path.write_bytes(data)

            def source():
                return open(path, "rb")
        with source() as f:
            fast = as_rows(_iter_fileobj(f, len(data), "n00000001.tar", "raw tar", views,
                                         mapped=request.param == "mapped file"))
        with source() as f:
            slow = as_rows(_tarfile_walk(f, len(data), "n00000001.tar", "raw tar"))
        return fast, slow

    return walk


def special_members() -> list:
    sym, hard, fifo, folder = special_infos()
    return [FILES[0], sym, FILES[1], hard, fifo, folder, FILES[2]]


LONG = "sub/" + "x" * 150 + "/n00000001_9.JPEG"
TARS = {
    "ustar": make_tar(FILES),
    "gnu long names": make_tar([FILES[0], (LONG, jpeg(9)), ("n00000001_ü.JPEG", jpeg(10)), FILES[1]],
                               tarfile.GNU_FORMAT),
    "ustar prefix": make_tar([FILES[0], ("p" * 60 + "/" + "q" * 60 + "/n00000001_5.JPEG", jpeg(5))]),
    "pax": make_tar([*FILES[:2], (LONG, jpeg(9)), ("n00000001_ü.JPEG", jpeg(10)), FILES[2]], tarfile.PAX_FORMAT),
    "links and folders": make_tar(special_members()),
    "empty member and exact blocks": make_tar([("n00000001_0.JPEG", b""), ("n00000001_1.JPEG", b"x" * 1024),
                                               *FILES[:2]]),
}


@pytest.mark.parametrize("name", sorted(TARS))
@pytest.mark.parametrize("views", [False, True])
def test_whole_tars_read_alike(walks, name, views):
    fast, slow = walks(TARS[name], views)
    assert fast == slow
    assert any(r[0] == "Member" for r in fast)


@pytest.mark.parametrize("name", sorted(TARS))
def test_every_cut_reads_alike(walks, name):
    data = TARS[name]
    cuts = sorted({*range(0, len(data), 97), *(i.offset + d for i in layout(data) for d in (0, 1, 200, 511, 512)),
                   *(i.offset_data + i.size + d for i in layout(data) for d in (-1, 0, 1))})
    for cut in cuts:
        fast, slow = walks(data[:cut])
        assert fast == slow, cut


@pytest.mark.parametrize("name", sorted(TARS))
def test_damaged_header_bytes_read_alike(walks, name):
    data = TARS[name]
    for info in layout(data):
        for at in (0, 10, 99, 100, 124, 130, 148, 150, 156, 257, 345, 400, 511):
            for value in (0x00, 0x20, 0x37, 0x80, 0xFF):
                bad = bytearray(data)
                bad[info.offset + at] = value
                fast, slow = walks(bytes(bad))
                assert fast == slow, (info.name, at, value)


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, b"\x00" * 1024, b"\x00" * 1100, b"not a tar" * 100,
                                     jpeg(1), make_tar(FILES) + b"garbage" * 100, b"\x00" * 2048 + make_tar(FILES)])
def test_odd_files_read_alike(walks, content):
    fast, slow = walks(content)
    assert fast == slow


def test_small_chunks_and_members_larger_than_a_chunk(walks, monkeypatch):
    monkeypatch.setattr(tar_window, "CHUNK", 1000)
    big = [("n00000001_1.JPEG", bytes(range(256)) * 40), *FILES, ("n00000001_9.JPEG", b"y" * 3000)]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT):
        data = make_tar(big, fmt)
        for views in (False, True):
            fast, slow = walks(data, views)
            assert fast == slow
            assert [r[1] for r in fast] == [n for n, _ in big]


def test_views_stay_valid_while_held(monkeypatch):
    # A held view is never overwritten by a later chunk (its buffer is not reused).
    monkeypatch.setattr(tar_window, "CHUNK", 2048)
    data = make_tar([(f"n00000001_{i}.JPEG", jpeg(i)) for i in range(1, 12)])
    held = [(i.data, bytes(i.data)) for i in _iter_fileobj(io.BytesIO(data), len(data), "t", "raw tar", True)
            if isinstance(i, Member)]
    assert len(held) == 11
    assert all(isinstance(view, memoryview) and view.readonly and bytes(view) == copy for view, copy in held)


def test_member_views_point_at_the_tar_bytes(tmp_path):
    data = make_tar(FILES)
    (tmp_path / "n00000001.tar").write_bytes(data)
    items = list(rawtar.iter_tar(str(tmp_path / "n00000001.tar"), views=True))
    assert all(isinstance(i, Member) for i in items) and not any(isinstance(i, Damage) for i in items)
    assert [bytes(i.data) for i in items] == [data[i.offset : i.offset + i.size] for i in items]


def fast_only(data: bytes):
    """What the fast walk returns: None when it read the whole tar itself, else where tarfile resumes."""
    gen = rawtar._fast_walk(io.BytesIO(data), len(data), "t", "raw tar", False)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def test_plain_tars_never_need_tarfile():
    for name in ("ustar", "gnu long names", "ustar prefix", "empty member and exact blocks"):
        assert fast_only(TARS[name]) is None, name
    data = TARS["ustar"]
    third = layout(data)[2]
    for cut in (third.offset, third.offset + 200, third.offset_data + 100, third.offset_data + third.size + 1):
        assert fast_only(data[:cut]) is None, cut


def test_tarfile_resumes_at_the_first_header_it_must_read():
    links = layout(TARS["links and folders"])
    assert fast_only(TARS["links and folders"]) == (links[1].offset, links[1].offset)
    pax = layout(TARS["pax"])  # pax headers only where needed: before the long name
    assert fast_only(TARS["pax"]) == (pax[2].offset, pax[2].offset)
    assert fast_only(b"") == (0, 0)


def test_header_byte_sum_is_exact():
    import random

    rng = random.Random(5)
    blocks = [bytes(512), b"\xff" * 512, b"\xff" * 256 + bytes(256), bytes(256) + b"\xff" * 256]
    blocks += [bytes(rng.randrange(256) for _ in range(512)) for _ in range(200)]
    blocks += [bytes(rng.choice((0, 255)) for _ in range(512)) for _ in range(200)]
    for block in blocks:
        assert rawtar._byte_sum(block) == sum(block)
