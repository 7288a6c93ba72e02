"""Issue 26: per image, where a shard run's CPU goes, against the bare Pillow chain in the same run.

    .venv/bin/python bench/worker_profile.py [--work /tmp/imnet-bench] [--images 300] [--rounds 2]
                                             [--workers 2] [--skip-runs]

Process CPU time only (time.process_time in this process, /proc/<pid>/stat of the pool's
workers), never wall time: the machine is shared, and what counts is the ratio of two figures
measured in the same run, alternating so that a busy machine hurts both sides alike.

1. Parts, one image at a time in this process (single-threaded, so process time is the part's
   CPU), each part the very function a shard run calls on that image:
   - source read (fs.RangeReader.read, as the encode workers' reader threads do) and its sha256;
   - the bare chain (`encode.bare_chain`: open, draft, RGB, resize, WebP; nothing else);
   - the project's chain (`encode.encode_image`: the same plus the decoding rules, the colour
     rules and the EXIF / ICC kept), and its excess over the bare chain;
   - the sha256 of the WebP, the sample's tar members (`sample_tar.sample_bytes`: JSON, pax/ustar
     headers, padding) and their digest (`outroot.sample_digest`, what the read-back checks);
   - the sampled decode check (`webp_output.webp_problem`: a full decode for every
     IMNET_CHECK_DECODE_EVERY-th and every repaired sample, the RIFF header for the others);
   - the transport: pickling of the job (its share per image) and of the reply, both ends;
   - the shard check's read-back of the committed tar (`verify.CheckChunkJob`, in the workers);
   - the coordinator's write of the sample bytes (hashing them as they pass).
2. Real shard runs (`shard.build_shard`) over the same images, alternating with the bare chain:
   with 1 worker and with --workers pool workers (their CPU from /proc, and the coordinator's:
   IMNET_WORKERS=1 is a pool of one worker too, so "1 worker" is that worker's CPU plus the
   coordinator's, the whole shard run). "anything else" is what the real run spent beyond the sum
   of the parts (threads, queues, the dispatcher, the interpreter's own overhead).

Printed: ms of CPU per image and the ratio to the bare chain of the same round (medians over
rounds, ranges in brackets).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpuload import proc_cpu  # noqa: E402
from encode import SHARD, release  # noqa: E402
from report import print_table  # noqa: E402

from imnet_assets.image.encode import EncodeSettings, bare_chain, encode_image
from imnet_assets.image.webp_output import webp_problem
from imnet_assets.release.outroot import read_manifest, sample_digest
from imnet_assets.release.plan import read_slice
from imnet_assets.release.sample_tar import sample_bytes
from imnet_assets.release.verify import CheckChunkJob
from imnet_assets.runtime import workerpool
from imnet_assets.stages.shard import build_shard
from imnet_assets.stages.shard_jobs import EncodeJob
from imnet_assets.storage import fs
from imnet_assets.storage.rawfolders import source_location


def parts_round(settings, enc: EncodeSettings, decode_every: int) -> dict[str, float]:
    """CPU seconds of each part over every image of the shard, one image at a time."""
    rows, _ = read_slice(settings.out_root, SHARD)
    cpu: dict[str, float] = {}
    reader = fs.RangeReader()
    clock = time.process_time

    def add(name: str, t0: float) -> float:
        t1 = clock()
        cpu[name] = cpu.get(name, 0.0) + (t1 - t0)
        return t1

    replies = []
    jobs = [EncodeJob(settings.raw_root, rows[i:i + 8], enc, decode_every) for i in range(0, len(rows), 8)]
    bare_first = True
    for row in rows:
        t = clock()
        url, offset = source_location(settings.raw_root, row.tar, row.member, row.offset)
        data = reader.read(url, offset, row.size)
        t = add("source read", t)
        ok = hashlib.sha256(data).hexdigest() == row.sha256
        t = add("sha256 of the source", t)
        assert ok
        # the two chains alternate, image by image: neither always finds the caches warm
        for which in (("bare", "chain") if bare_first else ("chain", "bare")):
            if which == "bare":
                bare_chain(data, enc)
                t = add("bare chain", t)
            else:
                e = encode_image(data, enc)
                t = add("project chain (encode_image)", t)
        bare_first = not bare_first
        sha = hashlib.sha256(e.webp).hexdigest()
        t = add("sha256 of the WebP", t)
        blob = sample_bytes(row, e, enc.alt_labels)
        t = add("tar members (JSON, headers, padding)", t)
        decode = e.repaired or (decode_every > 0 and row.position % decode_every == 0)
        problem = webp_problem(e.webp, (e.width, e.height), decode)
        t = add("decode check (every 16th, repaired)" if decode else "header check (the others)", t)
        blob_sha = sample_digest(blob, bytes.fromhex(sha), len(e.webp))
        t = add("digest of the sample bytes (outroot.sample_digest)", t)
        assert not problem and sha and blob_sha
        record = {"key": row.key, "position": row.position, "width": e.width, "height": e.height,
                  "orig_width": e.orig_width, "orig_height": e.orig_height, "webp_bytes": len(e.webp),
                  "webp_sha256": sha, "repaired": e.repaired}
        replies.append(("ok", blob, record, problem, blob_sha, False))  # as shard_jobs.prepare_sample replies
    # transport: per job of 8, the job (coordinator dumps, worker loads) and the reply (worker
    # dumps, coordinator loads), shared out per image
    t = clock()
    sent = [pickle.dumps(j, protocol=5) for j in jobs]
    t = add("pickle: jobs, coordinator side", t)
    [pickle.loads(s) for s in sent]
    t = add("pickle: jobs, worker side", t)
    out = [pickle.dumps((True, replies[i:i + 8]), protocol=5) for i in range(0, len(replies), 8)]
    t = add("pickle: replies, worker side", t)
    [pickle.loads(o) for o in out]
    t = add("pickle: replies, coordinator side", t)
    # the coordinator's write, hashing as it goes (shard._HashingWriter), to a scratch file
    scratch = Path(settings.out_root) / "_profile.scratch"
    sha = hashlib.sha256()
    with open(scratch, "wb") as f:
        for r in replies:
            f.write(r[1])
            sha.update(r[1])
    add("coordinator: write + sha256 of the tar", t)
    scratch.unlink()
    # the shard check's read-back of the committed shard (built by the real runs), as one chunk
    manifest = read_manifest(settings.out_root, SHARD)
    by_key = {r.key: r for r in rows}
    at, expected = 0, []
    for s, r in zip(manifest["samples"], replies):
        row = by_key[s["key"]]
        expected.append(dict(s, offset=at, sample_size=len(r[1]), sample_digest=r[4], label=row.label,
                             wnid=row.wnid, source_sha256=row.sha256))
        at += len(r[1])
    flags = [False] * len(expected)  # the workers decoded the sampled ones; the check does not again
    url = fs.join(settings.out_root, settings.shard_name(SHARD))
    t = clock()
    keys, problems, intact = CheckChunkJob(url, 0, None, expected, flags).run()
    add("shard check: read-back (hashes, tar walk, headers, JSON)", t)
    if problems or not intact:
        raise SystemExit(f"the read-back disagrees with this profile: {problems[:3]} intact={intact}")
    reader.close()
    return cpu


def real_run(settings, enc: EncodeSettings, workers: int, decode_every: int) -> dict[str, float]:
    """One build_shard: CPU seconds of the encode workers and of the coordinator."""
    pool = workerpool.shared_pool(workers)
    deadline = time.monotonic() + 60
    while len(pool.pids()) != workers and time.monotonic() < deadline:  # started, or resized to `workers`
        time.sleep(0.05)
    pids = pool.pids()
    w0 = {p: proc_cpu(p) for p in pids}
    c0 = time.process_time()
    res = build_shard(out_root=settings.out_root, raw_root=settings.raw_root, shard_key=SHARD,
                      shard_name=settings.shard_name(SHARD), settings=enc, workers=workers, run_id="profile",
                      decode_every=decode_every)
    coord = time.process_time() - c0
    if res.problems:
        raise SystemExit(f"the shard check failed: {res.problems[:3]}")
    if pool.pids() != pids:
        raise SystemExit("a worker was replaced during the run: its CPU is not accounted")
    return {"workers": sum(proc_cpu(p) - w0[p] for p in pids), "coordinator": coord}


def bare_round(sources: list[bytes], enc: EncodeSettings) -> float:
    t = time.process_time()
    for d in sources:
        bare_chain(d, enc)
    return time.process_time() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/imnet-bench"))
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--decode-every", type=int, default=16)
    p.add_argument("--skip-runs", action="store_true", help="parts only, no real shard runs")
    args = p.parse_args()
    enc = EncodeSettings()
    settings = release(args.work.resolve(), args.images, enc.quality, enc.method)
    rows, _ = read_slice(settings.out_root, SHARD)
    n = len(rows)
    with fs.RangeReader() as reader:
        sources = [reader.read(*source_location(settings.raw_root, r.tar, r.member, r.offset), r.size) for r in rows]
    print(f"{n} images, {args.rounds} rounds, {os.cpu_count()} CPUs, pool of {args.workers}", flush=True)
    real_run(settings, enc, 1, args.decode_every)  # warm up (and the shard the read-back reads)
    if not args.skip_runs and args.workers > 1:
        real_run(settings, enc, args.workers, args.decode_every)
    parts: list[dict[str, float]] = []
    bare: list[float] = []
    runs: list[dict[str, float]] = []
    for r in range(args.rounds):
        steps = ["parts", "bare", "w1", "wn"] if not args.skip_runs else ["parts"]
        if r % 2:
            steps.reverse()
        got: dict[str, float] = {}
        for step in steps:
            if step == "parts":
                parts.append(parts_round(settings, enc, args.decode_every))
            elif step == "bare":
                bare.append(bare_round(sources, enc))
            elif step == "w1":
                w1 = real_run(settings, enc, 1, args.decode_every)
                got["1 worker: the worker + the coordinator"] = w1["workers"] + w1["coordinator"]
                got["1 worker: the coordinator"] = w1["coordinator"]
            elif args.workers > 1:
                wn = real_run(settings, enc, args.workers, args.decode_every)
                got[f"{args.workers} workers: the workers"] = wn["workers"]
                got[f"{args.workers} workers: the coordinator"] = wn["coordinator"]
        if got:
            runs.append(got)
        print(f"  round {r + 1}: bare chain (in the parts) {parts[-1]['bare chain'] * 1e3 / n:.2f} ms/image"
              + "".join(f", {k} {v * 1e3 / n:.2f}" for k, v in got.items()), flush=True)

    def row(name: str, values: list[float], bases: list[float]) -> list[str]:
        ms = [v * 1e3 / n for v in values]
        ratio = [v / b for v, b in zip(values, bases)]
        return [name, f"{statistics.median(ms):.3f} ms ({min(ms):.3f}-{max(ms):.3f})",
                f"{statistics.median(ratio):.4f} ({min(ratio):.4f}-{max(ratio):.4f})", ""]

    base = [p["bare chain"] for p in parts]
    names = list(dict.fromkeys(k for p in parts for k in p))
    table = [row(k, [p.get(k, 0.0) for p in parts], base) for k in names]
    table.append(row("  project chain - bare chain", [p["project chain (encode_image)"] - p["bare chain"]
                                                     for p in parts], base))
    worker_side = [k for k in names if k not in ("bare chain",) and "coordinator" not in k]
    per_worker = [sum(p.get(k, 0.0) for k in worker_side) for p in parts]
    table.append(row("  sum of the worker-side parts (project chain, read, hashes, pack, checks, pickles)",
                     per_worker, base))
    table.append(row("  same, besides the project chain", [w - p["project chain (encode_image)"]
                                                          for w, p in zip(per_worker, parts)], base))
    if runs:
        # the real runs against the bare chain measured on its own (same rounds)
        for k in runs[0]:
            table.append(row(f"real run, {k}", [g[k] for g in runs], bare))
        wk = f"{args.workers} workers: the workers"
        if wk in runs[0]:
            table.append(row(f"  {wk} - the parts' sum (anything else)",
                             [g[wk] - w for g, w in zip(runs, per_worker)], bare))
        table.append(row("bare chain alone (the real runs' reference)", bare, bare))
    title = (f"CPU per image of a shard run's parts ({n} images, IMNET_CHECK_DECODE_EVERY={args.decode_every}); "
             "ratio: against the bare chain of the same round")
    print(f"\n$ {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print_table(title, table, ["part", "ms of CPU per image", "/ bare chain", ""])


if __name__ == "__main__":
    main()
