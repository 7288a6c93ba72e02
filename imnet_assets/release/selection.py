"""A release's synsets and their labels (SPEC: Releases; issue 25).

`synsets` names the list: "all" (every synset of the raw release), "in1k" (the 1,000 ImageNet-1k
wnids shipped in imnet_assets/lists/imagenet1k_wnids.txt), "in12k" (timm's 11,821 ImageNet-12k
wnids, imnet_assets/lists/imagenet12k_wnids.txt) or the path of a file of wnids, one a line
(blank lines and lines starting with '#' are skipped; a relative path is taken from the project root).

Labels are the index in the sorted list of the release's synsets *as given*, not of those the raw
release holds: so an ImageNet-12k release's labels are timm's (the index in its sorted 11,821-wnid
list) whatever copy of the raw release it is made from. A listed synset the raw release does not
hold keeps its label, holds no image, and is recorded: logged by the plan stage, counted in its facts
(`absent_synsets`), listed in classes.tsv with a count of 0 and named in the card. A list of which
the raw release holds none is an error (SelectionError), as are a duplicated wnid or a line that is
not one word. For "all" the list is the raw release's own, so the labels are the synsets table's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from imnet_assets.settings import project_root

ALL = "all"
SHIPPED = {"in1k": "imagenet1k_wnids.txt", "in12k": "imagenet12k_wnids.txt"}
SHOWN = 10  # absent synsets named in a note


class SelectionError(ValueError):
    """A release's synset list cannot be used (missing, malformed, or nothing of it in the raw release)."""


@dataclass(frozen=True)
class Selection:
    wnids: tuple[str, ...]  # sorted: a synset's label is its index here
    absent: tuple[str, ...]  # listed, but not in the raw release (sorted)
    synsets: str  # the setting, as given

    @property
    def rows(self) -> list[tuple[str, int]]:
        """(wnid, label) per synset of the release."""
        return [(w, i) for i, w in enumerate(self.wnids)]

    def note(self) -> str | None:
        """A line naming the listed synsets the raw release does not hold, or None."""
        if not self.absent:
            return None
        named = ", ".join(self.absent[:SHOWN]) + (" ..." if len(self.absent) > SHOWN else "")
        return (f"{len(self.absent)} of the {len(self.wnids)} synsets of {self.synsets!r} are not in the raw "
                f"release ({named}): they keep their labels and hold no image")


def list_path(synsets: str) -> str:
    """The file a named list is read from."""
    if synsets in SHIPPED:
        return str(resources.files("imnet_assets") / "lists" / SHIPPED[synsets])
    path = Path(synsets).expanduser()
    return str(path if path.is_absolute() else project_root() / path)


def read_list(synsets: str) -> tuple[list[str], str]:
    """The wnids of a named list (not "all"), sorted, and the sha256 of the file's bytes."""
    path = list_path(synsets)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        shipped = f" (the list {SHIPPED[synsets]} is not shipped with this package)" if synsets in SHIPPED else ""
        raise SelectionError(f"synsets {synsets!r}: cannot read {path}{shipped}: {e.strerror or e}") from None
    seen: dict[str, int] = {}
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if len(word.split()) != 1:
            raise SelectionError(f"{path} line {number}: {word[:60]!r} is not one wnid")
        if word in seen:
            raise SelectionError(f"{path} line {number}: {word} is listed twice (first on line {seen[word]})")
        seen[word] = number
    if not seen:
        raise SelectionError(f"synsets {synsets!r}: {path} lists no wnid")
    return sorted(seen), hashlib.sha256(data).hexdigest()


def list_digest(synsets: str) -> str:
    """What the plan's fingerprint holds of the selection: "" for "all" (the default release's
    fingerprint is as before releases), else the name and the sha256 of the list's bytes (an edited
    file makes the release's plan stale)."""
    if synsets == ALL:
        return ""
    return f"{synsets}:{read_list(synsets)[1]}"


def select(synsets: str, raw_wnids: list[str]) -> Selection:
    """The release's synsets, given the raw release's."""
    if synsets == ALL:
        return Selection(tuple(sorted(raw_wnids)), (), synsets)
    wnids, _ = read_list(synsets)
    held = set(raw_wnids)
    absent = tuple(w for w in wnids if w not in held)
    if len(absent) == len(wnids):
        raise SelectionError(f"synsets {synsets!r}: none of its {len(wnids)} synsets is in the raw release "
                             f"(e.g. {', '.join(wnids[:3])})")
    return Selection(tuple(wnids), absent, synsets)
