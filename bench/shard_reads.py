"""The rate at which a shard run that encodes real-size sources reads them, at 20 ms per request.

    .venv/bin/python bench/shard_reads.py            # ~2-3 minutes: 400 sources, 2 workers, 2 rounds
    .venv/bin/python bench/shard_reads.py --sources 1000 --rounds 3 [--workers 2] [--latency-ms 20]
                                          [--plain-http] [--work /tmp/imnet-bench]

What runs: the project's own shard run, `shard.build_shard` with `--workers` encode workers (the
shared worker pool; each worker reads its sources by exact ranged GET through obstore, 32 ahead),
over one plan slice of photo-like JPEGs (bench/photo_release.py: `photos.make_photo` at ImageNet's
mix of sizes, quality 90, in synset tars; planned by the real catalog stages). The raw tars are on
moto's S3 server, read through tests/latency_proxy.py at `--latency-ms` per request, over HTTPS
with a private CA given in AWS_CA_BUNDLE (`--plain-http`: HTTP). moto and the proxy run in a
process of their own; the proxy answers the ranged GETs from copies it fetched from moto once
before the runs (`hold_objects`), so moto's own few hundred requests a second do not cap the rate:
the server is "S3 at 20 ms a request, with no throughput cap".

Each round runs the same shard twice, alternating which goes first: its sources on S3, and the
same sources read from local files (the encode ceiling: a run cannot read faster than it encodes).
Figures are taken over the encode phase (from the start of the run to its commit, before the
shard check), the phase in which the sources are read. Printed: the read rate on S3, the local
encode rate, their ratio (by wall time, which swings with what else runs on a shared machine, and
with that load taken out: a worker alone on its core runs at (1 - blocked share) / CPU per source,
"blocked" being the share of the phase its encoding thread neither ran nor waited for a core, from
/proc/<pid>/task/<pid>/schedstat: waiting on a read or on its next job); requests in flight (most, and the mean: the request-seconds the proxy
counted / the phase's seconds); the encode workers' CPU per source on both sides (the difference
is the client's CPU per read: obstore, TLS, the copy); the bytes and requests against the sources'
(1.00: exact reads, no re-reads); and, as a projection from these figures, what 64 workers would
need against what the measured read-ahead gives at the same latency.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpuload import _machine_busy, own_cpu, proc_stats  # noqa: E402
from report import print_table, spread  # noqa: E402

from tests.s3server import ACCESS_KEY, REGION, private_ca  # noqa: E402

BUCKET, PREFIX = "bench-raw", "winter21"
SHARD = "0000"
SERVER = """
import json, resource, ssl, sys
from dataclasses import asdict
sys.path.insert(0, sys.argv[1])
from tests.latency_proxy import LatencyProxy
from tests.s3server import MotoS3
ctx = None
if sys.argv[3]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[3] + "/server.pem", sys.argv[3] + "/server.key")
with MotoS3() as s3, LatencyProxy(s3.endpoint, float(sys.argv[2]), hold_objects=True, ssl_context=ctx) as proxy:
    print(json.dumps({"moto": s3.endpoint, "proxy": proxy.endpoint}), flush=True)
    for line in sys.stdin:
        if line.strip() == "peak":
            proxy.reset_peak()
        r = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({**asdict(proxy.counts()), "held": len(proxy.held), "held_answers": proxy.held_answers,
                          "cpu": r.ru_utime + r.ru_stime}), flush=True)
"""


class Server:
    """moto and the latency proxy in a process of their own; `counts()` asks the proxy."""

    def __init__(self, latency_ms: float, tls_folder: str):
        root = str(Path(__file__).resolve().parents[1])
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, root, str(latency_ms), tls_folder],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ends = json.loads(self.proc.stdout.readline())
        self.moto, self.proxy = ends["moto"], ends["proxy"]

    def ask(self, what: str = "counts") -> dict:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def proc_cpu(pid: int) -> float:
    stat = proc_stats().get(pid)
    return stat[1] if stat else float("nan")


def main_thread(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a process's main thread, where
    an encode worker encodes (its reads run in other threads): /proc/<pid>/task/<pid>/schedstat."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
            on, wait = f.read().split()[:2]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    return int(on) / 1e9, int(wait) / 1e9


def shard_run(settings, raw_root: str, enc, workers: int, server: Server) -> dict:
    """One build_shard of SHARD reading from `raw_root`: the encode phase's wall seconds, the
    workers' and this process's CPU, and the proxy's counts over it (to the commit)."""
    from imnet_assets.runtime.workerpool import shared_pool
    from imnet_assets.stages.shard import build_shard

    pool = shared_pool(workers)
    deadline = time.monotonic() + 60
    while len(pool.pids()) != workers and time.monotonic() < deadline:  # started (the first time)
        time.sleep(0.05)
    pids = pool.pids()
    end: dict = {}

    def at_commit(_url: str) -> None:
        end.update(t=time.perf_counter(), own=own_cpu(), workers=sum(proc_cpu(p) for p in pids),
                   machine=_machine_busy(), counts=server.ask(), sched=[main_thread(p) for p in pids])

    w0, sched0 = sum(proc_cpu(p) for p in pids), [main_thread(p) for p in pids]
    before = server.ask("peak")
    m0, c0, t0 = _machine_busy(), own_cpu(), time.perf_counter()
    res = build_shard(out_root=settings.out_root, raw_root=raw_root, shard_key=SHARD,
                      shard_name=settings.shard_name(SHARD), settings=enc, workers=workers, run_id="shard-reads",
                      after_commit=at_commit)
    if res.problems or res.excluded:
        raise SystemExit(f"the shard run did not keep every source: {res.problems[:3]} {res.excluded[:3]}")
    if pool.pids() != pids:
        raise SystemExit("a worker was replaced during the run: its CPU is not accounted")
    wall, after = end["t"] - t0, end["counts"]
    worker = end["workers"] - w0
    # the share of the phase each worker's encoding thread was neither running nor waiting for a
    # core (blocked: on a read not yet arrived, or on its next job), whatever else loads the machine
    blocked = statistics.mean(1 - (on1 - on0 + w1 - wt0) / wall
                              for (on0, wt0), (on1, w1) in zip(sched0, end["sched"]))
    return {
        "n": res.num_samples, "wall": wall, "rate": res.num_samples / wall, "sha256": res.sha256,
        "worker_ms": worker * 1e3 / res.num_samples, "coord_ms": (end["own"] - c0) * 1e3 / res.num_samples,
        "busy": worker / wall, "blocked": blocked,
        "others": max(0.0, (end["machine"] - m0 - worker - (end["own"] - c0) - (after["cpu"] - before["cpu"])) / wall),
        "requests": after["requests"] - before["requests"], "bytes": after["bytes_out"] - before["bytes_out"],
        "max_in_flight": after["max_in_flight"], "mean_in_flight": (after["request_seconds"]
                                                                    - before["request_seconds"]) / wall,
        "server_cores": (after["cpu"] - before["cpu"]) / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", type=int, default=400, help="sources in the shard (100 per synset tar)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--plain-http", action="store_true", help="HTTP instead of HTTPS with a private CA")
    ap.add_argument("--work", type=Path, default=Path("/tmp/imnet-bench"))
    ap.add_argument("--project-workers", type=int, default=64, help="the worker count the projection is for")
    a = ap.parse_args()
    latency = a.latency_ms / 1000

    # The server first, and the AWS variables before any worker process starts (workers keep the
    # environment they started with).
    tls = tempfile.mkdtemp(prefix="shard-reads-")
    ca = None if a.plain_http else private_ca(tls)[0]
    server = Server(a.latency_ms, "" if a.plain_http else tls)
    os.environ.update(AWS_ENDPOINT_URL=server.proxy, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_REGION=REGION,
                      AWS_SECRET_ACCESS_KEY="imnet-test-secret", AWS_DEFAULT_REGION=REGION)
    if ca:
        os.environ["AWS_CA_BUNDLE"] = ca
    try:
        import boto3
        import encode as encode_bench  # bench/encode.py: the planned photo release

        from imnet_assets.release.plan import read_slice
        from imnet_assets.settings import DEFAULT_WEBP_METHOD, DEFAULT_WEBP_QUALITY
        from imnet_assets.stages.audit import encode_settings
        from imnet_assets.storage import s3read

        settings = encode_bench.release(a.work, a.sources, DEFAULT_WEBP_QUALITY, DEFAULT_WEBP_METHOD,
                                            workers=a.workers)
        enc = encode_settings(settings)
        rows, _ = read_slice(settings.out_root, SHARD)
        source_bytes = sum(r.size for r in rows)
        tars = sorted({r.tar for r in rows})
        # the raw tars to moto directly (not through the proxy), then one 1-byte read of each
        # through the proxy, so it holds its copies before the runs
        client = boto3.client("s3", endpoint_url=server.moto, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key="imnet-test-secret")
        client.create_bucket(Bucket=BUCKET)
        for tar in tars:
            client.upload_file(str(Path(settings.raw_root) / tar), BUCKET, f"{PREFIX}/{tar}")
        for tar in tars:
            s3read.get_range(BUCKET, f"{PREFIX}/{tar}", 0, 1)
        remote = f"s3://{BUCKET}/{PREFIX}"
        print(f"{len(rows)} sources in {len(tars)} synset tars, mean {source_bytes / len(rows) / 1e3:.1f} KB "
              f"(median {statistics.median(r.size for r in rows) / 1e3:.1f} KB); {server.proxy}, "
              f"{a.latency_ms:g} ms per request", flush=True)

        shard_run(settings, remote, enc, a.workers, server)  # warm-up: the pool, obstore's clients, TLS
        local, s3 = [], []
        for r in range(a.rounds):
            for side in (("local", "s3") if r % 2 == 0 else ("s3", "local")):
                got = shard_run(settings, settings.raw_root if side == "local" else remote, enc, a.workers, server)
                (local if side == "local" else s3).append(got)
                print(f"  round {r + 1} {side:5s}: {got['rate']:6.1f} sources/s, workers {got['busy']:.2f} cores "
                      f"busy, blocked {got['blocked']:.3f}, {got['worker_ms']:.1f} ms CPU/source; {got['requests']} GETs, most in flight "
                      f"{got['max_in_flight']}, mean {got['mean_in_flight']:.2f}; other processes "
                      f"{got['others']:.2f} cores", flush=True)
        if {g["sha256"] for g in local + s3} != {local[0]["sha256"]}:
            raise SystemExit("the shard's bytes differ between runs")
    finally:
        server.close()

    n = len(rows)
    ratio = [s["rate"] / lo["rate"] for s, lo in zip(s3, local)]
    # the same ratio with the rest of the machine's load taken out: a worker alone on its core
    # spends its CPU per source and the blocked share of its time, nothing else
    steady = [(1 - s["blocked"]) / s["worker_ms"] * lo["worker_ms"] / (1 - lo["blocked"]) for s, lo in zip(s3, local)]
    client_ms = [s["worker_ms"] - lo["worker_ms"] for s, lo in zip(s3, local)]
    # one worker with a core of its own encodes 1 / (its CPU per source) sources a second: CPU time,
    # not this loaded machine's wall time; the reads' own CPU counted in (the S3 side)
    worker_ms = statistics.median(s["worker_ms"] for s in s3)
    per_worker = 1e3 / worker_ms
    depth = max(s["max_in_flight"] for s in s3) / a.workers  # the read-ahead one worker kept in flight
    w = a.project_workers
    need = w * per_worker
    cpu_ms = max(statistics.median(client_ms), 0.0)
    scheme = "HTTP" if a.plain_http else "HTTPS (private CA in AWS_CA_BUNDLE)"
    rows_out = [
        ["shard run on S3: sources read per second (encode phase)", spread([s["rate"] for s in s3], 1), "", ""],
        ["same sources from local files: encode rate (the ceiling)", spread([lo["rate"] for lo in local], 1), "", ""],
        ["ratio S3 / local, wall (swings with what else runs on the machine)", spread(ratio), "", ""],
        ["ratio S3 / local, the machine's other load taken out: (1 - blocked share) / CPU per source",
         spread(steady), ">= 0.95", "yes" if statistics.median(steady) >= 0.95 else "NO"],
        ["  of which the reads' CPU: local / S3 CPU per source",
         spread([lo["worker_ms"] / s["worker_ms"] for s, lo in zip(s3, local)]), "", ""],
        ["encode workers' encoding thread blocked (neither running nor waiting for a core), share of the "
         "phase: S3 / local (the stall reads cause: the difference)",
         f"{spread([s['blocked'] for s in s3], 3)} / {spread([lo['blocked'] for lo in local], 3)}", "", ""],
        ["encode workers' cores busy: S3 / local",
         f"{spread([s['busy'] for s in s3])} / {spread([lo['busy'] for lo in local])}", "", ""],
        ["requests in flight on S3: most / mean", f"{max(s['max_in_flight'] for s in s3)} / "
         f"{spread([s['mean_in_flight'] for s in s3])}", "", ""],
        ["share of the read-ahead in flight, mean / most (near 1: the encoders wait on reads; near 0: reads wait "
         "done for the encoders)", spread([s["mean_in_flight"] / s["max_in_flight"] for s in s3], 3), "", ""],
        ["GETs / sources; bytes read / sources' bytes",
         f"{statistics.median(s['requests'] for s in s3) / n:.2f}; {statistics.median(s['bytes'] for s in s3) / source_bytes:.2f}",
         "1.00; 1.00", ""],
        ["encode workers' CPU per source: S3 / local, ms",
         f"{spread([s['worker_ms'] for s in s3], 1)} / {spread([lo['worker_ms'] for lo in local], 1)}", "", ""],
        ["client CPU per read (the difference), ms", spread(client_ms), "", ""],
        ["coordinator CPU per source: S3 / local, ms",
         f"{spread([s['coord_ms'] for s in s3])} / {spread([lo['coord_ms'] for lo in local])}", "", ""],
        ["the server (moto + proxy, Python) during the S3 runs, cores of this machine",
         spread([s["server_cores"] for s in s3]), "", ""],
        [f"projection, {w} workers: reads/s needed ({w} x {per_worker:.1f}/s per worker: 1 / {worker_ms:.1f} ms "
         "of CPU per source, a core each)", f"{need:,.0f}", "", ""],
        [f"projection: in flight needed at {a.latency_ms:g} ms (needed x latency) / what the measured read-ahead "
         f"({depth:.0f} per worker) gives", f"{need * latency:,.0f} / {w * depth:,.0f}", "", ""],
        [f"projection: reads/s the measured read-ahead allows at {a.latency_ms:g} ms ({w} x {depth:.0f} / "
         f"{latency:g} s) / needed", f"{w * depth / latency:,.0f} / {need:,.0f} ({w * depth / latency / need:,.0f}x)",
         "> 1x", "yes" if w * depth / latency > need else "NO"],
        [f"projection: client CPU for those reads ({need:,.0f}/s x {cpu_ms:.2f} ms), cores of {w}",
         f"{need * cpu_ms / 1e3:.2f}", "", ""],
    ]
    print_table(f"A shard run encoding real-size sources on S3 at {a.latency_ms:g} ms per request, {scheme}, "
                f"{a.workers} workers, {n} sources ({source_bytes / n / 1e3:.0f} KB mean), {a.rounds} rounds; "
                f"{os.cpu_count()} CPUs", rows_out)
    verdict = statistics.median(steady)
    print(f"\nWhat this measures: a shard run encoding real-size sources at {a.latency_ms:g} ms per request reads "
          f"at the rate its encoders consume ({statistics.median(s['rate'] for s in s3):.1f} sources/s against "
          f"{statistics.median(lo['rate'] for lo in local):.1f} from local files on this shared machine; with its "
          f"other load taken out, ratio {verdict:.2f}). "
          + ("Reads are not the bottleneck: the encoders are; what reading from S3 costs them is the reads' own "
             "CPU (client CPU per read) and any wait in the blocked share." if verdict >= 0.95 else
             "The run on S3 is slower than from local files by more than 5%: reads (their waits or their CPU) "
             "cost encode time.")
          + " It is not what a client can issue: the rate is the encoders', the reads follow it.")
    print("Projections assume a core as fast as this machine's per worker (its CPU per source) and a server "
          f"answering every GET in {a.latency_ms:g} ms; S3 documents at least 5,500 GET/s per prefix.")
    print("command: .venv/bin/python bench/shard_reads.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    main()
