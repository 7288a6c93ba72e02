"""The index's exact dedup (stages/decontam.py settle_keys_and_copies) under a memory limit: peak RSS and time.

A synthetic catalog: N kept `images` rows (one in 50 sharing its bytes with the row before, one in 100
another file under the row before's key). The settle then runs in a fresh child process three ways:
under DuckDB's default limit (80% of the host's RAM: what the catalog had before it set one), under
the limit the catalog sets as it opens now (storage/catalog.py memory_limit_bytes: half the memory
this process may hold, its cgroup's limit included), and under `--limit` MiB, which is far below
what the settle uses, so it spills to the folder beside the catalog (catalog.spill_folder). Each
line: the child's peak RSS (ru_maxrss), the settle's seconds, whether DuckDB spilled, and the rows it
excluded (the same for all three: a limit changes where DuckDB works, never the answer).

    python bench/catalog_memory.py                  # 2M rows (the 2-vCPU machine: ~1 min)
    python bench/catalog_memory.py --rows 13151276  # the real release's size
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from imnet_assets.storage.catalog import Catalog, memory_limit_bytes, spill_folder

# bench-only SQL: the synthetic rows
GEN_IMAGES = """
INSERT INTO images (key, wnid, tar, member, "offset", size, sha256, status)
SELECT 'n' || lpad(((CASE WHEN i % 100 = 98 THEN i - 1 ELSE i END) // 700)::VARCHAR, 8, '0') || '_'
           || (CASE WHEN i % 100 = 98 THEN i - 1 ELSE i END),
       'n' || lpad((i // 700)::VARCHAR, 8, '0'), 'n' || lpad((i // 700)::VARCHAR, 8, '0') || '.tar',
       'm' || i || '.JPEG', i * 1024, 1000, sha256((CASE WHEN i % 50 = 49 THEN i - 1 ELSE i END)::VARCHAR), 'kept'
FROM range($rows) t(i)
"""
EXCLUDED = "SELECT count(*) FROM images WHERE status = 'excluded'"


def child(path: str, limit: str) -> None:
    from imnet_assets.stages.decontam import settle_keys_and_copies

    with Catalog(path) as cat:
        if limit == "duckdb-default":
            cat.con.execute("RESET memory_limit")
        elif limit != "catalog":
            cat.run("catalog_memory", {"memory_limit": f"{limit}MiB"})
        setting = cat.one("catalog_settings")["memory_limit"]
        started = time.perf_counter()
        settle_keys_and_copies(cat)
        seconds = time.perf_counter() - started
        spilled = os.path.isdir(spill_folder(path))  # made by DuckDB the first time it spills
        excluded = cat.con.execute(EXCLUDED).fetchone()[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"limit": limit, "setting": setting, "seconds": round(seconds, 1), "peak_rss": peak,
                      "spilled": spilled, "excluded": excluded}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--limit", type=int, default=64, help="MiB: the small limit the third run holds DuckDB to")
    ap.add_argument("--work", default=tempfile.gettempdir())
    ap.add_argument("--child", nargs=2, metavar=("CATALOG", "LIMIT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    path = os.path.join(args.work, f"catalog-memory-{os.getpid()}.duckdb")
    try:
        started = time.perf_counter()
        with Catalog(path) as cat:
            cat.con.execute(GEN_IMAGES, {"rows": args.rows})
            cat.con.execute("CHECKPOINT")
        print(f"{args.rows:,} synthetic rows in {time.perf_counter() - started:.1f}s; the catalog's limit here: "
              f"{memory_limit_bytes() / 2**30:.1f} GiB", flush=True)
        for limit in ("duckdb-default", "catalog", str(args.limit)):
            # each in a fresh process: ru_maxrss is a process's peak; each run settles the same rows again
            done = subprocess.run([sys.executable, __file__, "--child", path, limit], capture_output=True, text=True)
            if done.returncode:
                print(f"limit {limit}: failed: {done.stderr.strip().splitlines()[-3:]}", flush=True)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"limit {r['limit']:>14} ({r['setting']:>9}): peak RSS {r['peak_rss'] / 2**20:7.0f} MiB, "
                  f"{r['seconds']:5.1f}s, spilled {r['spilled']}, {r['excluded']:,} excluded", flush=True)
    finally:
        for leftover in (path, f"{path}.wal"):
            if os.path.exists(leftover):
                os.unlink(leftover)


if __name__ == "__main__":
    main()
