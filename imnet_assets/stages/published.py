"""The files a clean audit publishes beside the shards (`_info.json`, `classes.tsv`, the card), and
the limits they are read back with: each grows with the release (its shards, its classes), so a
file larger than one of this release can be is not one the audit wrote, and is read no further
(`sealed`: not fresh, the next build audits again and writes it anew; `read_info`: a problem
naming it), never read whole."""

from __future__ import annotations

import hashlib
import json

from imnet_assets.release import card
from imnet_assets.release.info import info_url
from imnet_assets.settings import Settings
from imnet_assets.storage import fs

CLASSES_NAME = "classes.tsv"
CLASSES_COLUMNS = ("label", "wnid", "lemma", "gloss", "count")
# _info.json names each shard's file (a name as long as an S3 key: at most 1 KiB) with its length,
# in its split and again in train_in1k's: INFO_SHARD_MAX_BYTES a shard, INFO_BASE_BYTES the rest
# (~60 bytes a shard at the real size: ~90 KB).
INFO_SHARD_MAX_BYTES = 4096
INFO_BASE_BYTES = 1 << 20
# classes.tsv: a row per class (label, wnid, lemmas, gloss, count: ~150 bytes; WordNet's longest
# gloss and lemma lists are under 1 KiB together), and no release has more classes than WordNet
# has noun synsets (82,115; the real release 19,167 rows, ~3 MB): ~160 MiB at most.
CLASSES_ROW_MAX_BYTES = 2048
CLASSES_MAX_ROWS = 82_115
# The card: tables of settings, splits and exclusion reasons (a few dozen rows, ~10 KB).
CARD_MAX_BYTES = 16 << 20


def classes_url(settings: Settings) -> str:
    return fs.join(settings.out_root, CLASSES_NAME)


def render_classes(rows: list[tuple]) -> bytes:
    """classes.tsv: a header line, then one line per label (tabs and line breaks inside a lemma or
    gloss become spaces, so every line is one row of five fields)."""
    def field(value) -> str:
        return " ".join(str(value).replace("\t", " ").splitlines())

    lines = ["\t".join(CLASSES_COLUMNS), *("\t".join(field(v) for v in row) for row in rows)]
    return ("\n".join(lines) + "\n").encode("utf-8")


def published_urls(settings: Settings) -> list[str]:
    """The files a clean audit writes beside the shards."""
    return [info_url(settings), classes_url(settings), card.card_url(settings)]


def info_limit(settings: Settings) -> int:
    return INFO_BASE_BYTES + INFO_SHARD_MAX_BYTES * len(settings.partition_keys)


def published_limits(settings: Settings) -> dict[str, int]:
    """url -> the most bytes each published file of this release can hold."""
    info, classes, card_ = published_urls(settings)
    return {info: info_limit(settings), classes: 64 + CLASSES_ROW_MAX_BYTES * CLASSES_MAX_ROWS, card_: CARD_MAX_BYTES}


def sealed(settings: Settings, inputs: str) -> str:
    """`inputs` joined with the sha256 of each published file as storage holds it (one concurrent
    read of three small files; "-" for one that is not there). A file larger than its limit is
    read no further, and gives a seal no audit records."""
    urls = published_urls(settings)
    try:
        found = fs.read_many(urls, limit=published_limits(settings), kind="a file the audit writes")
    except fs.TooLarge as e:
        return hashlib.sha256(f"{inputs}|over the limit: {e.url}".encode()).hexdigest()
    parts = [inputs] + [hashlib.sha256(found[u]).hexdigest() if found[u] is not None else "-" for u in urls]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def read_info(settings: Settings) -> tuple[dict | None, list[str]]:
    """(`_info.json`'s document, []) or (None, the problem: missing, not JSON, larger than any of
    this release's can be). A storage fault propagates: no verdict on the release."""
    url, limit = info_url(settings), info_limit(settings)
    try:
        return json.loads(fs.read_bytes(url, limit=limit, kind="this release's _info.json")), []
    except FileNotFoundError:
        return None, [f"{url} is missing"]
    except fs.TooLarge:
        return None, [fs.redact(f"{url} holds more than {limit:,} bytes, more than this release's _info.json can "
                                "(not read further): `imnet build` audits again and writes it anew")]
    except ValueError as e:  # not JSON
        return None, [f"{url} unreadable: {e}"]
