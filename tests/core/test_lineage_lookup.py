"""`imnet lineage NAME` by a raw member's name, last path part or stem (release/lineage.py): looked up by
the keys such a member can have (an equality, or a sanitized key's prefix) and among the rows keyed by
where they are, never by matching every row's name (13M rows at the real size: bench/lineage_lookup.py);
it finds what matching every row's name finds, for every shape of name the index keys (hostile ones too).

The rows are the index's own (stages/index.py member_record, on a real JPEG) in a real catalog."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from imnet_assets.release.lineage import lineage_rows, name_ranges
from imnet_assets.stages.index import FIELDS, member_record
from imnet_assets.storage.catalog import Catalog

WNID = "n01440764"
# Raw member names as tars (and folders, under their paths) hold them
NAMES = [
    f"{WNID}_1.JPEG", f"{WNID}_2.jpeg", f"{WNID}_3", "x.", f"sub/{WNID}_1.JPEG",  # plain; a key in two places
    f"{WNID}_1.5.JPEG", f"a/{WNID}_1.5.JPEG", f"b/c/{WNID}_1.5.JPEG",  # a dot in the stem: three keys
    f"{WNID}_{'x' * 70}.JPEG", f"d/{WNID}_{'x' * 70}.JPEG",  # too long for a key
    f"{WNID} 4.JPEG", f"{WNID}_5.tar.gz", "caf\udce9.JPEG", "new\nline.JPEG",  # sanitized
    f"../{WNID}_15.JPEG", f"/abs/{WNID}_16.JPEG", f"d/../{WNID}_17.JPEG", "back\\slash.JPEG",  # refused
    ".JPEG", "___.JPEG", f"../{WNID}_1.JPEG",  # refused, beside a plain name of the same last part
]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "JPEG")
    rows = [member_record(WNID, f"{WNID}/" if "/" in name else f"{WNID}.tar", name, 512 * (n + 1), buf.getvalue())
            for n, name in enumerate(NAMES)]
    path = str(tmp_path_factory.mktemp("lineage") / "catalog.duckdb")
    with Catalog(path) as cat:
        columns = ", ".join(f'"{f}"' for f in FIELDS)
        cat.con.executemany(f"INSERT INTO images ({columns}) VALUES ({', '.join('?' * len(FIELDS))})",
                            [tuple(r) for r in rows])
    with Catalog(path, read_only=True) as cat:
        yield cat, rows


def scanned(rows, name: str) -> set[tuple]:
    """What a look at every row finds: the rows of that key; else of that member name, last part or stem."""
    by_key = {(r.key, r.tar, r.offset) for r in rows if r.key == name}
    if by_key:
        return by_key
    found = set()
    for r in rows:
        base = r.member.rsplit("/", 1)[-1]
        if name in (r.member, base, re.sub(r"\.[^.]*$", "", base)):
            found.add((r.key, r.tar, r.offset))
    return found


def asked(rows) -> list[str]:
    names = {"n00000000_0", "n00000000_0.JPEG", "sub", "JPEG", "", "_h"}
    for r in rows:
        base = r.member.rsplit("/", 1)[-1]
        names |= {r.key, r.member, base, re.sub(r"\.[^.]*$", "", base)}
    return sorted(names)


def test_a_name_finds_what_a_look_at_every_row_finds(catalog):
    cat, rows = catalog
    assert len({r.key for r in rows if "__member_" in r.key}) == 7  # the refused names, keyed by where they are
    for name in asked(rows):
        got = {(r["key"], r["tar"], r["offset"]) for r in lineage_rows(cat, name)}
        assert got == scanned(rows, name), name


def test_the_keys_looked_at_are_those_the_name_can_have():
    # its own key; and a member whose stem it is (`n01440764_10026.JPEG.png`: sanitized for the dot)
    assert name_ranges(f"{WNID}_10026.JPEG") == [(f"{WNID}_10026", f"{WNID}_10026"),
                                                 (f"{WNID}_10026_JPEG_h", f"{WNID}_10026_JPEG_h\x7f")]
    assert name_ranges(f"sub/{WNID}_10026.JPEG") == [(f"{WNID}_10026", f"{WNID}_10026")]
    exact, *stems = name_ranges(f"{WNID}_1.5.JPEG")
    assert exact[0] == exact[1] and exact[0].startswith(f"{WNID}_1_5_h")  # its digest: of this very name
    assert stems == [(f"{WNID}_1_5_h", f"{WNID}_1_5_h\x7f"), (f"{WNID}_1_5_JPEG_h", f"{WNID}_1_5_JPEG_h\x7f")]
    assert name_ranges(f"../{WNID}_15.JPEG") == []  # refused: among the rows keyed by where they are
