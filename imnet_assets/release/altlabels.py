"""Alternative labels (IMNET_ALT_LABELS): `label_in1k` in each sample's JSON and the `train_in1k`
split of `_info.json`.

`label_in1k` is a synset's index in the sorted list of the 1,000 ImageNet-1k wnids (shipped as
`imnet_assets/lists/imagenet1k_wnids.txt`, see the README beside it), or -1 for a synset not among
them. timm's WebDataset reader reads a split's `alt_label` field from the sample JSON instead of
`.cls` and skips samples whose label is negative, so `train_in1k` trains on the ImageNet-1k subset
of the same shards; its `shard_lengths` count only those samples.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

MODES = {"in1k": "label_in1k"}  # IMNET_ALT_LABELS mode -> the JSON field it adds


def in1k_wnids_path() -> str:
    return str(resources.files("imnet_assets") / "lists" / "imagenet1k_wnids.txt")


@cache
def in1k_labels() -> dict[str, int]:
    """wnid -> label_in1k for the 1,000 ImageNet-1k synsets."""
    text = (resources.files("imnet_assets") / "lists" / "imagenet1k_wnids.txt").read_text("utf-8")
    wnids = [w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#")]
    if len(wnids) != 1000 or wnids != sorted(wnids) or len(set(wnids)) != 1000:
        raise ValueError(f"{in1k_wnids_path()} must hold 1,000 distinct sorted wnids, holds {len(wnids)}")
    return {w: i for i, w in enumerate(wnids)}


def sample_fields(wnid: str, mode: str) -> dict[str, int]:
    """The extra JSON fields of one sample under IMNET_ALT_LABELS=`mode` ("" adds none)."""
    if not mode:
        return {}
    if mode != "in1k":
        raise ValueError(f"unknown alternative label mode {mode!r}")
    return {"label_in1k": in1k_labels().get(wnid, -1)}


def split_name(mode: str) -> str:
    return f"train_{mode}"


def info_splits(mode: str, train: dict, alt_lengths: dict[str, int]) -> dict[str, dict]:
    """The `_info.json` split of mode `mode`: the train split's shard files, `alt_label` naming the
    JSON field, and per shard the number of samples with a label of 0 or more (`alt_lengths`: shard
    file name -> count; a shard not in it counts 0)."""
    if not mode:
        return {}
    name = split_name(mode)
    counts = [int(alt_lengths.get(f, 0)) for f in train["filenames"]]
    return {name: {"name": name, "alt_label": MODES[mode], "filenames": list(train["filenames"]),
                   "shard_lengths": counts, "num_samples": sum(counts)}}


def shard_counts(settings, catalog=None) -> dict[str, int]:
    """Shard file name -> its written samples with an ImageNet-1k synset, from the catalog (the
    audit loaded every shard's samples into `shard_samples`). `catalog`: an open Catalog to read
    (the audit's own connection); else it is opened read-only for this."""
    from imnet_assets.storage.catalog import reading

    with reading(settings.catalog, catalog) as cat:
        rows = cat.rows("altlabels_in1k_per_shard", {"wnids": sorted(in1k_labels()), "release": settings.release})
    return {settings.shard_name(shard): int(n) for shard, n in rows}


def info_splits_for(settings, train: dict, catalog=None) -> dict[str, dict]:
    """The alt-label splits of `_info.json` under these settings (none without IMNET_ALT_LABELS).
    `catalog`: as for `shard_counts`."""
    if not settings.alt_labels:
        return {}
    return info_splits(settings.alt_labels, train, shard_counts(settings, catalog))


# ----------------------------------------------------------------------------- a release's synsets
# (issue 25) A release's `synsets` value: "all", "in1k", "in12k" (timm's ImageNet-12k list, shipped as
# `imnet_assets/lists/imagenet12k_wnids.txt`) or the path of a file of wnids, one a line.

SHIPPED_LISTS = {"in1k": "imagenet1k_wnids.txt", "in12k": "imagenet12k_wnids.txt"}
_WNID = re.compile(r"n[0-9]{8}")


class SynsetListError(ValueError):
    """A file of wnids that is not one: names the file and the line."""


def read_wnids(path: str, text: str | None = None) -> list[str]:
    """The wnids of a list file in its order: one a line, blank lines and lines starting with `#`
    skipped, surrounding spaces ignored. Each must look like `n01440764` and appear once; otherwise
    SynsetListError names the file and the line."""
    if text is None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SynsetListError(f"synset list {path}: cannot read it: {type(e).__name__}: {e}") from None
    wnids: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        wnid = line.strip()
        if not wnid or wnid.startswith("#"):
            continue
        if not _WNID.fullmatch(wnid):
            raise SynsetListError(f"synset list {path}, line {number}: {wnid[:40]!r} is not a wnid "
                                  "(n followed by 8 digits, one a line)")
        if wnid in first_line:
            raise SynsetListError(f"synset list {path}, line {number}: {wnid} repeats line {first_line[wnid]}")
        first_line[wnid] = number
        wnids.append(wnid)
    if not wnids:
        raise SynsetListError(f"synset list {path}: holds no wnid")
    return wnids


def release_wnids(synsets: str) -> tuple[str, ...] | None:
    """The wnids a release's `synsets` value selects, sorted (a label is the index in this tuple),
    or None for "all" (every synset of the raw release). "in1k" and "in12k" are the shipped lists;
    any other value is the path of a file of wnids (read_wnids's rules; a relative path is taken
    from the working directory, so callers resolve it first). Whether the raw release holds them is
    the caller's to judge."""
    value = synsets.strip()
    if value == "all":
        return None
    if value in SHIPPED_LISTS:
        shipped = resources.files("imnet_assets") / "lists" / SHIPPED_LISTS[value]
        return tuple(sorted(read_wnids(str(shipped), shipped.read_text("utf-8"))))
    if not value:
        raise SynsetListError('synsets is empty: use "all", "in1k", "in12k" or the path of a file of wnids')
    return tuple(sorted(read_wnids(value)))
