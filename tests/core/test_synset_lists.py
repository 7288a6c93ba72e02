"""Issue 25: the shipped ImageNet-12k synset list (timm's) and a release's `synsets` value
(`altlabels.release_wnids`): "all", "in1k", "in12k" or a file of wnids, validated."""

from __future__ import annotations

import gzip
import re
from importlib import resources

import pytest

from imnet_assets.release.altlabels import SynsetListError, in1k_labels, read_wnids, release_wnids

LISTS = resources.files("imnet_assets") / "lists"


def test_the_shipped_imagenet12k_list_is_timms_11821_sorted_fall11_wnids():
    lines = (LISTS / "imagenet12k_wnids.txt").read_text("utf-8").splitlines()
    comments = [line for line in lines if line.startswith("#")]
    wnids = [line for line in lines if not line.startswith("#")]
    assert len(comments) == 2 and "timm 1.0.31" in comments[1] and "imagenet12k_synsets.txt" in comments[1]
    assert len(wnids) == 11_821 == len(set(wnids))
    assert wnids == sorted(wnids) and all(re.fullmatch(r"n[0-9]{8}", w) for w in wnids)
    with gzip.open(LISTS / "synsets_fall11.tsv.gz", "rt", encoding="utf-8") as f:
        fall11 = {line.split("\t", 1)[0] for line in f}
    assert set(wnids) <= fall11
    assert wnids[0] == "n00005787" and wnids[-1] == "n15102894"
    assert "imagenet12k_wnids.txt" in (LISTS / "README.md").read_text("utf-8")


def test_release_wnids_of_the_named_lists():
    assert release_wnids("all") is None
    in1k = release_wnids("in1k")
    assert len(in1k) == 1000 and list(in1k) == sorted(in1k_labels(), key=in1k_labels().get)
    in12k = release_wnids("in12k")
    assert len(in12k) == 11_821 and list(in12k) == sorted(in12k)
    assert len(set(in1k) - set(in12k)) == 7  # timm's 12k leaves out 7 of ImageNet-1k's synsets


def test_a_file_of_wnids_is_read_sorted_with_comments_and_blank_lines(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my subset\nn02102040\n\n  n01440764  \n# more\nn01443537\n")
    assert release_wnids(str(path)) == ("n01440764", "n01443537", "n02102040")
    assert read_wnids(str(path)) == ["n02102040", "n01440764", "n01443537"]  # file order


@pytest.mark.parametrize("text,words", [
    ("n01440764\nn0144076\n", ["line 2", "'n0144076' is not a wnid"]),
    ("n01440764\nN01443537\n", ["line 2", "'N01443537' is not a wnid"]),
    ("n01440764 tench\n", ["line 1", "is not a wnid"]),
    ("n01440764\nn01443537\nn01440764\n", ["line 3", "n01440764 repeats line 1"]),
    ("# nothing\n\n", ["holds no wnid"]),
])
def test_a_bad_file_of_wnids_is_refused_naming_the_file_and_the_line(tmp_path, text, words):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(SynsetListError) as e:
        release_wnids(str(path))
    assert str(path) in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_a_missing_or_unreadable_file_is_refused_naming_it(tmp_path):
    with pytest.raises(SynsetListError, match="gone.txt: cannot read it"):
        release_wnids(str(tmp_path / "gone.txt"))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00n01440764")
    with pytest.raises(SynsetListError, match="binary.txt: cannot read it"):
        release_wnids(str(binary))
    with pytest.raises(SynsetListError, match="synsets is empty"):
        release_wnids(" ")
