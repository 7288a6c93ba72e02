"""`imnet lineage KEY`'s data (issue 25): where one raw image came from and, in every release whose
plan holds it, where it went. The command (cli) prints these rows; nothing here prints."""

from __future__ import annotations


def lineage_rows(cat, key: str) -> list[dict]:
    """One row per (raw member named `key`, release whose plan holds it), sql/lineage.sql's columns:
    the source (key, wnid, tar, member, offset, size, sha256, status, reason) and, for each release
    (`release`: its name, '' for the default release; None when no release plans the image, e.g. an
    excluded one), its label, shard, plan position, position in the shard tar, the shard's path
    under that release's out root, run id, code version, written_at, the stored image's sha256 and
    whether it was repaired. `cat`: a catalog opened for reading (storage/catalog.py open_reader).

    When no image has that key, `key` is looked up as a raw member's name or stem (its name less
    the extension, as in `n01440764_1.5`): a stem that is not a safe key as it stands was kept under
    a sanitized one (storage/member_names.py member_key), and its rows' `key` says which."""
    return cat.dicts("lineage", {"key": key, "by_name": False}) or cat.dicts("lineage", {"key": key, "by_name": True})


def releases_holding(rows: list[dict]) -> dict[str, list[str]]:
    """Release name -> the shards holding the image (from lineage_rows), releases in name order."""
    held: dict[str, list[str]] = {}
    for row in rows:
        if row.get("release") is not None and row.get("shard") is not None:
            held.setdefault(row["release"], []).append(row["shard"])
    return dict(sorted(held.items()))
