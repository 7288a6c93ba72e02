"""Raw tars read in one pass: exact data offsets, and every kind of damage reported, never raised
or dropped (truncated data, truncated or damaged headers, missing end blocks, links, non-tars)."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile

import pytest
from PIL import Image

from imnet_assets.storage.member_names import member_key, printable_name
from imnet_assets.storage.rawtar import Damage, Member, iter_tar


def jpeg(seed: int, size=(64, 48)) -> bytes:
    img = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, 128))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def make_tar(members, fmt=tarfile.USTAR_FORMAT) -> bytes:
    """members: (name, bytes) for regular files, or a ready TarInfo (links, folders, fifos)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
                continue
            name, data = m
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1318550400
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def layout(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmembers()


def scan(tmp_path, data: bytes, name: str = "n00000001.tar") -> list[Member | Damage]:
    path = tmp_path / name
    path.write_bytes(data)
    return list(iter_tar(str(path)))


FILES = [(f"n00000001_{i}.JPEG", jpeg(i)) for i in range(1, 5)]


def test_clean_tar_gives_every_member_with_its_exact_offset(tmp_path):
    data = make_tar(FILES)
    items = scan(tmp_path, data)
    assert all(isinstance(i, Member) for i in items)
    assert [(i.name, i.data) for i in items] == FILES
    for item in items:
        assert data[item.offset : item.offset + item.size] == item.data


def test_long_names_and_pax_headers_keep_offsets_exact(tmp_path):
    long = "sub/" + "x" * 150 + "/n00000001_9.JPEG"
    files = [*FILES[:2], (long, jpeg(9)), ("n00000001_ü.JPEG", jpeg(10))]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        data = make_tar(files, fmt)
        items = scan(tmp_path, data)
        assert [(i.name, i.data) for i in items] == files
        assert all(data[i.offset : i.offset + i.size] == i.data for i in items)


def test_cut_mid_member_keeps_the_readable_members_and_reports_the_cut_one(tmp_path):
    data = make_tar(FILES)
    third = layout(data)[2]
    cut = data[: third.offset_data + third.size // 2]
    items = scan(tmp_path, cut)
    assert [i.name for i in items if isinstance(i, Member)] == [n for n, _ in FILES[:2]]
    damage = items[-1]
    assert isinstance(damage, Damage) and len(items) == 3
    assert damage.name == FILES[2][0] and damage.offset == third.offset_data
    assert "truncated raw tar n00000001.tar" in damage.reason


def test_cut_mid_header_keeps_the_readable_members_and_reports_the_tail(tmp_path):
    data = make_tar(FILES)
    third = layout(data)[2]
    cut = data[: third.offset + 200]
    items = scan(tmp_path, cut)
    assert [i.name for i in items if isinstance(i, Member)] == [n for n, _ in FILES[:2]]
    damage = items[-1]
    assert isinstance(damage, Damage) and len(items) == 3
    assert damage.name == "" and damage.offset == third.offset and damage.size == 200
    assert "n00000001.tar" in damage.reason and "truncated" in damage.reason


def test_cut_at_a_member_boundary_is_reported_not_silent(tmp_path):
    data = make_tar(FILES)
    third = layout(data)[2]
    items = scan(tmp_path, data[: third.offset])
    assert [i.name for i in items if isinstance(i, Member)] == [n for n, _ in FILES[:2]]
    assert isinstance(items[-1], Damage) and "end-of-archive" in items[-1].reason
    assert "n00000001.tar" in items[-1].reason


def test_cut_in_the_padding_after_the_last_data(tmp_path):
    data = make_tar(FILES)
    last = layout(data)[-1]
    end = last.offset_data + last.size
    assert end % 512, "the test needs padding after the last member's data"
    items = scan(tmp_path, data[: end + 1])
    members = [i for i in items if isinstance(i, Member)]
    assert [m.name for m in members] == [n for n, _ in FILES]  # every byte of every member is there
    assert isinstance(items[-1], Damage) and "n00000001.tar" in items[-1].reason


def test_damaged_header_in_the_middle_loses_only_that_member(tmp_path):
    data = bytearray(make_tar(FILES))
    second = layout(bytes(data))[1]
    data[second.offset + 10] ^= 0xFF  # a name byte: the header checksum no longer matches
    items = scan(tmp_path, bytes(data))
    names = [i.name for i in items if isinstance(i, Member)]
    assert names == [FILES[0][0], FILES[2][0], FILES[3][0]]
    damage = [i for i in items if isinstance(i, Damage)]
    assert len(damage) == 1 and damage[0].offset == second.offset
    assert damage[0].size == second.offset_data - second.offset + (second.size + 511) // 512 * 512
    assert "n00000001.tar" in damage[0].reason


def test_trailing_garbage_after_the_end_blocks_is_reported(tmp_path):
    data = make_tar(FILES) + b"garbage" * 100
    items = scan(tmp_path, data)
    assert len([i for i in items if isinstance(i, Member)]) == len(FILES)
    assert isinstance(items[-1], Damage) and "n00000001.tar" in items[-1].reason


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, b"this is not a tar" * 100, jpeg(1)])
def test_not_a_tar_is_one_damage_record(tmp_path, content):
    items = scan(tmp_path, content)
    assert len(items) == 1 and isinstance(items[0], Damage)
    assert "n00000001.tar" in items[0].reason


def special_infos() -> list[tarfile.TarInfo]:
    """A symlink, a hard link, a FIFO (all named like images) and a folder."""
    sym = tarfile.TarInfo("n00000001_7.JPEG")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("n00000001_8.JPEG")
    hard.type, hard.linkname = tarfile.LNKTYPE, FILES[0][0]
    fifo = tarfile.TarInfo("n00000001_9.JPEG")
    fifo.type = tarfile.FIFOTYPE
    folder = tarfile.TarInfo("sub")
    folder.type = tarfile.DIRTYPE
    return [sym, hard, fifo, folder]


def test_links_and_special_files_are_reported_and_folders_skipped(tmp_path):
    data = make_tar([FILES[0], *special_infos(), FILES[1]])
    items = scan(tmp_path, data)
    assert [i.name for i in items if isinstance(i, Member)] == [FILES[0][0], FILES[1][0]]
    reasons = {i.name: i.reason for i in items if isinstance(i, Damage)}
    assert set(reasons) == {"n00000001_7.JPEG", "n00000001_8.JPEG", "n00000001_9.JPEG"}
    assert "symlink" in reasons["n00000001_7.JPEG"]
    assert "hard link" in reasons["n00000001_8.JPEG"]
    assert "special file" in reasons["n00000001_9.JPEG"]
    assert all("n00000001.tar" in r for r in reasons.values())


def test_member_data_hash_matches_the_bytes_at_the_offset(tmp_path):
    data = make_tar([("sub/n00000001_1.JPEG", jpeg(1)), ("../evil.JPEG", jpeg(2)), ("/etc/evil.JPEG", jpeg(3))])
    for item in scan(tmp_path, data):
        assert isinstance(item, Member)
        assert hashlib.sha256(data[item.offset : item.offset + item.size]).digest() == hashlib.sha256(item.data).digest()


@pytest.mark.parametrize(
    "name, key",
    [
        ("n01440764_10026.JPEG", "n01440764_10026"),
        ("sub/n01440764_1.JPEG", "n01440764_1"),
        ("a/b/c/n01440764_2.jpeg", "n01440764_2"),
        ("./n01440764_3.JPEG", "n01440764_3"),
        ("n01440764_4", "n01440764_4"),
    ],
)
def test_member_key_of_safe_names(name, key):
    assert member_key(name) == (key, None)


@pytest.mark.parametrize(
    "name, prefix",
    [
        ("n01440764 5.tar.JPEG", "n01440764_5_tar_h"),  # a space, a dot inside the stem
        ("n0144\u00e9_6.JPEG", "n0144__6_h"),  # not ASCII
        ("n0144_caf\udce9\udcff.JPEG", "n0144_caf___h"),  # not UTF-8 (tar readers' surrogate escapes)
        ("n0144_7\nsecond.JPEG", "n0144_7_second_h"),  # a newline
        ("n0144_" + "x" * 200 + ".JPEG", "n0144_xxx"),  # longer than a ustar name field
    ],
)
def test_member_key_sanitizes_hostile_names_into_distinct_short_keys(name, prefix):
    key, reason = member_key(name)
    assert reason is None and key.startswith(prefix)
    assert re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", key)  # no dot: webdataset splits <key>.<ext> right
    assert len(f"{key}.webp".encode()) <= 100  # a plain ustar name field holds every member name
    # sanitized alike, named differently: two keys
    assert member_key(name.replace(".JPEG", "!.JPEG"))[0] != key


def test_printable_name_escapes_what_is_not_printable_utf8():
    assert printable_name("n01_caf\udce9.JPEG") == "n01_caf\\xe9.JPEG"
    assert printable_name("a\nb\tc.JPEG") == "a\\x0ab\\x09c.JPEG"
    assert printable_name("n01440764_1.JPEG") == "n01440764_1.JPEG"
    printable_name("x\udcff\n").encode("utf-8")  # always valid UTF-8


@pytest.mark.parametrize(
    "name, why",
    [
        ("../evil.JPEG", ".."),
        ("sub/../../evil.JPEG", ".."),
        ("/etc/evil.JPEG", "absolute"),
        ("C:\\evil.JPEG", "POSIX"),
        ("", "absolute"),
        (".JPEG", "gives no key"),
        ("sub/...JPEG", "gives no key"),
    ],
)
def test_member_key_refuses_unsafe_names_with_a_reason(name, why):
    key, reason = member_key(name)
    assert key is None and why in reason


class FailingReads(io.BytesIO):
    """A tar's bytes whose reads fail once they reach byte `at`, as a disk's I/O error or remote
    storage past its retries would (`error`), except the first read (the fast walk's first chunk,
    which hands a pax-headed tar to tarfile): the fault is injected at the file the walk reads."""

    def __init__(self, data: bytes, at: int, error: OSError):
        super().__init__(data)
        self.at, self.error, self.reads = at, error, 0

    def _check(self, n: int) -> None:
        self.reads += 1
        if self.reads > 1 and self.tell() < len(self.getbuffer()) and self.tell() + max(n, 1) > self.at:
            raise self.error

    def read(self, n=-1):
        self._check(len(self.getbuffer()) - self.tell() if n is None or n < 0 else n)
        return super().read(n)

    def readinto(self, b):
        self._check(len(b))
        return super().readinto(b)


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"),
                                   __import__("imnet_assets.storage.fs", fromlist=["StorageError"]).StorageError(
                                       "cannot read s3://raw/n00000001.tar: ConnectionResetError (retries outlasted)")])
def test_a_read_that_fails_inside_tarfiles_walk_is_an_error_never_damage(error):
    """A pax header hands the walk to tarfile at the first member; a read failing after two members
    used to come out as "truncated or damaged raw tar ...: broken header" (the rest of the tar
    excluded for good). It is the read's fault: the walk raises, naming the tar, and yields no damage."""
    from imnet_assets.storage.rawtar import _iter_fileobj

    files = [("sub/" + "x" * 150 + "/n00000001_1.JPEG", jpeg(1)), *FILES[1:]]
    data = make_tar(files, tarfile.PAX_FORMAT)
    cut = layout(data)[2].offset  # the third member's header: after two whole members
    got: list = []
    with pytest.raises(OSError) as raised:
        for item in _iter_fileobj(FailingReads(data, cut, error), len(data), "n00000001.tar"):
            got.append(item)
    assert not any(isinstance(i, Damage) for i in got), got
    assert [i.name for i in got] == [n for n, _ in files[:2]]
    assert "n00000001.tar" in str(raised.value) and "never recorded as damage" in str(raised.value)
    assert type(raised.value) is type(error)
    # the same bytes read whole: every member, no damage (the fault was the read's, not the tar's)
    assert [i.name for i in _iter_fileobj(io.BytesIO(data), len(data), "n00000001.tar")] == [n for n, _ in files]
