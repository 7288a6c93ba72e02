"""`imnet lineage NAME` on a catalog at size: the lookup of a raw member's name or stem (release/lineage.py)
against the query it replaced, which matched every `images` row's member name with regexes (a full
scan: 13M rows at the real size), on the same catalog, alternating, with the answers compared.

    .venv/bin/python bench/lineage_lookup.py [--work /tmp/imnet-bench-lineage] [--rows 4000000]
                                             [--synsets 2000] [--rounds 5]

The catalog: --rows images over --synsets synset tars, loaded tar by tar as the index loads them
(keys `<wnid>_<n>`, members `<key>.JPEG`; 2 in 1,000 excluded, spread over the tars), each kept one planned in the default release, its shard_samples
and 1,024 shards rows; plus the hostile names the lookup must still find (a stem with a dot in it, a
name too long for a key, a folder's file, a name refused as unsafe: its row keyed by its offset).
Generated once under --work (~20 s at 4M rows) and reused. Each lookup is timed on an open reader,
page cache warm (the command's own open, and its integrity read of the whole catalog, come before
it: storage/catalog.py check_intact).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import print_table, spread  # noqa: E402

# Bench-only SQL: synthetic data, tar by tar (row i: synset i // per, image i % per + 1).
GEN_IMAGES = """
INSERT INTO images BY NAME
WITH r AS (SELECT i, i // $per AS s, i % $per + 1 AS n FROM range($rows) t(i))
SELECT 'n' || lpad((1440764 + s * 712)::VARCHAR, 8, '0') || '_' || n AS key,
       'n' || lpad((1440764 + s * 712)::VARCHAR, 8, '0') AS wnid,
       'n' || lpad((1440764 + s * 712)::VARCHAR, 8, '0') || '.tar' AS tar,
       'n' || lpad((1440764 + s * 712)::VARCHAR, 8, '0') || '_' || n || '.JPEG' AS member,
       512 + (n - 1) * 180736 AS "offset", 110000 AS size, sha256(i::VARCHAR) AS sha256, 500 AS width,
       375 AS height, 'JPEG' AS format, 'RGB' AS mode,
       CASE WHEN hash(i) % 500 = 0 THEN 'excluded' ELSE 'kept' END AS status,
       CASE WHEN hash(i) % 500 = 0 THEN 'too small: 24x18 (min side 32)' END AS reason
FROM r
"""
GEN_PLAN = """
INSERT INTO plan BY NAME
SELECT key, lpad((hash(key) % 1024)::VARCHAR, 4, '0') AS shard, (row_number() OVER ())::INTEGER AS position,
       wnid, 0 AS label, tar, member, "offset", size, sha256, width, height, false AS needs_repair, '' AS release
FROM images WHERE status = 'kept';
INSERT INTO shard_samples BY NAME
SELECT key, shard, position, width, height, width AS orig_width, height AS orig_height, size AS webp_bytes,
       sha256 AS webp_sha256, false AS repaired, '' AS release FROM plan;
INSERT INTO shards BY NAME
SELECT shard, 'imagenet12k-train-' || shard || '.tar' AS path, count(*)::INTEGER AS num_samples,
       'bench' AS run_id, 'bench' AS code_version, '2026-01-01T00:00:00Z' AS written_at, '' AS release
FROM plan GROUP BY shard
"""
# sql/lineage.sql as it was before, for comparison: by key, else every member name matched by regexes.
OLD_LINEAGE = """
SELECT i.key, i.wnid, i.tar, i.member, i."offset", i.size, i.sha256, i.status, i.reason,
       p.release, p.label, p.shard, p.position AS plan_position,
       ss.position - (SELECT count(*) FROM shard_exclusions e
                      WHERE e.release = p.release AND e.shard = p.shard AND e.position < ss.position)
           AS position,
       s.path, s.run_id, s.code_version, s.written_at, ss.webp_sha256, ss.repaired
FROM images i
LEFT JOIN plan p ON p.key = i.key AND p.tar = i.tar AND p."offset" = i."offset"
LEFT JOIN shard_samples ss ON ss.release = p.release AND ss.key = i.key AND ss.shard = p.shard
LEFT JOIN shards s ON s.release = p.release AND s.shard = p.shard
WHERE CASE WHEN $by_name
           THEN i.member = $key OR regexp_extract(i.member, '[^/]*$') = $key
                OR regexp_replace(regexp_extract(i.member, '[^/]*$'), '\\.[^.]*$', '') = $key
           ELSE i.key = $key END
ORDER BY i.status DESC, i.tar, i."offset", p.release
"""
WNID = "n01440764"  # synset 0
# Raw names beside the generated ones: (tar, member as the tar holds it, kept?)
HOSTILE = [
    (f"{WNID}.tar", f"{WNID}_1.5.JPEG", True),  # a dot in the stem: a sanitized key with a digest
    (f"{WNID}.tar", f"{WNID}_{'x' * 70}.JPEG", True),  # too long for a key: cut, with a digest
    (f"{WNID}/", f"sub/{WNID}_x77.JPEG", True),  # a folder's file in a subfolder
    (f"{WNID}.tar", f"../{WNID}_15.JPEG", False),  # unsafe: refused, keyed by its offset
]


def generate(cat, rows: int, synsets: int) -> bool:
    from imnet_assets.storage.member_names import member_key

    if cat.con.execute("SELECT count(*) FROM images").fetchone()[0] == rows + len(HOSTILE):
        return False
    cat.con.execute("DELETE FROM images; DELETE FROM plan; DELETE FROM shard_samples; DELETE FROM shards")
    cat.con.execute(GEN_IMAGES, {"rows": rows, "per": rows // synsets})
    for n, (tar, member, kept) in enumerate(HOSTILE):
        offset = 10 ** 12 + n * 512
        key = member_key(member)[0] or f"{WNID}__member_{offset}"
        cat.con.execute("INSERT INTO images BY NAME SELECT ? AS key, ? AS wnid, ? AS tar, ? AS member, ? AS \"offset\", "
                        "1000 AS size, 'kept' AS status, ? AS reason",
                        [key, WNID, tar, member, offset, None if kept else "unsafe member name"])
        if not kept:
            cat.con.execute("UPDATE images SET status = 'excluded' WHERE key = ?", [key])
    for stmt in GEN_PLAN.split(";"):
        cat.con.execute(stmt)
    cat.con.execute("CHECKPOINT")
    return True


def lookups(rows: int, synsets: int) -> list[tuple[str, str]]:
    last = f"n{1440764 + (synsets - 1) * 712:08d}_{rows // synsets}"
    return [
        ("a key", f"{WNID}_10"),
        ("a member name", f"{WNID}_10.JPEG"),
        ("a member name, last tar", f"{last}.JPEG"),
        ("a stem with a dot", f"{WNID}_1.5"),
        ("a member name with a dot", f"{WNID}_1.5.JPEG"),
        ("a name too long for a key", f"{WNID}_{'x' * 70}.JPEG"),
        ("a folder's file, by its path", f"sub/{WNID}_x77.JPEG"),
        ("a folder's file, by its name", f"{WNID}_x77.JPEG"),
        ("an unsafe name", f"../{WNID}_15.JPEG"),
        ("nothing of that name", "n00000000_0.JPEG"),
    ]


def old_lineage(cat, name: str) -> list[dict]:
    for by_name in (False, True):
        cur = cat.con.execute(OLD_LINEAGE, {"key": name, "by_name": by_name})
        cols = [d[0] for d in cur.description]
        found = [dict(zip(cols, r)) for r in cur.fetchall()]
        if found:
            return found
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/imnet-bench-lineage"))
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--synsets", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from imnet_assets.release.lineage import lineage_rows
    from imnet_assets.storage.catalog import Catalog

    args.work.mkdir(parents=True, exist_ok=True)
    path = str(args.work / "catalog.duckdb")
    started = time.perf_counter()
    with Catalog(path) as cat:
        made = generate(cat, args.rows, args.synsets)
    print(f"catalog {path}: {'generated in %.1f s' % (time.perf_counter() - started) if made else 'reused'}")
    table, times = [], {}
    with Catalog(path, read_only=True) as cat:
        for label, name in lookups(args.rows, args.synsets):
            old_t, new_t = [], []
            for _ in range(args.rounds):
                t = time.perf_counter()
                old = old_lineage(cat, name)
                old_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                new = lineage_rows(cat, name)
                new_t.append(time.perf_counter() - t)
            same = old == new
            times[label] = (statistics.median(old_t), statistics.median(new_t))
            table.append([label, name if len(name) < 32 else name[:29] + "...", str(len(new)),
                          spread([x * 1000 for x in old_t], 0), spread([x * 1000 for x in new_t], 0),
                          f"{times[label][0] / times[label][1]:.1f}x", "yes" if same else "NO"])
    print_table(f"imnet lineage NAME on {args.rows:,} images ({args.synsets:,} tars), ms, median (range) "
                f"of {args.rounds}", table, ["lookup", "name", "rows", "regex scan", "now", "speed-up", "same rows"])
    print("\n" + " ".join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
