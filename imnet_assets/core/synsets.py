"""synset_manifest: labels and the human-readable text of each synset."""

from __future__ import annotations

from . import fs


def parse_text(data: str) -> dict[str, str]:
    """`<wnid>\\t<text>` per line (words.txt, gloss.txt); blank and malformed lines are skipped."""
    out: dict[str, str] = {}
    for line in data.splitlines():
        wnid, sep, text = line.partition("\t")
        if sep and wnid.strip():
            out[wnid.strip()] = text.strip()
    return out


def read_text_file(raw_root: str, name: str, present: bool) -> dict[str, str]:
    return parse_text(fs.read_text(fs.join(raw_root, name))) if present else {}


def labels(wnids: list[str]) -> dict[str, int]:
    """The label of a synset is its index in the sorted list of all synset tars."""
    return {w: i for i, w in enumerate(sorted(wnids))}
