"""synset_manifest: labels and the human-readable text of each synset."""

from __future__ import annotations

import gzip
from functools import cache
from importlib import resources

from imnet_assets.storage import fs


def parse_text(data: str) -> dict[str, str]:
    """`<wnid>\\t<text>` per line (words.txt, gloss.txt); blank and malformed lines are skipped."""
    out: dict[str, str] = {}
    for line in data.splitlines():
        wnid, sep, text = line.partition("\t")
        if sep and wnid.strip():
            out[wnid.strip()] = text.strip()
    return out


SHIPPED_TABLE = "synsets_fall11.tsv.gz"  # imnet_assets/lists: <wnid>\t<lemma>\t<gloss> (see its README)
SHIPPED_COLUMN = {"words.txt": 1, "gloss.txt": 2}


def read_text_file(raw_root: str, name: str, present: bool) -> dict[str, str]:
    """`words.txt` or `gloss.txt` of the raw release; for each wnid it lacks (or when the release has
    none), the lemma or gloss of the shipped synset table (the public lists timm ships, for ImageNet
    fall11's 21,844 synsets, which hold Winter21's)."""
    shipped = shipped_text(name)
    return {**shipped, **parse_text(fs.read_text(fs.join(raw_root, name)))} if present else shipped


@cache
def _shipped_rows() -> tuple[tuple[str, str, str], ...]:
    data = (resources.files("imnet_assets") / "lists" / SHIPPED_TABLE).read_bytes()
    rows = (line.split("\t") for line in gzip.decompress(data).decode("utf-8").splitlines())
    return tuple((r[0], r[1], r[2]) for r in rows if len(r) == 3)


def shipped_text(name: str) -> dict[str, str]:
    """wnid -> lemma (`words.txt`) or gloss (`gloss.txt`) from the shipped synset table."""
    column = SHIPPED_COLUMN[name]
    return {row[0]: row[column] for row in _shipped_rows()}


def labels(wnids: list[str]) -> dict[str, int]:
    """The label of a synset is its index in the sorted list of all synset tars."""
    return {w: i for i, w in enumerate(sorted(wnids))}
