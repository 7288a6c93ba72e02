"""`imnet lineage KEY`'s data (issue 25): where one raw image came from and, in every release whose
plan holds it, where it went. The command (cli) prints these rows; nothing here prints."""

from __future__ import annotations

from imnet_assets.storage.member_names import member_key, raw_name, stem_keys

NO_KEYS = ("\x7f", "")  # a range that holds no key (its lowest above its highest)


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
    found = cat.dicts("lineage", {"keys": [key], "by_name": False, "name": key})
    if found:
        return found
    keys = [k for (k,) in cat.rows("lineage_keys", {"name": key, **_ranges(name_ranges(key))})]
    return cat.dicts("lineage", {"keys": keys, "by_name": True, "name": key}) if keys else []


def name_ranges(name: str) -> list[tuple[str, str]]:
    """The keys a raw member found by `name` can have (sql/lineage_keys.sql), at most three
    ranges (lowest, highest): the key of a member named `name` (exact: the digest of a sanitized
    one is of the whole name); for a name with no folder in it, the keys of a member of that last
    path part or stem in any folder (storage/member_names.py stem_keys: a sanitized stem's keys
    differ only in the digest of the whole name, which this name does not give). A member whose
    name is refused is keyed by where it is: the query finds it among the excluded rows."""
    raw = raw_name(name)
    ranges = []
    exact = member_key(raw)[0]
    if exact is not None:
        ranges.append((exact, exact))
    if "/" not in raw:
        for stem in (raw.rsplit(".", 1)[0] if "." in raw else raw, raw):
            keys = stem_keys(stem)
            if keys is not None and keys not in ranges:
                ranges.append(keys)
    return ranges


def _ranges(ranges: list[tuple[str, str]]) -> dict[str, str]:
    padded = (ranges + [NO_KEYS] * 3)[:3]
    return {f"{end}{n}": r[i] for n, r in enumerate(padded, 1) for i, end in enumerate(("lo", "hi"))}


def releases_holding(rows: list[dict]) -> dict[str, list[str]]:
    """Release name -> the shards holding the image (from lineage_rows), releases in name order."""
    held: dict[str, list[str]] = {}
    for row in rows:
        if row.get("release") is not None and row.get("shard") is not None:
            held.setdefault(row["release"], []).append(row["shard"])
    return dict(sorted(held.items()))
