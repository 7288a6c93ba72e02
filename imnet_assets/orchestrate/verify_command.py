"""`imnet verify`: every selected release's shards re-read and checked against the catalog, and
each shard's manifest against its commit record or the catalog (in a worker pool of the command:
release/verify_runs.py), with `_info.json`, stray shard files and the
conservation of every raw member; a line per problem, progress as it goes, a summary per release."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator

from imnet_assets.orchestrate.interrupts import first_done
from imnet_assets.settings import Settings

VERIFY_SHOWN = 20  # problems printed per shard; the rest are counted
PROGRESS_EVERY_S = 10.0
# exit statuses: every shard ok; something FAILED (damage: the next `imnet build` rewrites it); nothing
# failed but some shards were NOT CHECKED (no verdict: run verify again). 2 (usage, configuration) and
# 130 (interrupted) are the CLI's (cli.py).
OK, FAILED, NOT_CHECKED = 0, 1, 3


def _catalog_rows(path: str, shards: list[dict], release: str = "") -> Iterator[tuple[dict, list[tuple]]]:
    """Each shard's catalog record and its `shard_samples` rows (verify.CATALOG_COLUMNS), in the
    order of `shards`, with memory bounded whatever the release's size: one query (its join and
    sort held to verify_memory's limit by DuckDB, spilling beyond) streams every selected shard's
    rows, in shard order, into a local spool file, one compressed record per shard; the catalog is
    then closed (a writer such as `imnet build` waits for a reader: it waits for this pass only,
    not for the hour a full verify reads shards), and shards are handed out from the spool, one
    at a time. While a writer holds the catalog, this waits for it, saying so."""
    import pickle
    import tempfile
    import zlib

    from imnet_assets.storage.catalog import held_to, open_reader

    with tempfile.TemporaryFile(prefix="imnet-verify-") as spool:
        where: dict[str, tuple[int, int]] = {}

        def keep(shard: str | None, rows: list[tuple]) -> None:
            if shard is not None:
                data = zlib.compress(pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL), 1)
                where[shard] = (spool.tell(), len(data))
                spool.write(data)

        with open_reader(path) as cat:
            cat.run("verify_memory", {"memory_limit": held_to(512 << 20)})
            cur = cat.run("verify_samples", {"shards": [sh["shard"] for sh in shards], "release": release})
            shard, rows = None, []
            while chunk := cur.fetchmany(8192):
                for row in chunk:
                    if row[0] != shard:
                        keep(shard, rows)
                        shard, rows = row[0], []
                    rows.append(row[1:])
            keep(shard, rows)
            del rows, chunk
        for sh in shards:
            if sh["shard"] not in where:
                yield sh, []
                continue
            offset, size = where.pop(sh["shard"])
            spool.seek(offset)
            yield sh, pickle.loads(zlib.decompress(spool.read(size)))


class _Progress:
    """A progress line every 5% of the shards or every PROGRESS_EVERY_S, whichever comes first: the
    shards done with (checked or not), those that failed, and apart from them those not checked (no
    verdict: not failed, not ok either)."""

    def __init__(self, total: int, total_bytes: int):
        self.total, self.total_bytes = total, total_bytes
        self.done = self.failed = self.lost = self.bytes = 0
        self.started = self.last = time.perf_counter()
        self.step = max(1, total // 20)

    def add(self, nbytes: int, failed: bool, lost: bool = False) -> None:
        self.done += 1
        self.failed += failed
        self.lost += lost and not failed
        self.bytes += nbytes
        now = time.perf_counter()
        if self.done % self.step == 0 or self.done == self.total or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            elapsed = max(now - self.started, 1e-9)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate else 0
            print(f"verify: {self.done}/{self.total} shards done ({self.failed} failed"
                  + (f", {self.lost} not checked" if self.lost else "") + f"), {rate:.1f} shards/s, "
                  f"{self.bytes / 1e6 / elapsed:.0f} MB/s, eta {eta:.0f}s", flush=True)


def _verify_info(s: Settings, shards: list[dict]) -> list[str]:
    """`_info.json` is exactly the document the catalog's shards give: the same shards, in order,
    in the same splits, with their sample counts and totals (the audit's check, stages.audit.check_info,
    with the catalog's counts)."""
    from imnet_assets.stages.audit import check_info

    lengths = {sh["shard"]: sh["num_samples"] for sh in shards}
    if sorted(lengths) != s.partition_keys:
        return [f"the catalog records {len(lengths)} shards, the plan under {s.out_root} has "
                f"{s.num_shards}: run `imnet build`"]
    return check_info(s, lengths)


def _as_built(s: Settings) -> Settings:
    """`s` with the shard layout the out root was built with (its plan index: shard count and
    holdout), which `imnet demo` chooses itself when IMNET_NUM_SHARDS is not set."""
    import dataclasses

    from imnet_assets.release.plan import read_index

    index = read_index(s.out_root)
    if index is None:
        return s
    return dataclasses.replace(s, num_shards=index["num_shards"],
                               holdout=tuple((name, n) for name, n in index["holdout"]))


def verify(selected: list[Settings], wanted_of: Callable[[list[str]], list[str]] = list, jobs: int | None = None,
           decode: bool = False, verbose: bool = False) -> int:
    """Every release of `selected`, one after another: FAILED when any fails, else NOT_CHECKED when a
    shard of any could not be checked, else OK. `wanted_of`: the keys to
    check of a release's shard keys as built (`--shards`: cli.parse_shards; default all); `jobs`:
    processes checking shards (default IMNET_WORKERS); `decode`: also decode every stored image;
    `verbose`: a line for each shard that is ok too."""
    codes = []
    for r in selected:
        if r.release:
            print(f"release {r.release}: {r.out_root}", flush=True)
        codes.append(_verify_release(_as_built(r), wanted_of, jobs, decode, verbose))
    return FAILED if FAILED in codes else NOT_CHECKED if NOT_CHECKED in codes else OK


def _verify_release(s: Settings, wanted_of: Callable[[list[str]], list[str]], jobs: int | None, decode: bool,
                    verbose: bool) -> int:
    from imnet_assets.image.encode import CODEC_EXTENSIONS
    from imnet_assets.release.verify_runs import checked_shards
    from imnet_assets.stages.audit import conservation_problems, stray_problem, stray_shards
    from imnet_assets.storage import fs
    from imnet_assets.storage.catalog import open_reader

    wanted = wanted_of(s.partition_keys)
    every = set(wanted) == set(s.partition_keys)
    with open_reader(s.catalog) as cat:
        recorded = {sh["shard"]: sh for sh in cat.dicts("verify_shards", {"release": s.release})}
        # every raw member accounted for, per tar and per shard (the audit's blocking check too)
        conservation = conservation_problems(cat, s.release)
    if not recorded:
        print(f"no shards recorded in {s.catalog}: run `imnet build` first", file=sys.stderr)
        return FAILED
    jobs = jobs or s.workers
    unrecorded = [k for k in wanted if k not in recorded]
    shards = [recorded[k] for k in wanted if k in recorded]
    print(f"verify: {len(shards)} shards under {s.out_root} against {s.catalog}, {jobs} processes"
          + (f", decoding every {'JPEG' if s.codec == 'jpeg' else 'WebP'}" if decode else ""), flush=True)
    for k in unrecorded:
        print(f"FAIL shard {k}: not recorded in the catalog (not built, or not audited yet: run `imnet build`)")
    progress = _Progress(len(shards), sum(sh["bytes"] or 0 for sh in shards))
    tasks = ((sh, fs.join(s.out_root, sh["path"]), rows) for sh, rows in _catalog_rows(s.catalog, shards, s.release))
    bad, lost = [], []
    for done in checked_shards(jobs, tasks, decode, CODEC_EXTENSIONS[s.codec], first_done, s.out_root):
        sh, problems = done.shard, done.problems
        label = f"shard {sh['shard']} ({sh['path']})"
        if done.lost:  # its workers kept dying: no verdict, but not ok either
            print(f"NOT CHECKED {label}: {done.lost}")
            lost.append(sh["shard"])
        for p in problems[:VERIFY_SHOWN]:
            print(f"FAIL {label}: {p}")
        if len(problems) > VERIFY_SHOWN:
            print(f"FAIL {label}: ... and {len(problems) - VERIFY_SHOWN} more problems")
        for did in done.done:  # what verify did about it, not another problem (ASCII: any locale prints it)
            print(f"  -> {did}")
        if problems:
            bad.append(sh["shard"])
        elif verbose and not done.lost:
            print(f"ok   {label}: {sh['num_samples']} samples")
        progress.add(sh["bytes"] or 0, bool(problems), bool(done.lost))
    info_problems, stray = [], []
    if every:
        info_problems = _verify_info(s, list(recorded.values()))
        for p in info_problems:
            print(f"FAIL _info.json: {p}")
        stray = stray_shards(s)
        if stray:
            print(f"FAIL {stray_problem(stray)}")
    failed = len(bad) + len(unrecorded)
    for p in conservation:
        print(f"FAIL conservation: {p}")
    damaged = failed or info_problems or stray or conservation
    print(f"verify: {len(shards) - len(bad) - len(lost)} of {len(wanted)} shards ok"
          + (f", {failed} FAILED" if failed else "")
          + (f" ({', '.join(sorted(bad + unrecorded)[:16])}{' ...' if failed > 16 else ''})" if failed else "")
          + (f", {len(lost)} NOT CHECKED ({', '.join(sorted(lost)[:16])}{' ...' if len(lost) > 16 else ''})"
             if lost else "")
          + (", _info.json FAILED" if info_problems else "")
          + (f", {len(stray)} stray shard files" if stray else "")
          + (f", {len(conservation)} conservation differences" if conservation else "")
          + ("" if every else "; _info.json and stray files not checked (only some shards selected)")
          + ("" if damaged or not lost else
             f"; nothing failed, run verify again to check the {len(lost)} not checked (exit {NOT_CHECKED})"))
    return FAILED if damaged else NOT_CHECKED if lost else OK
