"""Conservation by a count the walk does not make itself: every byte of a raw tar that its walk
reads is accounted for once, as structure (headers, pax and GNU long-name headers, data,
padding, end of archive) or as damage; read whole, the count is the tar's size on storage. A tar
cut short on disk (real damage) still adds up, its damage row covering the exact remaining range;
a read that stops short of the listed size does not add up, and the index records nothing for it."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from imnet_assets.sample.sample_raw import write_sample_raw
from imnet_assets.stages.index import ReadShort, check_accounted, scan_tar
from imnet_assets.storage.rawtar import ByteCount, Damage, _iter_fileobj, iter_tar
from tests.core.test_rawtar import FILES, jpeg, layout, make_tar


def counted_walk(path) -> tuple[ByteCount, list]:
    counted = ByteCount()
    items = list(iter_tar(str(path), counted=counted))
    return counted, items


def tars_of_every_kind() -> dict[str, bytes]:
    long = "sub/" + "x" * 150 + "/n00000001_9.JPEG"
    files = [*FILES[:2], (long, jpeg(9)), ("n00000001_ü.JPEG", jpeg(10)), *FILES[2:]]
    link = tarfile.TarInfo("n00000001_90.JPEG")
    link.type, link.linkname = tarfile.SYMTYPE, "n00000001_1.JPEG"
    folder = tarfile.TarInfo("sub")
    folder.type = tarfile.DIRTYPE
    return {
        "ustar": make_tar(FILES),
        "gnu long names": make_tar(files, tarfile.GNU_FORMAT),
        "pax headers": make_tar(files, tarfile.PAX_FORMAT),
        "links and folders": make_tar([folder, *FILES[:2], link, *FILES[2:]], tarfile.PAX_FORMAT),
    }


@pytest.mark.parametrize("kind", list(tars_of_every_kind()))
def test_a_whole_tar_adds_up_to_its_size_with_no_damage(tmp_path, kind):
    data = tars_of_every_kind()[kind]
    path = tmp_path / "n00000001.tar"
    path.write_bytes(data)
    counted, _items = counted_walk(path)
    assert (counted.structure, counted.damaged) == (len(data), 0)


@pytest.mark.parametrize("kind", list(tars_of_every_kind()))
def test_a_tar_cut_anywhere_on_disk_adds_up_with_its_damage(tmp_path, kind):
    """Real damage: the file itself is shorter. Every cut (inside a header, a pax record, a long
    name, member data, padding, the end blocks) is accounted for to the last byte on disk."""
    data = tars_of_every_kind()[kind]
    path = tmp_path / "n00000001.tar"
    last = layout(data)[-1]
    members_end = last.offset_data + (last.size + 511) // 512 * 512  # then only end-of-archive zeros
    for cut in [*range(1, len(data), 173), *(m.offset + d for m in layout(data) for d in (0, 100, 512))]:
        if cut >= len(data):
            continue
        path.write_bytes(data[:cut])
        counted, items = counted_walk(path)
        assert counted.total == cut, (kind, cut, counted)
        damage = [i for i in items if isinstance(i, Damage)]
        assert damage or cut > members_end, (kind, cut)  # cut before its end: never silently whole
        if counted.damaged:
            last = damage[-1]  # the damage row covers exactly what the structure does not: to the end
            assert last.offset <= cut and last.offset + last.size >= cut, (kind, cut, last)


def test_junk_in_the_middle_is_accounted_as_damage(tmp_path):
    data = bytearray(make_tar(FILES))
    second = layout(bytes(data))[1]
    data[second.offset : second.offset + 512] = os.urandom(512)  # its header destroyed
    path = tmp_path / "n00000001.tar"
    path.write_bytes(data)
    counted, items = counted_walk(path)
    assert counted.total == len(data) and counted.damaged >= 512
    assert any(isinstance(i, Damage) and i.offset == second.offset for i in items)


class _ShortReads(io.RawIOBase):
    """A file whose reads stop early: bytes past `stop` never come (as from a transport that
    ends a body early), though the listing says the file is longer."""

    def __init__(self, data: bytes, stop: int):
        self._f, self._stop = io.BytesIO(data), stop

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos, whence=0):
        return self._f.seek(pos, whence)

    def tell(self):
        return self._f.tell()

    def readinto(self, b) -> int:
        room = max(0, self._stop - self._f.tell())
        chunk = self._f.read(min(len(b), room))
        b[: len(chunk)] = chunk
        return len(chunk)

    def read(self, n=-1) -> bytes:
        room = max(0, self._stop - self._f.tell())
        return self._f.read(room if n is None or n < 0 else min(n, room))


@pytest.mark.parametrize("kind", list(tars_of_every_kind()))
def test_a_read_stopping_short_of_the_listed_size_never_adds_up(kind):
    data = tars_of_every_kind()[kind]
    for stop in range(0, len(data), 211):
        counted = ByteCount()
        items = list(_iter_fileobj(_ShortReads(data, stop), len(data), "n00000001.tar", counted=counted))
        assert counted.total <= stop < len(data), (kind, stop, counted, items[-1:])


def test_a_tar_shorter_than_its_listing_is_refused_and_as_listed_adds_up(tmp_path):
    """A tar that is shorter than its listing said (cut after it was listed): scan_tar reads what
    is there, and check_accounted refuses it, naming the tar and both counts."""
    summary = write_sample_raw(tmp_path / "raw", synsets=1, images=6, seed=3)
    path = summary.tars[0]
    listed = os.path.getsize(path)
    whole = scan_tar(str(path), size=listed)
    check_accounted(path.name, whole, listed)  # read whole: adds up
    assert whole.counted.total == listed
    last = layout(path.read_bytes())[-1]
    cut_at = last.offset_data + last.size // 2  # inside the last member's data
    with open(path, "r+b") as f:
        f.truncate(cut_at)
    short = scan_tar(str(path), size=listed)
    with pytest.raises(ReadShort) as caught:
        check_accounted(path.name, short, listed)
    assert path.name in str(caught.value) and f"of its {listed} listed bytes" in str(caught.value)
    # listed as it now is, the cut tar is real damage: recorded, and it adds up
    cut = scan_tar(str(path), size=cut_at)
    check_accounted(path.name, cut, cut_at)
    damage = [r for r in cut if r.sha256 is None]
    assert cut.counted.damaged == cut_at - last.offset_data and [r.offset for r in damage] == [last.offset_data]
