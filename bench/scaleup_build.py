"""Issue 15 (d): the fraction of the cores kept encoding over a multi-shard `imnet build`, against
the bare codec chain measured in the same run.

    .venv/bin/python bench/scaleup_build.py [--work /tmp/imnet-bench-build] [--shards 4]
                                            [--images 300] [--rounds 2] [--parallel 0 1]

A release of shards x images photo-like JPEGs (photo_release.py, cached under --work) is planned
once (catalog stages, not timed). Then, alternating in every round so a busy machine hurts each
side alike:
  - bare: `encode.bare_chain` over every planned source, already in memory, in one process: the
    CPU seconds of codec work these images need (decode with draft, RGB, resize, WebP);
  - build: `imnet build` (Dagster in-process, IMNET_WORKERS = the CPUs) after removing every shard,
    its manifest and state, so all shards are built again; the catalog stages are fresh and
    skipped. `--parallel 0` is the automatic choice, `1` one shard run at a time (as before).
The build's shard phase runs from the line announcing the shards to build to the last shard's
line (timestamps of its output as it arrives); the whole command's wall time is shown too.

    fraction of the cores encoding = bare CPU seconds / (CPUs x wall seconds)

The bare chain is also run on every core at once (one forked process per CPU, the images split
between them), since a build keeps every core busy and cores that work together share the L3
cache, memory bandwidth and the package's clock: its CPU seconds are shown, and the fractions
against it, beside the single process's (the figure the issue names).

over three spans of the build's wall time: the whole command to the audit's end (issue 26's
figure: from the process's start, Dagster's imports and instance included, to the line that
reports the audit done, read off its output as it arrives), the first shard to the audit's end
(from the line announcing the shards to build, or from when the first shard's first jobs went to
the encoders when the build says they went earlier, ahead of its run), and the shard phase alone
(from the line announcing the shards to the last shard's line). Also shown: where the whole command's wall time went (start-up to the shards' line, the
shard phase, the audit), the build's own CPU split by process over the shard phase, and the CPU
other processes used meanwhile (the machine is shared).
"""

from __future__ import annotations

import argparse
import compileall
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpuload import Sample, measure, proc_stats  # noqa: E402
from encode import release, sources_of  # noqa: E402
from report import met, print_table, spread  # noqa: E402

from imnet_assets.image.encode import EncodeSettings, bare_chain
from imnet_assets.settings import Settings  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GOAL = 0.90


def env_for(settings: Settings, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMNET_", "DAGSTER_"))}
    env.update(IMNET_RAW_ROOT=settings.raw_root, IMNET_OUT_ROOT=settings.out_root, IMNET_CATALOG=settings.catalog,
               IMNET_NUM_SHARDS=str(settings.num_shards), IMNET_WORKERS=str(settings.workers),
               DAGSTER_HOME=str(home))
    return env


def forget_shards(settings: Settings) -> None:
    out = Path(settings.out_root)
    for p in out.glob("*.tar"):
        p.unlink()
    shutil.rmtree(out / "_manifests", ignore_errors=True)
    (out / "_info.json").unlink(missing_ok=True)


class TreeCpu:
    """CPU seconds of a process and all its descendants, polled from /proc while it runs (the
    encode workers are the forkserver's children, and the forkserver is never waited for by the
    build, so getrusage(RUSAGE_CHILDREN) misses them)."""

    def __init__(self, root: int, every: float = 0.25):
        import threading

        self.root, self.every = root, every
        self.seen: dict[tuple[int, int], float] = {}  # (pid, start time) -> last CPU seconds
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        stats = proc_stats()
        tree, grew = {self.root}, True
        while grew:
            grew = False
            for pid, (ppid, *_rest) in stats.items():
                if ppid in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
        for pid in tree:
            if pid in stats:
                _ppid, cpu, _reaped, start = stats[pid]
                self.seen[(pid, start)] = max(cpu, self.seen.get((pid, start), 0.0))

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self._poll()

    def total(self) -> float:
        self.stop.set()
        self.thread.join()
        return sum(self.seen.values())


def bare_on_every_core(sources: list[bytes], enc: EncodeSettings, cpus: int) -> float:
    """CPU seconds of the bare chain over `sources` run on every core at once (one forked process
    per CPU, each every cpus-th image): the codec floor when all cores work, as in a build, where
    they share the L3 cache, memory bandwidth and the package's clock; a single process (`bare`)
    has them to itself."""
    pids = []
    for i in range(cpus):
        pid = os.fork()
        if pid == 0:
            try:
                for data in sources[i::cpus]:
                    bare_chain(data, enc)
            finally:
                os._exit(0)
        pids.append(pid)
    total = 0.0
    for pid in pids:
        _pid, _status, usage = os.wait4(pid, 0)
        total += usage.ru_utime + usage.ru_stime
    return total


def run_build(settings: Settings, home: Path, parallel: int, timeline_cpu: bool = False) -> dict:
    """One `imnet build` with every shard to build: its wall time, shard-phase wall time, and output."""
    forget_shards(settings)
    exe = shutil.which("imnet", path=os.path.dirname(sys.executable)) or "imnet"
    cmd = [exe, "build"] + (["--parallel", str(parallel)] if parallel else [])
    facts: dict = {}

    def go() -> None:
        started = time.perf_counter()
        err_file = tempfile.TemporaryFile("w+")  # a pipe left unread could fill and stall the build
        proc = subprocess.Popen(cmd, env=env_for(settings, home), stdout=subprocess.PIPE, stderr=err_file,
                                text=True, bufsize=1)
        tree = TreeCpu(proc.pid)
        lines, timeline = [], []
        phase_start = phase_end = audit_end = None
        for line in proc.stdout:
            now = time.perf_counter()
            lines.append(line.rstrip())
            if timeline_cpu:
                tree._poll()
                main_cpu = max((c for (pid, _), c in tree.seen.items() if pid == proc.pid), default=0.0)
                timeline.append(f"{now - started:6.2f}s cpu main {main_cpu:5.2f} tree {sum(tree.seen.values()):6.2f}"
                                f" {line.rstrip()}")
            else:
                timeline.append(f"{now - started:6.2f}s {line.rstrip()}")
            if " to build" in line and phase_start is None:
                phase_start = now
                tree._poll()
                facts["cpu_at_start"] = dict(tree.seen)
            if f"[{settings.num_shards}/{settings.num_shards}] shard" in line:
                phase_end = now
                tree._poll()
                facts["cpu_at_end"] = dict(tree.seen)
            if "shard_audit " in line and audit_end is None:  # done ("ok: ...") or fresh, skipped
                audit_end = now
                tree._poll()
                facts["cpu_at_audit"] = dict(tree.seen)
            ahead = re.search(r"went to the encoders ([0-9.]+)s after the command started", line)
            if ahead:  # the first shard's first jobs were encoding before the shards' line
                facts["ahead_at"] = started + float(ahead.group(1))
        tree._poll()  # the last look before the process is gone
        facts["cpu_at_exit"] = dict(tree.seen)
        proc.wait()
        facts["tree_cpu"] = tree.total()
        facts["main_pid"] = proc.pid
        err_file.seek(0)
        err = err_file.read()
        if proc.returncode != 0 or None in (phase_start, phase_end, audit_end):
            raise SystemExit("imnet build failed:\n" + "\n".join(lines[-20:]) + "\n" + err[-3000:])
        facts.update(wall=time.perf_counter() - started, phase=phase_end - phase_start, lines=lines,
                     to_audit_end=audit_end - started,
                     first_shard_to_audit_end=audit_end - min(phase_start, facts.get("ahead_at", phase_start)),
                     start_up=phase_start - started, audit=audit_end - phase_end, timeline=timeline)

    sample = measure(go)
    facts["sample"] = sample
    return facts


def phase_cpu(build: dict) -> tuple[float, float, float]:
    """CPU seconds over the shard phase: (the imnet process, the encode workers, everything else
    in its tree), from /proc snapshots at the phase's first and last line (0.25 s polling)."""
    start, end = build.get("cpu_at_start", {}), build.get("cpu_at_end", {})
    main = workers = rest = 0.0
    for key, cpu in end.items():
        used = cpu - start.get(key, 0.0)
        if key[0] == build["main_pid"]:
            main += used
        elif cpu > 2.0:  # the encode workers (forkserver children doing the codec work)
            workers += used
        else:
            rest += used
    return main, workers, rest


def main_cpu_by_phase(build: dict) -> tuple[float, float, float]:
    """CPU seconds of the imnet process: to the shards' line (imports, the instance, the first
    look, the catalog stages' freshness), over the shard phase (its shard runs: Dagster and the
    coordinators), and from the last shard's line to the audit's (the audit's run)."""
    def main_at(key: str) -> float:
        return max((c for (pid, _), c in build.get(key, {}).items() if pid == build["main_pid"]), default=0.0)

    start, end, audit = main_at("cpu_at_start"), main_at("cpu_at_end"), main_at("cpu_at_audit")
    return start, end - start, audit - end


def workers_cpu(build: dict) -> float:
    """CPU seconds of the encode workers over the whole command (some encode before the shard
    phase's first line, ahead of the first run): every process of the tree but the imnet process
    that used more than 2 s (the forkserver and short-lived helpers use less)."""
    return sum(cpu for (pid, _), cpu in build["cpu_at_exit"].items() if pid != build["main_pid"] and cpu > 2.0)


def others(build: dict) -> float:
    """Cores' worth of CPU that processes outside the build's tree used during the build."""
    return max(0.0, (build["sample"].machine - build["tree_cpu"]) / build["wall"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/imnet-bench-build"))
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--images", type=int, default=300, help="images per shard")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--parallel", type=int, nargs="+", default=[0, 1],
                   help="--parallel values to measure (0: the automatic choice)")
    p.add_argument("--timeline", action="store_true", help="print each build's output lines with their times")
    args = p.parse_args()
    args.work = args.work.resolve()
    title, rows = cores_kept_encoding(args)
    print(f"\n$ {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print_table(title, rows)


def cores_kept_encoding(args) -> tuple[str, list[list[str]]]:
    """The table's title and rows for `args` (work, shards, images, rounds, parallel); also
    bench/scaleup.py's section (d)."""
    cpus = os.cpu_count() or 1
    defaults = Settings()
    settings = release(args.work, args.shards * args.images, defaults.webp_quality, defaults.webp_method,
                       shards=args.shards, workers=os.cpu_count() or 1)
    sources = sources_of(settings)
    n = len(sources)
    enc = EncodeSettings(quality=settings.webp_quality, method=settings.webp_method)
    # As an installed project is (README's first command): where PYTHONDONTWRITEBYTECODE is set, each
    # `imnet` process would otherwise compile the project's modules from source at its start.
    compileall.compile_dir(str(REPO / "imnet_assets"), quiet=1)
    home = args.work / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    print(f"{args.shards} shards, {n} images, {cpus} CPUs, IMNET_WORKERS={settings.workers}, "
          f"{args.rounds} rounds, --parallel {args.parallel} (0: automatic)", flush=True)
    run_build(settings, home, args.parallel[0])  # warm up: page cache, imports, the forkserver

    bare: list[Sample] = []
    every: list[float] = []  # the bare chain's CPU s on every core at once (bare_on_every_core)
    builds: dict[int, list[dict]] = {k: [] for k in args.parallel}
    for r in range(args.rounds):
        kinds = ["bare", *args.parallel]
        if r % 2:
            kinds.reverse()
        for kind in kinds:
            if kind == "bare":
                bare.append(measure(lambda: [bare_chain(d, enc) for d in sources]))
                every.append(bare_on_every_core(sources, enc, cpus))
                print(f"  round {r + 1}: bare chain {bare[-1].cpu:.1f} CPU s ({bare[-1].cpu / n * 1000:.1f} ms/image), "
                      f"others {bare[-1].others_cores:.2f} cores; on every core at once {every[-1]:.1f} CPU s "
                      f"({every[-1] / n * 1000:.1f} ms/image)", flush=True)
            else:
                b = run_build(settings, home, kind, args.timeline)
                builds[kind].append(b)
                runs = next((ln.strip() for ln in b["lines"] if "shard runs at once" in ln), "one shard run at a time")
                print(f"  round {r + 1}: build --parallel {kind}: shard phase {b['phase']:.1f} s, command "
                      f"{b['wall']:.1f} s, {b['tree_cpu']:.1f} CPU s (process tree), others {others(b):.2f} cores ({runs})", flush=True)
                if args.timeline:
                    print("\n".join("      " + t for t in b["timeline"]), flush=True)

    rows = [["bare chain, ms per image (1 process)", spread([s.cpu / n * 1000 for s in bare], 1), "", ""],
            ["bare chain, ms per image, on every core at once / 1 process",
             spread([e / n * 1000 for e in every], 1) + " / " + spread([e / s.cpu for s, e in zip(bare, every)]),
             "", ""]]
    for kind, got in builds.items():
        # Pair each build with the bare measurement of its own round.
        frac = [s.cpu / (cpus * b["phase"]) for s, b in zip(bare, got)]
        whole = [s.cpu / (cpus * b["wall"]) for s, b in zip(bare, got)]
        to_audit = [s.cpu / (cpus * b["to_audit_end"]) for s, b in zip(bare, got)]
        from_first = [s.cpu / (cpus * b["first_shard_to_audit_end"]) for s, b in zip(bare, got)]
        # On a shared machine: the cores left to this build (CPUs less what others used meanwhile),
        # and how much of the build's own CPU was codec work (the rest: Dagster, reads, hashes, check).
        left = [s.cpu / (max(cpus - others(b), 0.1) * b["wall"]) for s, b in zip(bare, got)]
        share = [s.cpu / b["tree_cpu"] for s, b in zip(bare, got)]
        name = "automatic" if kind == 0 else str(kind)
        goal = kind == 0
        rows += [
            [f"--parallel {name}: cores encoding, the command's start to the audit's end", spread(to_audit),
             f">= {GOAL}" if goal else "", met(statistics.median(to_audit) >= GOAL) if goal else ""],
            [f"--parallel {name}: cores encoding, the first shard to the audit's end", spread(from_first),
             f">= {GOAL}" if goal else "", met(statistics.median(from_first) >= GOAL) if goal else ""],
            [f"--parallel {name}: same two, against the bare chain on every core at once",
             spread([e / (cpus * b["to_audit_end"]) for e, b in zip(every, got)]) + " / "
             + spread([e / (cpus * b["first_shard_to_audit_end"]) for e, b in zip(every, got)]), "", ""],
            [f"--parallel {name}: wall s: start-up to the shards' line / shard phase / audit / to exit",
             " / ".join(f"{statistics.median([b[k] for b in got]):.1f}"
                        for k in ("start_up", "phase", "audit", "wall")), "", ""],
            [f"--parallel {name}: shard phase, s", spread([b["phase"] for b in got], 1), "", ""],
            [f"--parallel {name}: cores encoding over the shard phase", spread(frac), "", ""],
            [f"--parallel {name}: cores encoding over the whole command, to the process's exit", spread(whole), "", ""],
            [f"--parallel {name}: cores encoding over the whole command, of the cores others left", spread(left), "", ""],
            [f"--parallel {name}: bare-chain CPU / the build's CPU (process tree)", spread(share), "", ""],
            [f"--parallel {name}: other processes meanwhile, cores",
             spread([others(b) for b in got]), "", ""],
            [f"--parallel {name}: over the shard phase, CPU s of the imnet process / encode workers / rest",
             " / ".join(f"{statistics.median(x):.1f}" for x in zip(*[phase_cpu(b) for b in got])), "", ""],
            [f"--parallel {name}: the imnet process's CPU s: to the shards' line / shard phase / audit",
             " / ".join(f"{statistics.median(x):.2f}" for x in zip(*[main_cpu_by_phase(b) for b in got])), "", ""],
            [f"--parallel {name}: encode workers' CPU per image / the bare chain's (whole command): 1 process / every core",
             spread([workers_cpu(b) / s.cpu for s, b in zip(bare, got)]) + " / "
             + spread([workers_cpu(b) / e for e, b in zip(every, got)]), "", ""],
            [f"--parallel {name}: the imnet process's CPU s (to its exit) / the rest of the tree's (forkserver, helpers)",
             spread([max(c for (pid, _), c in b["cpu_at_exit"].items() if pid == b["main_pid"]) for b in got], 2)
             + " / " + spread([b["tree_cpu"] - workers_cpu(b) - max(c for (pid, _), c in b["cpu_at_exit"].items()
                                                               if pid == b["main_pid"]) for b in got], 2), "", ""],
            [f"--parallel {name}: cores idle over the shard phase (cores x wall - the tree's CPU), share",
             spread([1 - sum(phase_cpu(b)) / (cpus * b["phase"]) for b in got]), "", ""],
        ]
    return f"imnet build of {args.shards} x {args.images} images on {cpus} CPUs against the bare chain", rows


if __name__ == "__main__":
    main()
