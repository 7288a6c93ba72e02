"""The eval-overlap matching (sql/overlaps_settle.sql) at size: N raw images against M eval images.

A synthetic catalog: N kept `images` rows with random 64-bit hashes (pHash values are close to
uniform: 32 of 64 bits set, at the median) and sha256 stand-ins with a few exact duplicates, and M
eval hashes of which `--planted` are copies of raw hashes with 0..7 bits flipped. Times the whole
settle step (undo, duplicate_of, band join, exclusions) and checks that every planted copy is found.

    python bench/decontam_scale.py                  # 2M raw x 50k eval (the 2-vCPU machine)
    python bench/decontam_scale.py --rows 13151276  # the real release's size
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from imnet_assets.image.perceptual import NEAR_DUPLICATE_BITS
from imnet_assets.storage.catalog import Catalog


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--eval", type=int, default=50_000)
    ap.add_argument("--planted", type=int, default=1_000)
    ap.add_argument("--work", default=tempfile.gettempdir())
    args = ap.parse_args()
    path = os.path.join(args.work, f"decontam-scale-{os.getpid()}.duckdb")
    try:
        with Catalog(path) as cat:
            con = cat.con
            t0 = time.perf_counter()
            # random 64-bit hashes from DuckDB's hash(); every 1000th image repeats an earlier one's bytes
            con.execute(f"""
                INSERT INTO images (key, wnid, tar, "offset", size, sha256, status, phash)
                SELECT 'n' || lpad((i // 700)::VARCHAR, 8, '0') || '_' || i, 'n' || lpad((i // 700)::VARCHAR, 8, '0'),
                       'n' || lpad((i // 700)::VARCHAR, 8, '0') || '.tar', i, 1000,
                       md5(CASE WHEN i % 1000 = 999 THEN i - 1 ELSE i END::VARCHAR), 'kept',
                       (hash(i)::HUGEINT - 9223372036854775808)::BIGINT
                FROM range({args.rows}) t(i)""")
            # planted copies: raw hash j * step with (j % 8) bits flipped; the rest unrelated
            step = max(1, args.rows // max(1, args.planted))
            con.execute(f"""
                INSERT INTO eval_images
                SELECT 'val/' || j || '.JPEG', md5('eval' || j),
                       CASE WHEN j < {args.planted} THEN
                           xor((hash(j * {step})::HUGEINT - 9223372036854775808)::BIGINT,
                               CASE WHEN j % 8 = 0 THEN 0
                                    ELSE ((1::HUGEINT << (j % 8)) - 1)::BIGINT << ((j * 7) % 56) END)
                       ELSE (hash(1000000000000 + j)::HUGEINT - 9223372036854775808)::BIGINT END
                FROM range({args.eval}) t(j)""")
            print(f"catalog: {args.rows:,} raw, {args.eval:,} eval ({args.planted:,} planted copies) "
                  f"in {time.perf_counter() - t0:.1f} s")
            for round_ in range(2):
                t0, c0 = time.perf_counter(), time.process_time()
                cat.run("overlaps_settle", {"threshold": NEAR_DUPLICATE_BITS, "radius": NEAR_DUPLICATE_BITS // 4,
                                            "dedup": "off"})
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                found = con.execute("SELECT count(*) FROM eval_overlaps").fetchone()[0]
                dups = con.execute("SELECT count(*) FROM images WHERE duplicate_of IS NOT NULL").fetchone()[0]
                print(f"settle round {round_ + 1}: {wall:.1f} s wall, {cpu:.1f} s CPU; eval overlaps {found:,} "
                      f"(planted {args.planted:,}); duplicate_of set on {dups:,}")
            t0 = time.perf_counter()
            cands = con.execute(f"""
                WITH e AS (SELECT (phash >> (16 * b)) & 65535 AS v, b FROM eval_images, range(4) r(b)),
                     k AS (SELECT v, b FROM e UNION ALL SELECT xor(v, (1::BIGINT) << f), b FROM e, range(16) x(f)
                           WHERE {NEAR_DUPLICATE_BITS // 4} >= 1)
                SELECT count(*) FROM (SELECT (phash >> (16 * b)) & 65535 AS v, b FROM images, range(4) r(b)) i
                JOIN k USING (v, b)""").fetchone()[0]
            print(f"candidate pairs the band join checks: {cands:,} ({cands / (args.rows * args.eval):.2e} of all "
                  f"pairs; counted in {time.perf_counter() - t0:.1f} s)")
    finally:
        for suffix in ("", ".wal"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)


if __name__ == "__main__":
    main()
