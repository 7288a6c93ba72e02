"""raw_tars and synset_manifest: listing the raw root, member counts, unpacking the whole-release
archive, and labels / lemmas / glosses in the catalog."""

from __future__ import annotations

import io
import os
import tarfile

import duckdb
import pytest
from PIL import Image

from imnet_assets.settings import Settings
from imnet_assets.stages.filtered_index import build_filtered_index
from imnet_assets.stages.fingerprints import stale_stages
from imnet_assets.stages.raw_tars import build_raw_tars
from imnet_assets.stages.synset_manifest import build_synset_manifest
from imnet_assets.stages.synsets import labels, parse_text, read_text_file, shipped_text
from imnet_assets.storage import inventory as inventory_mod
from imnet_assets.storage.inventory import ArchiveDamaged, inventory, list_raw
from tests.conftest import local_settings

QUIET = lambda _m: None  # noqa: E731


def jpeg(seed: int, size=(40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, 128)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]], extra_dir: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        if extra_dir:
            d = tarfile.TarInfo(extra_dir)
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def synset_tar(wnid: str, n: int) -> bytes:
    return tar_bytes([(f"{wnid}_{i + 1}.JPEG", jpeg(i)) for i in range(n)])


def settings_for(raw, tmp_path) -> Settings:
    return local_settings(raw, tmp_path, IMNET_NUM_SHARDS=2)


def query(settings: Settings, text: str) -> list[tuple]:
    with duckdb.connect(settings.catalog, read_only=True) as con:
        return con.execute(text).fetchall()


# ----------------------------------------------------------------------------- listing


def test_list_raw_finds_synset_tars_and_text_files(tmp_path):
    (tmp_path / "n00000002.tar").write_bytes(synset_tar("n00000002", 2))
    (tmp_path / "n00000001.tar").write_bytes(synset_tar("n00000001", 3))
    (tmp_path / "words.txt").write_text("n00000001\tfirst\n")
    (tmp_path / "gloss.txt").write_text("n00000001\ta first thing\n")
    for other in ("README.md", "n1.tar", "n000000001.tar", "n00000003.tar.gz", "N00000004.tar", "x.JPEG"):
        (tmp_path / other).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "n00000005.tar").write_bytes(synset_tar("n00000005", 1))
    listing = list_raw(str(tmp_path), log=QUIET)
    assert [t["name"] for t in listing.tars] == ["n00000001.tar", "n00000002.tar"]
    assert listing.tars[0]["url"] == os.path.join(str(tmp_path), "n00000001.tar")
    assert listing.tars[0]["size"] == os.path.getsize(tmp_path / "n00000001.tar")
    assert sorted(listing.texts) == ["gloss.txt", "words.txt"]
    assert sorted(listing.ignored) == sorted(
        ["README.md", "n1.tar", "n000000001.tar", "n00000003.tar.gz", "N00000004.tar", "x.JPEG"]
    )


def test_list_raw_of_an_empty_or_missing_root(tmp_path):
    listing = list_raw(str(tmp_path / "missing"), log=QUIET)
    assert (listing.tars, listing.texts, listing.ignored) == ([], {}, [])


def test_listing_fingerprint_follows_tars_and_texts_only(tmp_path):
    (tmp_path / "n00000001.tar").write_bytes(synset_tar("n00000001", 2))
    first = list_raw(str(tmp_path), log=QUIET).fingerprint
    assert list_raw(str(tmp_path), log=QUIET).fingerprint == first
    (tmp_path / "notes.md").write_text("ignored")
    assert list_raw(str(tmp_path), log=QUIET).fingerprint == first
    (tmp_path / "words.txt").write_text("n00000001\tx\n")
    with_words = list_raw(str(tmp_path), log=QUIET).fingerprint
    assert with_words != first
    (tmp_path / "n00000001.tar").write_bytes(synset_tar("n00000001", 3))
    assert list_raw(str(tmp_path), log=QUIET).fingerprint != with_words


# ----------------------------------------------------------------------------- counting


def test_inventory_reads_no_tar(tmp_path):
    (tmp_path / "n00000001.tar").write_bytes(synset_tar("n00000001", 3))
    (tmp_path / "n00000002.tar").write_bytes(b"not even a tar")
    listing = list_raw(str(tmp_path), log=QUIET)
    rows = inventory(listing)  # no tar is opened: a broken one is the index's to record
    assert [r[:2] for r in rows] == [("n00000001.tar", "n00000001"), ("n00000002.tar", "n00000002")]
    assert [(r[2], r[3]) for r in rows] == [(t["size"], t["mtime"]) for t in listing.tars]


# ----------------------------------------------------------------------------- the raw_tars stage


def whole_release(path, content: dict[str, bytes]) -> None:
    """A `winter21_whole.tar.gz` holding a folder `winter21_whole/` with the given files."""
    with tarfile.open(path, "w:gz") as tf:
        d = tarfile.TarInfo("winter21_whole")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in content.items():
            info = tarfile.TarInfo(f"winter21_whole/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_build_raw_tars_unpacks_the_whole_release(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    inner = {
        "n00000003.tar": synset_tar("n00000003", 2),
        "n00000001.tar": synset_tar("n00000001", 3),
        "n00000002.tar": synset_tar("n00000002", 1),
        "words.txt": b"n00000001\tone\nn00000002\ttwo\nn00000003\tthree\nn00000009\tno tar\n",
    }
    whole_release(raw / "winter21_whole.tar.gz", inner)
    settings = settings_for(raw, tmp_path)
    logged: list[str] = []
    facts = build_raw_tars(settings, "run-1", log=logged.append)
    # The per-synset layout, byte for byte, beside the archive; no temporaries left.
    assert sorted(os.listdir(raw)) == sorted([*inner, "winter21_whole.tar.gz"])
    for name, data in inner.items():
        assert (raw / name).read_bytes() == data
    assert facts["tars"] == 3 and facts["tars_to_count"] == 3  # counted by the index's walk
    assert facts["bytes"] == sum(len(d) for n, d in inner.items() if n.endswith(".tar"))
    assert facts["ignored_files"] == 1  # the archive itself, reported
    assert any("winter21_whole.tar.gz" in m for m in logged)
    assert query(settings, "SELECT tar, wnid, num_members FROM raw_tars ORDER BY tar") == [
        ("n00000001.tar", "n00000001", None), ("n00000002.tar", "n00000002", None),
        ("n00000003.tar", "n00000003", None),
    ]
    # The next run finds the unpacked tars and does not unpack again.
    mtime = os.stat(raw / "n00000001.tar").st_mtime_ns
    build_raw_tars(settings, "run-2", log=QUIET)
    assert os.stat(raw / "n00000001.tar").st_mtime_ns == mtime
    # The synset stage reads the unpacked words.txt; the index counts the members.
    build_synset_manifest(settings, "run-3", log=QUIET)
    build_filtered_index(settings, "run-4", log=QUIET)
    assert query(settings, "SELECT wnid, label, lemma, gloss, num_images FROM synsets ORDER BY wnid") == [
        ("n00000001", 0, "one", None, 3), ("n00000002", 1, "two", None, 1), ("n00000003", 2, "three", None, 2),
    ]


def test_an_interrupted_unpack_is_redone(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    inner = {f"n0000000{i}.tar": synset_tar(f"n0000000{i}", i) for i in (1, 2, 3)}
    whole_release(raw / "winter21_whole.tar.gz", inner)
    settings = settings_for(raw, tmp_path)

    def killed(archive_url, raw_root):  # commits the first tar, then the process dies
        (raw / "n00000001.tar").write_bytes(inner["n00000001.tar"])
        raise KeyboardInterrupt

    monkeypatch.setattr(inventory_mod, "unpack_whole_release", killed)
    with pytest.raises(KeyboardInterrupt):
        build_raw_tars(settings, "run-1", log=QUIET)
    monkeypatch.undo()
    # One synset tar is there, but the release is not: the next run unpacks again.
    facts = build_raw_tars(settings, "run-2", log=QUIET)
    assert facts["tars"] == 3
    assert sorted(os.listdir(raw)) == sorted([*inner, "winter21_whole.tar.gz"])


@pytest.mark.parametrize("cut", [45_000, 100])
def test_a_cut_archive_is_a_clear_error_and_unpacked_again_next_time(tmp_path, cut):
    raw = tmp_path / "raw"
    raw.mkdir()
    inner = {f"n0000000{i}.tar": os.urandom(30_000) for i in (1, 2, 3)}  # incompressible
    whole_release(tmp_path / "whole.tar.gz", inner)
    (raw / "winter21_whole.tar.gz").write_bytes((tmp_path / "whole.tar.gz").read_bytes()[:cut])
    settings = settings_for(raw, tmp_path)
    where = r"after 0 files|before its first file" if cut == 100 else r"after \d files \(last n0000000\d\.tar\)"
    with pytest.raises(ArchiveDamaged, match=rf"winter21_whole\.tar\.gz is damaged or cut short: .*({where})"):
        build_raw_tars(settings, "run-1", log=QUIET)
    assert stale_stages(settings, log=QUIET)[0] == "raw_tars"
    (raw / "winter21_whole.tar.gz").write_bytes((tmp_path / "whole.tar.gz").read_bytes())
    facts = build_raw_tars(settings, "run-2", log=QUIET)
    assert facts["tars"] == 3
    assert sorted(os.listdir(raw)) == sorted([*inner, "winter21_whole.tar.gz"])


def test_looking_at_a_packed_release_does_not_unpack_it(tmp_path):
    """`imnet status` and `imnet build`'s freshness check only list the root: unpacking (hours
    for the real release) is the raw_tars stage's work, recorded as such."""
    raw = tmp_path / "raw"
    raw.mkdir()
    whole_release(raw / "winter21_whole.tar.gz", {"n00000001.tar": synset_tar("n00000001", 2)})
    settings = settings_for(raw, tmp_path)
    assert stale_stages(settings, log=QUIET) == ["raw_tars", "synset_manifest", "filtered_index",
                                                         "shuffled_plan"]
    assert os.listdir(raw) == ["winter21_whole.tar.gz"]
    build_raw_tars(settings, "run", log=QUIET)
    assert "raw_tars" not in stale_stages(settings, log=QUIET)


def test_tars_given_beside_the_archive_are_used_as_they_are(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    whole_release(raw / "winter21_whole.tar.gz", {"n00000001.tar": synset_tar("n00000001", 2),
                                                  "n00000002.tar": synset_tar("n00000002", 2)})
    (raw / "n00000005.tar").write_bytes(synset_tar("n00000005", 1))
    facts = build_raw_tars(settings_for(raw, tmp_path), "run", log=QUIET)
    assert facts["tars"] == 1
    assert sorted(os.listdir(raw)) == ["n00000005.tar", "winter21_whole.tar.gz"]


def test_build_raw_tars_with_nothing_to_read_is_a_clear_error(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "notes.md").write_text("x")
    with pytest.raises(FileNotFoundError, match="IMNET_RAW_ROOT"):
        build_raw_tars(settings_for(raw, tmp_path), "run", log=QUIET)


def test_build_raw_tars_follows_changes(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "n00000001.tar").write_bytes(synset_tar("n00000001", 2))
    (raw / "n00000002.tar").write_bytes(synset_tar("n00000002", 2))
    settings = settings_for(raw, tmp_path)
    build_raw_tars(settings, "run-1", log=QUIET)
    build_synset_manifest(settings, "run-1", log=QUIET)
    build_filtered_index(settings, "run-1", log=QUIET)
    os.unlink(raw / "n00000002.tar")
    (raw / "n00000001.tar").write_bytes(synset_tar("n00000001", 4))
    (raw / "n00000005.tar").write_bytes(synset_tar("n00000005", 1))
    (raw / "n00000006.tar").write_bytes(synset_tar("n00000006", 3))
    os.utime(raw / "n00000006.tar", (1, 1))
    facts = build_raw_tars(settings, "run-2", log=QUIET)
    # The member counts of changed and new tars are unknown until the index walks them again.
    assert facts["tars"] == 3 and facts["tars_to_count"] == 3
    build_filtered_index(settings, "run-2", log=QUIET)
    assert query(settings, "SELECT tar, num_members FROM raw_tars ORDER BY tar") == [
        ("n00000001.tar", 4), ("n00000005.tar", 1), ("n00000006.tar", 3),
    ]
    # An unchanged tar keeps its count through another inventory.
    facts = build_raw_tars(settings, "run-3", log=QUIET)
    assert facts["tars_to_count"] == 0 and facts["members"] == 8


# ----------------------------------------------------------------------------- synsets and labels


def test_labels_are_indices_in_the_sorted_wnid_list():
    assert labels(["n00000003", "n00000001", "n00000002"]) == {"n00000001": 0, "n00000002": 1, "n00000003": 2}
    assert labels([]) == {}


def test_parse_text_reads_tab_separated_lines():
    text = "n00000001\tdog, domestic dog\n\nmalformed line\nn00000002\t  spaced  \r\n\tno wnid\nn00000003\t\n"
    assert parse_text(text) == {"n00000001": "dog, domestic dog", "n00000002": "spaced", "n00000003": ""}


def test_read_text_file_only_when_present(tmp_path):
    (tmp_path / "words.txt").write_text("n00000001\tone\nn01440764\tmy tench\n")
    words = read_text_file(str(tmp_path), "words.txt", True)
    assert (words["n00000001"], words["n01440764"]) == ("one", "my tench")  # the release's own text wins
    # a wnid the release's words.txt lacks: the shipped table's lemma
    assert words["n01443537"] == shipped_text("words.txt")["n01443537"] == "goldfish, Carassius auratus"
    # absent: the shipped synset table's glosses (fall11's 21,844 synsets)
    shipped = read_text_file(str(tmp_path), "gloss.txt", False)
    assert len(shipped) == 21_844 and "n01440764" in shipped


def test_synset_manifest_labels_lemmas_and_glosses(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    # Written out of order; labels follow the sorted wnids of the tars.
    for wnid, n in (("n00000030", 2), ("n00000010", 1), ("n00000020", 3)):
        (raw / f"{wnid}.tar").write_bytes(synset_tar(wnid, n))
    (raw / "words.txt").write_text(
        'n00000010\tten, "the" tenth\nn00000030\tthirty\nn00000099\tno tar for this one\n', encoding="utf-8"
    )
    settings = settings_for(raw, tmp_path)
    build_raw_tars(settings, "run-1", log=QUIET)
    build_synset_manifest(settings, "run-2", log=QUIET)
    build_filtered_index(settings, "run-2", log=QUIET)  # it counts the members
    facts = build_synset_manifest(settings, "run-2", log=QUIET)
    rows = query(settings, "SELECT wnid, label, lemma, gloss, num_images FROM synsets ORDER BY label")
    assert rows == [
        ("n00000010", 0, 'ten, "the" tenth', None, 1),
        ("n00000020", 1, None, None, 3),  # absent from words.txt: NULL
        ("n00000030", 2, "thirty", None, 2),
    ]
    assert (facts["synsets"], facts["with_lemma"], facts["with_gloss"], facts["images"]) == (3, 2, 0, 6)
    # gloss.txt appears later: the next run picks it up.
    (raw / "gloss.txt").write_text("n00000020\ta twentieth thing\n")
    build_synset_manifest(settings, "run-3", log=QUIET)
    assert query(settings, "SELECT wnid, gloss FROM synsets ORDER BY wnid") == [
        ("n00000010", None), ("n00000020", "a twentieth thing"), ("n00000030", None),
    ]

