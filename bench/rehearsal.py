"""A rehearsal of the real release's shape on S3: 19,167 synset tars, 1,024 shards, 20 ms a request.

    .venv/bin/python bench/rehearsal.py [--small] [--tars 19167] [--per-tar 2] [--shards 1024]
                                        [--latency-ms 20] [--shard-runs 4] [--work ~/.cache/imnet-rehearsal]
                                        [--skip-verify]

The raw release (tiny real JPEGs, `--per-tar` to a tar) is generated once and cached under --work.
It is built locally first (catalog stages, every shard, the audit), which gives the local side of
the table and the shards later mirrored to S3. Then the raw tars go to moto's S3 server
(tests/s3server.py) and everything the project does on S3 is measured through a latency injector
(tests/latency_proxy.py: `--latency-ms` per request, counting requests, connections, bytes and
the most requests in flight): the catalog stages on the S3 raw root and out root; `--shard-runs`
shard runs; then (the other shards copied in from the local build, their commit records stamped
with the S3 ETags, outside the proxy) `imnet status`, one top-up schedule tick and one audit
sensor tick (Dagster's build_schedule_context / build_sensor_context on an ephemeral instance),
the audit over all manifests and `imnet verify`.

moto on a small machine answers a few hundred requests a second whatever the latency, so a wall
time here is an upper bound; the request counts and the in-flight figures are what real S3 sees.
For the encode workers' read rate, which moto's cap would hide, the proxy answers the ranged GETs
of the raw tars from copies it fetched from moto once (`LatencyProxy(hold_objects=True)`): S3's
20 ms a request, without a throughput cap of its own.
`--small` is 200 tars and 64 shards (a few minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from bench.cpuload import proc_stats  # noqa: E402
from imnet_assets.stages.shard_jobs import EncodeJob  # noqa: E402
from tests.latency_proxy import LatencyProxy  # noqa: E402
from tests.s3server import MotoS3  # noqa: E402

RAW_BUCKET, OUT_BUCKET = "rehearsal-raw", "rehearsal-out"
STAGES = ["raw_tars", "synset_manifest", "filtered_index", "shuffled_plan"]


# ----------------------------------------------------------------------------- the raw release


def wnid(i: int) -> str:
    return f"n{1_440_764 + 523 * i:08d}"


def tiny_jpeg(i: int, j: int) -> bytes:
    """A small real JPEG, different for every (tar, slot): a gradient whose colours encode both."""
    w, h = 48 + (i % 16), 40 + (j % 8)
    img = Image.new("RGB", (w, h), ((i * 37) % 256, (i // 7 * 11 + j * 90) % 256, (i // 256 * 5 + j * 17) % 256))
    px = img.load()
    for x in range(0, w, 3):
        for y in range(0, h, 5):
            px[x, y] = ((x * 5 + i) % 256, (y * 7 + j) % 256, (i >> 4) % 256)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def make_raw(folder: Path, tars: int, per_tar: int) -> Path:
    """`folder/<wnid>.tar` x tars (+ words.txt, gloss.txt), generated once."""
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    words, gloss = [], []
    for i in range(tars):
        name = wnid(i)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for j in range(per_tar):
                data = tiny_jpeg(i, j)
                info = tarfile.TarInfo(f"{name}_{j + 1}.JPEG")
                info.size, info.mtime, info.mode = len(data), 1318550400, 0o644
                tf.addfile(info, io.BytesIO(data))
        (folder / f"{name}.tar").write_bytes(buf.getvalue())
        words.append(f"{name}\tsynset {i}\n")
        gloss.append(f"{name}\ta rehearsal synset number {i}\n")
    (folder / "words.txt").write_text("".join(words))
    (folder / "gloss.txt").write_text("".join(gloss))
    done.write_text("ok\n")
    print(f"generated {tars} tars x {per_tar} JPEGs under {folder} in {time.perf_counter() - t0:.0f}s", flush=True)
    return folder


def raw_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


# ----------------------------------------------------------------------------- measuring


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str, str]] = []

    def add(self, what: str, local: str, s3: str, goal: str = "", met: str = "") -> None:
        self.rows.append((what, local, s3, goal, met))
        print(f"  {what}: local {local} | s3 {s3} | goal {goal} {met}", flush=True)

    def render(self) -> str:
        head = ["measure", "local", "S3 via proxy", "goal", "met"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("yes" if ok else "**no**")


def measured(proxy: LatencyProxy | None, fn, *args, **kwargs):
    """(seconds, counts or None, result, log slice) of one call."""
    if proxy is not None:
        before, start = proxy.counts(), len(proxy.log)
        proxy.reset_peak()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    seconds = time.perf_counter() - t0
    if proxy is None:
        return seconds, None, out, []
    return seconds, proxy.counts().minus(before), out, proxy.log[start:]


def req(c) -> str:
    return f"{c.requests} req, {c.connections} conn, peak {c.max_in_flight} in flight" if c else "-"


# ----------------------------------------------------------------------------- the runs


def settings_env(raw: str, out: str, catalog: str, shards: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMNET_", "DAGSTER_HOME"))}
    env.update(IMNET_RAW_ROOT=raw, IMNET_OUT_ROOT=out, IMNET_CATALOG=catalog, IMNET_NUM_SHARDS=str(shards),
               IMNET_WORKERS="2", IMNET_SCHEDULE_MAX_RUNS="64")
    return env


def catalog_stages(settings, proxy):
    from imnet_assets.stages.filtered_index import build_filtered_index
    from imnet_assets.stages.raw_tars import build_raw_tars
    from imnet_assets.stages.shuffled_plan import build_shuffled_plan
    from imnet_assets.stages.synset_manifest import build_synset_manifest

    quiet = lambda _m: None  # noqa: E731
    out = {}
    for stage, fn in zip(STAGES, [build_raw_tars, build_synset_manifest,
                                  build_filtered_index, build_shuffled_plan]):
        out[stage] = measured(proxy, fn, settings, f"rehearsal-{stage}", log=quiet)
        print(f"  {stage} ({'S3' if proxy else 'local'}): {out[stage][0]:.1f}s {req(out[stage][1])}", flush=True)
    return out


def shard_runs(settings, keys, proxy, workers: int):
    from imnet_assets.stages import shard
    from imnet_assets.stages.audit import encode_settings

    enc = encode_settings(settings)
    results = []
    for key in keys:
        results.append(measured(proxy, shard.build_shard, out_root=settings.out_root, raw_root=settings.raw_root,
                                shard_key=key, shard_name=settings.shard_name(key), settings=enc,
                                workers=workers, run_id=f"rehearsal-{key}"))
    return results


class ReadJob(EncodeJob):
    """An EncodeJob's reads and nothing else: the same `prefetch` (each row's `_read_source` on the
    worker's reader threads, through its RangeReader: one ranged GET per source on S3), then the
    number of sources read whole and intact. Sent to the real shared worker pool."""

    def run(self, reads, mark) -> int:
        return sum(1 for r in reads if r.result()[0] is not None)


def _slice_rows(settings, sources: int) -> list:
    from imnet_assets.release.plan import read_slice

    rows = []
    for key in settings.partition_keys:
        rows += read_slice(settings.out_root, key)[0]
        if len(rows) >= sources:
            break
    return [dataclasses.replace(r, position=i) for i, r in enumerate(rows[:sources])]


def _pool_cpu(pool) -> float:
    """CPU seconds the pool's worker processes have used so far."""
    stats = proc_stats()
    return sum(stats[pid][1] for pid in pool.pids() if pid in stats)


def worker_reads(settings, proxy, sources: int, workers: int = 2, passes: int = 3):
    """The read path of a shard run's encode workers, alone: `ReadJob`s of `sources` plan rows
    through the shared pool of `workers` workers, `workers * depth` jobs ahead as a shard run
    keeps them. Run `holding(proxy)`: the proxy answers from held copies of the tars, which the
    first, cold pass fetches from moto once each; the second pass (`passes` times the rows) sees a
    server with S3's latency and no throughput cap of its own, so what it measures is the client's.
    (cold, hot) as (seconds, counts, sources read intact), and the workers' CPU ms per read."""
    from imnet_assets.runtime.workerpool import shared_pool
    from imnet_assets.stages import shard_jobs

    rows = _slice_rows(settings, sources)
    pool = shared_pool(workers)
    batch = shard_jobs._batch_size(len(rows), workers)  # as a shard run cuts its jobs

    def read_all(rows) -> int:
        window, done = [], 0
        for i in range(0, len(rows), batch):
            window.append(pool.submit(ReadJob(settings.raw_root, rows[i:i + batch], None, 0)))
            if len(window) >= workers * pool.depth:
                done += window.pop(0).result()
        return done + sum(f.result() for f in window)

    cold = measured(proxy, read_all, rows)
    cpu0 = _pool_cpu(pool)
    hot = measured(proxy, read_all, rows * passes)
    cpu_ms = (_pool_cpu(pool) - cpu0) * 1000 / max(hot[2], 1)
    return cold[:3], hot[:3], cpu_ms


@contextlib.contextmanager
def holding(proxy):
    """The proxy answers ranged GETs from held copies of the objects meanwhile (see LatencyProxy)."""
    proxy.hold_objects = True
    try:
        yield
    finally:
        proxy.hold_objects = False
        proxy.held.clear()


def source_reads(settings, proxy, sources: int, workers: int = 2):
    """The read path of a shard run's encode workers (shard_jobs.prepared_samples: each worker fetches
    its own sources by ranged GET, `threads` readers each, jobs queued `depth` deep) over the rows of
    as many plan slices as give `sources` rows, real encoder: (seconds, counts, sources read)."""
    from imnet_assets.stages import shard_jobs
    from imnet_assets.stages.audit import encode_settings

    rows = _slice_rows(settings, sources)
    enc = encode_settings(settings)
    list(shard_jobs.prepared_samples(rows[:workers * 4], settings.raw_root, enc, workers))  # start the pool
    seconds, counts, done, _ = measured(
        proxy, lambda: sum(1 for _ in shard_jobs.prepared_samples(rows, settings.raw_root, enc, workers)))
    return seconds, counts, done


def ticks(settings, proxy):
    """(first, status, schedule tick, sensor tick, warm) measurements. `first`: the first look after
    the shards were copied in (their records are in no ledger yet: all read, the ledger written);
    then status, a tick and a sensor tick each from a cold process state (nothing remembered: the
    ledger stands in for the records); `warm`: a process that looked before."""
    from dagster import build_schedule_context, build_sensor_context, instance_for_test

    from imnet_assets.definitions import build_definitions
    from imnet_assets.defs import schedules
    from imnet_assets.release import freshness

    defs = build_definitions(settings)
    topup, sensor = schedules.make(settings)
    with instance_for_test() as instance:  # a real (temporary, SQLite) instance
        freshness.forget()
        first = measured(proxy, schedules.shard_partition_status, settings, instance)
        freshness.forget()
        status = measured(proxy, schedules.shard_partition_status, settings, instance)
        freshness.forget()
        tick = measured(proxy, lambda: topup.evaluate_tick(
            build_schedule_context(instance=instance, repository_def=defs.get_repository_def())))
        freshness.forget()
        sense = measured(proxy, lambda: sensor.evaluate_tick(
            build_sensor_context(instance=instance, definitions=defs)))
        warm = measured(proxy, schedules.shard_partition_status, settings, instance)
    return first, status, tick, sense, warm


def moto_rate(client, n: int = 600) -> float:
    """Small GETs a second moto's server answers here with 64 in flight (no proxy, no latency)."""
    client.put_object(Bucket=OUT_BUCKET, Key="rate/probe", Body=b"x" * 300)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(64) as pool:
        list(pool.map(lambda _i: client.get_object(Bucket=OUT_BUCKET, Key="rate/probe")["Body"].read(), range(n)))
    rate = n / (time.perf_counter() - t0)
    client.delete_object(Bucket=OUT_BUCKET, Key="rate/probe")
    return rate


def cli(args: list[str], env: dict[str, str], proxy) -> tuple[float, object, subprocess.CompletedProcess]:
    exe = shutil.which("imnet", path=os.path.dirname(sys.executable)) or "imnet"
    seconds, counts, proc, _ = measured(proxy, subprocess.run, [exe, *args], env=env, capture_output=True,
                                        text=True, timeout=3600)
    if proc.returncode != 0:
        print(f"imnet {' '.join(args)} exited {proc.returncode}: {proc.stdout[-800:]}{proc.stderr[-800:]}")
    return seconds, counts, proc


def mirror_shards(local_out: Path, client, prefix: str, settings, skip: set[str]) -> None:
    """Copy the locally built shards, manifests and commit records into the out bucket, each record
    stamped with its tar's and its manifest's ETags there (as a shard run on S3 stamps it)."""
    def one(key: str) -> None:
        name = settings.shard_name(key)
        etag = client.put_object(Bucket=OUT_BUCKET, Key=f"{prefix}/{name}",
                                 Body=(local_out / name).read_bytes())["ETag"]
        mf = local_out / "_manifests"
        mf_etag = client.put_object(Bucket=OUT_BUCKET, Key=f"{prefix}/_manifests/{key}.json",
                                    Body=(mf / f"{key}.json").read_bytes())["ETag"]
        state = json.loads((mf / f"{key}.state.json").read_text())
        state["stamp"] = etag
        state["manifest_stamp"] = mf_etag  # the manifest's too (outroot.what_changed)
        client.put_object(Bucket=OUT_BUCKET, Key=f"{prefix}/_manifests/{key}.state.json",
                          Body=json.dumps(state, sort_keys=True).encode())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, [k for k in settings.partition_keys if k not in skip]))


def upload_raw(raw: Path, client, prefix: str) -> None:
    files = [p for p in sorted(raw.iterdir()) if p.is_file() and not p.name.startswith(".")]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: client.upload_file(str(p), RAW_BUCKET, f"{prefix}/{p.name}"), files))


def manifest_gets(log: list[list]) -> Counter:
    return Counter(t.split("?")[0] for m, t, _ in log
                   if m == "GET" and "/_manifests/" in t and t.split("?")[0].endswith(".json")
                   and not t.split("?")[0].endswith(".state.json"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="200 tars, 64 shards")
    ap.add_argument("--tars", type=int, default=19_167)
    ap.add_argument("--per-tar", type=int, default=2)
    ap.add_argument("--shards", type=int, default=1024)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--shard-runs", type=int, default=4)
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/imnet-rehearsal"))
    ap.add_argument("--skip-verify", action="store_true")
    ap.add_argument("--sources", type=int, default=3000, help="sources read by the encode workers' read path")
    a = ap.parse_args()
    if a.small:
        a.tars, a.shards = 200, 64
    work = Path(a.work)
    raw = make_raw(work / f"raw-{a.tars}x{a.per_tar}", a.tars, a.per_tar)
    size = raw_size(raw)
    tmp = Path(tempfile.mkdtemp(prefix="rehearsal-", dir=work))
    table = Table()
    from imnet_assets.settings import Settings

    # The server and the proxy start first: encode and scan workers (forkserver children) take the
    # environment they find when first started, so the AWS variables are set before any of them.
    s3 = MotoS3().start()
    proxy = LatencyProxy(s3.endpoint, latency_ms=a.latency_ms).start()
    os.environ.update(s3.env())
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    try:
        # ---------------------------------------------------------------- local
        print(f"local build: {a.tars} tars ({size / 1e6:.1f} MB), {a.shards} shards", flush=True)
        lenv = settings_env(str(raw), str(tmp / "out"), str(tmp / "local.duckdb"), a.shards)
        local = Settings.from_env(lenv)
        lstages = catalog_stages(local, None)
        t0 = time.perf_counter()
        lshards = shard_runs(local, local.partition_keys, None, workers=1)
        local_shards_s = time.perf_counter() - t0
        print(f"  {len(lshards)} shards built locally in {local_shards_s:.0f}s", flush=True)
        from imnet_assets.stages.audit import run_audit

        laudit = measured(None, run_audit, local, "rehearsal-audit", log=lambda _m: None)
        _, lstatus, ltick, lsense, _ = ticks(local, None)
        lcli_status = cli(["status"], lenv, None)
        lverify = None if a.skip_verify else cli(["verify"], lenv, None)

        # ---------------------------------------------------------------- S3
        if True:
            client = s3.client()
            before_s3 = proxy.counts()
            client.create_bucket(Bucket=RAW_BUCKET)
            client.create_bucket(Bucket=OUT_BUCKET)
            t0 = time.perf_counter()
            upload_raw(raw, client, "winter21")
            print(f"uploaded the raw release to moto in {time.perf_counter() - t0:.0f}s", flush=True)
            senv = settings_env(f"s3://{RAW_BUCKET}/winter21", f"s3://{OUT_BUCKET}/wds",
                                str(tmp / "s3.duckdb"), a.shards)
            senv.update(s3.env())
            senv["AWS_ENDPOINT_URL"] = proxy.endpoint
            remote = Settings.from_env(senv)
            sstages = catalog_stages(remote, proxy)
            run_keys = remote.partition_keys[: a.shard_runs]
            sshards = shard_runs(remote, run_keys, proxy, workers=2)
            with holding(proxy):
                wcold, whot, wcpu = worker_reads(remote, proxy, a.sources)
                sreads = source_reads(remote, proxy, a.sources)
            t0 = time.perf_counter()
            mirror_shards(tmp / "out", client, "wds", remote, set(run_keys))
            print(f"copied the other shards into the out bucket in {time.perf_counter() - t0:.0f}s", flush=True)
            sfirst, sstatus, stick, ssense, swarm = ticks(remote, proxy)
            scli_status = cli(["status"], senv, proxy)
            saudit = measured(proxy, run_audit, remote, "rehearsal-audit", log=lambda _m: None)
            sverify = None if a.skip_verify else cli(["verify"], senv, proxy)
            total = proxy.counts().minus(before_s3)
            rate = moto_rate(client)

        # ---------------------------------------------------------------- the table
        print()
        for stage in STAGES:
            ls, ss = lstages[stage], sstages[stage]
            table.add(f"{stage} wall", f"{ls[0]:.1f} s", f"{ss[0]:.1f} s ({req(ss[1])})")
        read = sum(sstages[s][1].bytes_out for s in STAGES)
        tar_bytes = sum(n for s in STAGES for m, t, n in sstages[s][3] if m == "GET" and t.split("?")[0].endswith(".tar"))
        tars = sum(p.stat().st_size for p in raw.glob("*.tar"))
        ratio = tar_bytes / tars
        table.add("catalog stages: tar bytes read / tar bytes", "", f"{ratio:.2f}x", "<= 1.05x", verdict(ratio <= 1.05))
        table.add("catalog stages: all bytes read / raw size (listings, words.txt, gloss.txt too)", "",
                  f"{read / size:.2f}x")
        peak = sstages["filtered_index"][1].max_in_flight
        table.add("filtered_index: most requests in flight", "", str(peak), ">= 64", verdict(peak >= 64))
        plan_peak = sstages["shuffled_plan"][1].max_in_flight
        table.add("shuffled_plan: slice writes in flight", "", str(plan_peak), "> 1 (concurrent)",
                  verdict(plan_peak > 1))
        lrate = sum(r[2].planned for r in lshards) / local_shards_s
        srate = sum(r[2].planned for r in sshards) / sum(r[0] for r in sshards)
        # A rehearsal shard holds ~37 sources: its runs' rate is their fixed cost (the pool, the
        # slice, three commits, the ledger); the read rate is the next rows' measure.
        table.add(f"shard runs: sources/s ({len(sshards)} runs on S3, workers 2; ~37 sources each)",
                  f"{lrate:.0f} (all shards, 1 worker)", f"{srate:.0f}")
        (cs, cc, cn), (hs, hc, hn) = wcold, whot
        table.add(f"encode workers' read path alone, first pass ({cn} sources; each tar fetched from moto): reads/s",
                  "", f"{cn / cs:.0f} ({req(cc)})")
        table.add(f"encode workers' read path alone, S3's latency without moto's cap ({hn} sources, workers 2): "
                  "reads/s", "", f"{hn / hs:.0f} ({req(hc)})", ">= 2,000",
                  verdict(hn / hs >= 2000 and hn == hc.requests))
        table.add("same: encode workers' CPU per source read", "", f"{wcpu:.2f} ms")
        rs, rc, rn = sreads
        table.add(f"shard run's encode workers, reading and encoding, same server ({rn} sources, workers 2): "
                  "sources/s", "", f"{rn / rs:.0f} ({req(rc)})")
        table.add("moto's own rate here (small GETs, 64 in flight, no proxy)", "", f"{rate:.0f} requests/s")
        table.add("status, first look after the shards were copied in (every record read, the ledger written): wall",
                  "", f"{sfirst[0]:.2f} s ({req(sfirst[1])})")
        for label, lm, sm in (("status (shard_partition_status, cold)", lstatus, sstatus),
                              ("schedule tick (cold)", ltick, stick), ("sensor tick (cold)", lsense, ssense)):
            table.add(f"{label}: wall", f"{lm[0]:.2f} s", f"{sm[0]:.2f} s ({req(sm[1])})", "<= 5 s",
                      verdict(sm[0] <= 5))
        table.add("status, warm process: wall", "", f"{swarm[0]:.2f} s ({req(swarm[1])})")
        table.add("`imnet status` CLI: wall", f"{lcli_status[0]:.1f} s",
                  f"{scli_status[0]:.1f} s ({req(scli_status[1])})", "<= 5 s", verdict(scli_status[0] <= 5))
        rounds = sstatus[1].requests / max(sstatus[1].max_in_flight, 1)
        table.add("status: requests / most in flight (sequential round trips)", "", f"{rounds:.1f}", "O(1)")
        gets = manifest_gets(saudit[3])
        most = max(gets.values()) if gets else 0
        table.add("audit: wall", f"{laudit[0]:.1f} s", f"{saudit[0]:.1f} s ({req(saudit[1])})")
        table.add("audit: GETs of the most-read manifest", "", f"{most} ({len(gets)} manifests read)", "1",
                  verdict(most == 1 and len(gets) == a.shards))
        table.add("audit: most requests in flight", "", str(saudit[1].max_in_flight))
        if lverify and sverify:
            table.add("`imnet verify`: wall", f"{lverify[0]:.1f} s", f"{sverify[0]:.1f} s ({req(sverify[1])})")
        per_conn = total.per_connection
        table.add("requests per connection (whole S3 run)", "", f"{per_conn:.0f} ({total.requests} / {total.connections})",
                  ">= 20", verdict(per_conn >= 20))
        print("\n" + table.render())
        print(f"\nraw: {a.tars} tars x {a.per_tar} JPEGs ({size / 1e6:.1f} MB), {a.shards} shards, "
              f"{a.latency_ms:g} ms per request; {os.cpu_count()} CPUs")
        print("command: .venv/bin/python bench/rehearsal.py " + shlex.join(sys.argv[1:]))
    finally:
        proxy.stop()
        s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
