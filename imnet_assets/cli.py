"""imnet: build, audit and inspect the ImageNet Winter21 WebP WebDataset release.

Settings come from IMNET_* variables, in the environment or in the .env file at the project root
(the environment wins); relative paths resolve against the project root."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .core.fs import StorageError
from .settings import Settings, SettingsError, apply_env_file, shard_key

DEMO_SHARDS = 8
STATUS_WAIT_S = 10.0  # how long `imnet status` waits for a catalog writer before reporting without it


def _redact(text: str) -> str:
    from .core.fs import redact

    return redact(text)


_SHARD_NUMBER = re.compile(r"[0-9]{1,4}")  # ASCII digits only (int() also takes "+3", "0_1", "٣")


def parse_shards(spec: str | None, keys: list[str]) -> list[str]:
    """`0000-0015,0042` -> those partition keys (all when spec is empty or 'all'; none for 'none')."""
    if not spec or spec == "all":
        return list(keys)
    if spec == "none":
        return []
    known = set(keys)
    chosen: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, sep, hi = (p.strip() for p in part.partition("-"))
        if not _SHARD_NUMBER.fullmatch(lo) or (sep and not _SHARD_NUMBER.fullmatch(hi)):
            raise SettingsError(f"--shards: {part!r} is not a shard number or range like 0000-0015")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise SettingsError(f"--shards: {part!r} is a backwards range (write the lower shard first)")
        for i in range(a, b + 1):
            k = shard_key(i)
            if k not in known:
                raise SettingsError(f"--shards: shard {k} does not exist (IMNET_NUM_SHARDS={len(keys)})")
            if k not in chosen:
                chosen.append(k)
    if not chosen:
        raise SettingsError(f"--shards: {spec!r} selects no shard")
    return chosen


@contextlib.contextmanager
def _console_kept(build: Build):
    """Keeps this command's output on the terminal while shard runs execute in threads. Dagster
    captures a step's output for the UI by pointing file descriptors 1 and 2 at the step's log
    file for as long as the step runs, process-wide, and points them back at what it found when the
    step began: with two runs at once, a step that began while the other's capture was on points
    them, when it ends, at the other's file for good. So progress lines go to a copy of the
    terminal's descriptor taken before, and 1 and 2 are put back when the runs are done."""
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    out = build.out
    if out is sys.stdout:
        sys.stdout.flush()
        build.out = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    try:
        yield
    finally:
        if build.out is not out:
            build.out.close()
            build.out = out
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


BUILD_LEASE = "build"  # <out root>/_locks/build/: the lease of the build writing the out root
INSTANCE_LOCK = ".imnet-instance.lock"  # in DAGSTER_HOME: one process at a time creates the instance's storage


def dagster_instance(prepare_out=None):
    """DagsterInstance.get() for DAGSTER_HOME, one process of this machine at a time: on a fresh
    home, the first look creates the SQLite storages and stamps their schema (alembic_version),
    and two processes doing that at once collide (sqlite3.IntegrityError). A file lock in the home
    holds every other `imnet` until the first has created them; later looks wait only for each
    other's few milliseconds. `prepare_out`: the home is made and given its dagster.yaml first
    (prepare_dagster_home, saying so there), inside the lock too: a second process must not read
    a dagster.yaml the first is still copying."""
    from dagster import DagsterInstance
    from filelock import FileLock

    from .settings import dagster_home

    if prepare_out is not None:
        home = dagster_home()
        with contextlib.suppress(OSError):  # prepare_dagster_home says what it cannot do
            home.mkdir(parents=True, exist_ok=True)
    else:
        home = Path(os.environ["DAGSTER_HOME"])
    lock = FileLock(os.path.join(home, INSTANCE_LOCK))
    try:
        lock.acquire()
    except OSError:  # a home this user may not write (a read-only `imnet status`): nothing to create there
        if prepare_out is not None:
            prepare_dagster_home(prepare_out)
        return DagsterInstance.get()
    try:
        if prepare_out is not None:
            prepare_dagster_home(prepare_out)
        instance = DagsterInstance.get()
        # every storage made and migrated now, inside the lock (some are made on first use)
        instance.get_runs(limit=1)
        instance.event_log_storage  # noqa: B018
        instance.schedule_storage  # noqa: B018
    finally:
        lock.release()
    return instance


class OutRootBusy(RuntimeError):
    """Another `imnet build` holds the out root (its lease names it)."""


def dagster_yaml_source() -> Path | None:
    """The project's dagster.yaml: the project root's, else the one beside this package's source."""
    from .settings import project_root

    for folder in (project_root(), Path(__file__).resolve().parent.parent):
        if (folder / "dagster.yaml").is_file():
            return folder / "dagster.yaml"
    return None


def prepare_dagster_home(out=sys.stdout) -> Path:
    """DAGSTER_HOME for this process (set when only `.env` or the default named it), the folder
    made, and the project's dagster.yaml copied into it when it has none (its run queue, limits
    and `telemetry: false`)."""
    import shutil

    from .settings import dagster_home

    home = dagster_home()
    os.environ["DAGSTER_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if not target.exists():
        source = dagster_yaml_source()
        try:
            if source is not None:
                shutil.copyfile(source, target)
            else:
                target.write_text("telemetry:\n  enabled: false\n")
        except OSError as e:  # a read-only home: Dagster's defaults, as before
            print(f"imnet: no dagster.yaml in DAGSTER_HOME {home}, and none could be put there ({e})",
                  file=out, flush=True)
        else:
            print(f"imnet: Dagster instance at {home} (DAGSTER_HOME), with {source or 'a minimal dagster.yaml'}",
                  file=out, flush=True)
    return home


class Build:
    """Materializes stages through Dagster, in this process, recording into the instance."""

    def __init__(self, settings: Settings, out=sys.stdout, verbose: bool = False, keep_going: bool = False,
                 parallel: int | None = None):
        from .definitions import build_definitions

        self.settings = settings
        self.defs = build_definitions(settings)
        self.assets = list(self.defs.assets)
        # The persistent instance the UI reads (DAGSTER_HOME, by default data/dagster_home under the
        # project root): what the build does shows there, and its history carries over.
        self.instance = dagster_instance(prepare_out=out)
        self.out = out
        # Dagster's console logger prints each failed step's whole stack trace; this command names
        # the failure itself (`fail`), so by default only -v shows them (the instance keeps them all)
        self.log_level = "WARNING" if verbose else "CRITICAL"
        self.keep_going = keep_going
        self.parallel = parallel if parallel is not None else settings.parallel_shards
        self._say_lock = threading.Lock()
        self.lease = None  # the out root's build lease, once this build is about to write (hold_out_root)

    def say(self, msg: str) -> None:
        with self._say_lock:  # shard runs finish in several threads: whole lines only
            print(msg, file=self.out, flush=True)

    def materialize(self, selection: list[str], partition_key: str | None = None):
        from dagster import materialize

        from .schedules import worker_place

        result = materialize(
            self.assets, selection=selection, partition_key=partition_key, instance=self.instance,
            raise_on_error=False, tags={"imnet/launched_by": "imnet build", **worker_place()},
            run_config={"loggers": {"console": {"config": {"log_level": self.log_level}}}},
        )
        failures = []
        for ev in result.get_step_failure_events():
            err = ev.step_failure_data.error
            if err is not None and err.cls_name == "DagsterExecutionInterruptedError":
                raise KeyboardInterrupt  # Ctrl-C inside the run: say so, not "FAILED" (main)
            while err is not None and err.cause is not None:
                err = err.cause  # the user code's own error, not Dagster's wrapper
            failures.append(f"{ev.step_key} failed: {err.message.strip() if err else 'unknown error'}")
        for ev in result.get_asset_check_evaluations():
            if not ev.passed:
                failures.append(f"check {ev.asset_key.to_user_string()}:{ev.check_name} failed: {ev.description}")
        if not result.success and not failures:
            failures.append(f"run {result.run_id} failed")
        return result, failures

    def hold_out_root(self) -> bool:
        """Take the out root's build lease (core.lease) before this build writes anything: one
        build at a time per out root (SPEC: Failure behaviour). A build with nothing to do takes
        none (it writes nothing). True when taken by this call: the caller then looks again at
        what it was about to do, which a build that just ended may have done. Raises OutRootBusy
        naming the holder when another build holds it; a holder whose process is gone (kill -9),
        or of another host that stopped renewing it, is taken over."""
        from .core.lease import LeaseHeld, LeaseLost, acquire

        if self.lease is not None:
            try:
                self.lease.check()
            except LeaseLost as e:
                raise OutRootBusy(f"this build lost the out root {self.settings.out_root}: {e}") from None
            return False

        try:
            self.lease = acquire(self.settings.out_root, BUILD_LEASE, "imnet build")
        except LeaseHeld as e:
            raise self._busy(str(e)) from None
        return True

    def _busy(self, held: str) -> OutRootBusy:
        return OutRootBusy(f"the out root {self.settings.out_root} is in use by another build: {held}; wait for it "
                           "to end, or stop it (the lease of a process that is gone is taken over)")

    def refuse_if_held(self) -> None:
        """Refuse at once when another build holds the out root, before reading the catalog (a
        reader waits for the catalog's writer: at full size the index stage holds it for an hour)."""
        from .core.lease import describe, holder_of

        held = holder_of(self.settings.out_root, BUILD_LEASE)
        if held is not None:
            raise self._busy(f"{describe(held[0])} holds it (lease {held[1]})")

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def run(self, shards_spec: str | None) -> int:
        try:
            return self._run(shards_spec)
        finally:
            # Shard runs left going in other threads (Ctrl-C) end with this process: its lease
            # then names a process that is gone, and the next build takes it over.
            if not getattr(self, "runs_left_behind", 0):
                self.release()

    def _shards_to_build(self, wanted: list[str]) -> tuple[list[str], list[str]]:
        """(partitions to build, partitions with a run in flight elsewhere) of those wanted."""
        from .schedules import shard_partition_status

        status = shard_partition_status(self.settings, self.instance)
        todo = [k for k in wanted if status[k] != "fresh"]
        busy = [k for k in todo if status[k] == "in_flight"]
        return [k for k in todo if k not in busy], busy

    def _run(self, shards_spec: str | None) -> int:
        from .core.stages import stale_stages
        from .schedules import fail_dead_runs

        s = self.settings
        self.say(f"imnet build: raw {s.raw_root} -> out {s.out_root}, catalog {s.catalog}, "
                 f"{s.num_shards} shards, {s.workers} workers, instance "
                 f"{os.environ.get('DAGSTER_HOME') or '(ephemeral)'}")
        wanted = parse_shards(shards_spec, s.partition_keys)
        self.refuse_if_held()
        for stage in ["raw_tars", "synset_manifest", "filtered_index", "shuffled_plan"]:
            if stage not in stale_stages(s, log=self.say) or (
                    self.hold_out_root() and stage not in stale_stages(s, log=lambda _m: None)):
                self.say(f"  {stage:16s} fresh, skipped")
                continue
            t0 = time.perf_counter()
            result, failures = self.materialize([stage])
            if failures:
                return self.fail(stage, failures)
            self.say(f"  {stage:16s} materialized in {time.perf_counter() - t0:.1f}s  {self._facts(result, stage)}")
        if self.instance is not None:
            fail_dead_runs(self.instance, log=lambda m: self.say(f"  wds_shards: {m}"))
        todo, busy = self._shards_to_build(wanted)
        if todo and self.hold_out_root():
            todo, busy = self._shards_to_build(wanted)
        if busy:
            self.say(f"  wds_shards: {len(busy)} shards have a run in flight elsewhere, left to it: {busy[:8]}")
        self.say(f"  wds_shards: {len(wanted) - len(todo) - len(busy)} of {len(wanted)} selected shards fresh, "
                 f"{len(todo)} to build")
        failed = self.build_shards(todo)
        if not wanted:
            self.say("  shards and audit: skipped (--shards none: the catalog stages and the plan only)")
            return 0
        if failed:
            return self.fail(f"wds_shards[{', '.join(failed)}]", [
                f"{len(failed)} of {len(todo)} shards failed: {', '.join(failed)}",
                "shard_audit: skipped (it vouches for every shard; run `imnet build` again once they build)"])
        if set(wanted) != set(s.partition_keys):
            self.say("  shard_audit: skipped (only some shards were selected; run `imnet build` for all)")
            return 0
        if self._audit_fresh(todo) or (self.hold_out_root() and self._audit_fresh(todo)):
            self.say("  shard_audit      fresh, skipped")
        else:
            result, failures = self.materialize(["shard_audit"])
            if failures:
                return self.fail("shard_audit", failures)
            md = self._metadata(result, "shard_audit")
            self.say(f"  shard_audit      ok: {md.get('samples')} samples in {md.get('shards')} shards, "
                     f"{md.get('excluded')} excluded, {md.get('repaired')} repaired")
        self.say(f"shards: {s.out_root}  (_info.json beside them); catalog: {s.catalog}")
        return 0

    def _audit_fresh(self, built: list[str]) -> bool:
        from .core.audit import audit_fingerprint

        fp = audit_fingerprint(self.settings)
        return not built and fp is not None and self._stage_fp("shard_audit") == fp

    def runs_at_once(self, todo: int) -> int:
        """Shard runs to run at once: `--parallel` / IMNET_PARALLEL_SHARDS, else about the cores
        over IMNET_WORKERS and at least 2 (one run's start, commit and check leave its workers idle:
        a second run fills the gap), at most the instance's pool limit (dagster.yaml's `pools:
        default_limit`, which bounds the shard runs the daemon launches)."""
        if self.parallel:
            return max(1, min(self.parallel, todo))
        cpus = os.cpu_count() or 1
        runs = max(2, round(cpus / self.settings.workers))
        limit = self.instance.global_op_concurrency_default_limit if self.instance is not None else None
        if limit:
            runs = min(runs, limit)
        return max(1, min(runs, todo))

    def build_shards(self, todo: list[str]) -> list[str]:
        """Materialize each shard partition in `todo`, a Dagster run each, several at once (threads
        of this process: each run is recorded in the instance like any other). Returns the failed
        keys, in `todo` order. On a failure, no further shard starts unless --keep-going; the runs
        already going finish."""
        if not todo:
            return []
        runs = self.runs_at_once(len(todo))
        if runs > 1 and not self._threads_safe():
            self.say("  wds_shards: one shard run at a time (the instance's python_logs.dagster_handler_config "
                     "makes Dagster reconfigure logging per run, which concurrent runs in one process cannot share)")
            runs = 1
        if runs > 1:
            self.say(f"  wds_shards: {runs} shard runs at once, {self.settings.workers} workers each")
        if self.settings.workers > 1:
            # The encode workers (and their forkserver's imports) start now, while the first runs
            # are being set up in Dagster, instead of when the first run asks for them.
            from .core.procpool import shared_pool

            shared_pool(self.settings.workers)
        with _console_kept(self):
            return self._build_shards(todo, runs)

    def _build_shards(self, todo: list[str], runs: int) -> list[str]:
        started, images, done = time.perf_counter(), 0, 0
        failed: list[str] = []
        for key, result, failures in self._shard_runs(todo, runs, stop=lambda: bool(failed) and not self.keep_going):
            done += 1
            if failures:
                failed.append(key)
                self.say(f"  [{done}/{len(todo)}] shard {key}: FAILED")
                for f in failures:
                    self.say("    " + _redact(f))
                if not self.keep_going:
                    self.say("  wds_shards: stopping at the first failure (--keep-going builds the others)")
                continue
            md = self._metadata(result, "wds_shards")
            images += int(md.get("samples", 0))
            elapsed = time.perf_counter() - started
            eta = elapsed / done * (len(todo) - done)
            self.say(f"  [{done}/{len(todo)}] shard {key}: {md.get('samples')} samples "
                     f"({md.get('excluded')} excluded, {md.get('repaired')} repaired), "
                     f"{md.get('images_per_s')} img/s; overall {images / elapsed:.1f} img/s, eta {eta:.0f}s")
        order = {k: i for i, k in enumerate(todo)}
        return sorted(failed, key=order.__getitem__)

    def _threads_safe(self) -> bool:
        """Whether Dagster runs may execute in several threads of this process at once. Dagster
        (1.13) calls logging.config.dictConfig at the start of every run of an instance with
        settings (a dagster.yaml), even when it configures no handlers: that closes every logging
        handler of the process under logging's module lock, and deadlocks against a run in another
        thread emitting an event (each holds the lock the other waits for). With no
        python_logs.dagster_handler_config, that call yields no handlers: skipping it changes nothing
        else, so it is skipped for this process's instance."""
        if self.instance is None:
            return True
        if self.instance.get_python_log_dagster_handler_config():
            return False
        self.instance.get_yaml_python_handlers = list  # -> []: what the skipped call returns here
        return True

    def _shard_runs(self, todo: list[str], runs: int, stop) -> Iterator[tuple[str, object, list[str]]]:
        """(key, result, failures) per shard run, as they finish; no new run starts once `stop()`."""
        if runs <= 1:  # in this thread: Ctrl-C interrupts the run itself
            for key in todo:
                if stop():
                    return
                yield (key, *self.materialize(["wds_shards"], partition_key=key))
            return
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(runs, thread_name_prefix="imnet-shard-run")
        queue = iter(todo)
        pending: dict = {}
        try:
            for key in queue:
                pending[pool.submit(self.materialize, ["wds_shards"], key)] = key
                if len(pending) >= runs:
                    break
            while pending:
                finished = _first_done(pending)
                for fut in finished:
                    key = pending.pop(fut)
                    yield (key, *fut.result())
                    if not stop():
                        nxt = next(queue, None)
                        if nxt is not None:
                            pending[pool.submit(self.materialize, ["wds_shards"], nxt)] = nxt
        except BaseException:
            # Ctrl-C reaches this thread only; the runs in the others cannot be interrupted from
            # here: they end with this process (main), and the next build marks them failed.
            pool.shutdown(wait=False, cancel_futures=True)
            self.runs_left_behind = len(pending)
            raise
        pool.shutdown(wait=True)

    def _stage_fp(self, stage: str) -> str | None:
        from .catalog import open_reader

        if not os.path.exists(self.settings.catalog):
            return None
        with open_reader(self.settings.catalog, say=lambda m: self.say(f"  {m}")) as cat:
            return cat.stage_fingerprint(stage)

    def _metadata(self, result, asset: str) -> dict:
        for ev in result.get_asset_materialization_events():
            mat = ev.event_specific_data.materialization
            if mat.asset_key.to_user_string() == asset:
                return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
        return {}

    # Counts a stage reports as 0 until a later stage has counted them: raw_tars' members and the
    # synset manifest's images come from filtered_index's walk of the tars' headers.
    NOT_COUNTED_YET = {"raw_tars": "members", "synset_manifest": "images"}

    def _facts(self, result, asset: str) -> str:
        md = self._metadata(result, asset)
        shown = {k: v for k, v in md.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and not (v == 0 and self.NOT_COUNTED_YET.get(asset) == k)}
        return ", ".join(f"{k}={v}" for k, v in list(shown.items())[:6])

    def fail(self, stage: str, failures: list[str]) -> int:
        from .core.fs import redact

        self.say(f"imnet build: {stage} FAILED")
        for f in failures:
            self.say("  " + redact(f))
        if self.log_level == "CRITICAL":
            self.say("  (the full error with its stack trace: run again with -v, or see the run in the Dagster UI"
                     " when DAGSTER_HOME is set)")
        return 1


def cmd_sample_raw(args) -> int:
    from .core.sample_raw import write_sample_raw

    summary = write_sample_raw(args.dir, synsets=args.synsets, images=args.images, seed=args.seed, layout=args.layout)
    what = "synset folders" if args.layout == "folders" else "synset tars"
    print(f"wrote {len(summary.wnids)} {what} with {summary.total_members} files to {args.dir}")
    print("quirks: " + ", ".join(f"{k} ({len(v)})" for k, v in sorted(summary.quirks.items())))
    return 0


def cmd_build(args) -> int:
    from .core.procpool import start_forkserver

    settings = Settings.from_env()  # a configuration error before any process starts or anything is written
    start_forkserver()  # its imports overlap Dagster's; scan and encode workers then fork at once
    build = Build(settings, verbose=args.verbose, keep_going=args.keep_going, parallel=args.parallel)
    try:
        return build.run(args.shards)
    except KeyboardInterrupt:
        left = getattr(build, "runs_left_behind", 0)
        if not left:
            raise
        # Shard runs in other threads cannot be interrupted, and Python would wait for them at
        # exit: end now. Their workers exit with this process; their partial files are removed by
        # the next run of each shard, and the next `imnet build` marks their runs failed.
        print(f"imnet: interrupted; {left} shard runs in flight stopped with it (the next `imnet build` "
              "marks them failed and builds them again)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)


def demo_settings(root: Path) -> dict[str, str]:
    """What `imnet demo` writes into the project's `.env`: its shard count, the data/ paths and
    an instance under data/ (DAGSTER_HOME is absolute: Dagster's tools refuse a relative one)."""
    return {
        "IMNET_NUM_SHARDS": str(DEMO_SHARDS),
        "IMNET_RAW_ROOT": "data/raw",
        "IMNET_OUT_ROOT": "data/out",
        "IMNET_CATALOG": "data/catalog.duckdb",
        "DAGSTER_HOME": str(root / "data" / "dagster_home"),
    }


def _env_value(value: str) -> str:
    """A value as a .env line holds it: double-quoted (JSON's escapes, which python-dotenv reads)
    when it has a space, a quote or a '#'."""
    import json

    return json.dumps(value) if re.search(r"[\s#'\"\\]", value) else value


def write_env_settings(path: Path, wanted: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Add to the `.env` at `path` each of `wanted` it does not set yet (the value from the
    environment when set there, else the one given), keeping every line it has; atomically.
    Returns (what was added, the names it already had)."""
    from dotenv import dotenv_values

    from .core import fs

    text = path.read_text(encoding="utf-8") if path.exists() else ""
    have = dotenv_values(path) if path.exists() else {}
    added = {name: os.environ.get(name) or value for name, value in wanted.items() if name not in have}
    kept = [name for name in wanted if name in have]
    if added:
        if text and not text.endswith("\n"):
            text += "\n"
        text += "# written by `imnet demo` (the environment wins over this file)\n"
        text += "".join(f"{name}={_env_value(value)}\n" for name, value in added.items())
        fs.write_atomic(str(path), text.encode("utf-8"))
    return added, kept


def cmd_demo(args) -> int:
    from .core import fs
    from .core.sample_raw import write_sample_raw
    from .settings import env_file, project_root

    root = project_root()
    added, kept = write_env_settings(env_file(root), demo_settings(root))
    apply_env_file(root)
    if added:
        print(f"imnet demo: wrote {', '.join(f'{k}={v}' for k, v in added.items())} to {env_file(root)}")
    if kept:
        print(f"imnet demo: kept {', '.join(kept)} as {env_file(root)} sets them")
    s = Settings.from_env()
    prepare_dagster_home()
    files, folders = fs.listdir_and_folders(s.raw_root)
    # only into an empty root (or one holding what an interrupted sample-raw left): never beside a release
    if not folders and all(e["name"] in ("words.txt", "gloss.txt") or e["name"].endswith(".tmp") for e in files):
        summary = write_sample_raw(s.raw_root, synsets=args.synsets, images=args.images, seed=0)
        print(f"imnet demo: wrote a sample raw release ({len(summary.wnids)} synsets, "
              f"{summary.total_members} files with ImageNet's quirks) to {s.raw_root}")
    code = Build(s, verbose=args.verbose).run(None)
    if code == 0:
        print(f"demo done: shards, _info.json, README.md (the card) and classes.tsv in {s.out_root}.")
        print("Next: `imnet status`, `imnet lineage <key>`, `imnet verify`, and `dg dev` (or "
              f"`dagster dev -w workspace.yaml` in {root}) for the UI on the instance at {os.environ['DAGSTER_HOME']}.")
    return code


def cmd_status(args) -> int:
    from collections import Counter

    from .catalog import CatalogBusy, open_reader
    from .core import changed_sources, fs
    from .core.audit import plan_mismatch
    from .core.plan import read_index
    from .core.stages import stale_stages
    from .schedules import shard_partition_status
    from .settings import dagster_home, env_file, project_root

    s = Settings.from_env()
    root = project_root()
    home = dagster_home(root)
    has_home = home.is_dir()
    audit, audit_unknown = None, "unknown here (no catalog)"  # its record in the catalog, or why not known
    if why := plan_mismatch(s, read_index(s.out_root)):
        print(f"note: {why}")
    stages = ["raw_tars", "synset_manifest", "filtered_index", "shuffled_plan"]
    # Comparing the stages with the raw root means listing it: 19,167 tars are 20 listing pages,
    # seconds of requests and of parsing on object storage. There, that is asked for (--raw).
    relist = args.raw or not fs.is_remote(s.raw_root)
    stale = None
    if os.path.exists(s.catalog):
        try:
            # Held open while the stages are compared: no writer can start in between.
            with open_reader(s.catalog, say=lambda m: print(m, file=sys.stderr, flush=True),
                             wait_s=STATUS_WAIT_S) as cat:
                stale = stale_stages(s, log=lambda _m: None) if relist else None
                built = None if relist else {stage: cat.stage_fingerprint(stage) is not None for stage in stages}
                audit, audit_unknown = cat.stage_fingerprint("shard_audit"), None
        except CatalogBusy as e:
            audit_unknown = "unknown now (the catalog is being written)"
            print(f"catalog stages   unknown now: {e} (waited {STATUS_WAIT_S:.0f}s; `imnet status` again "
                  "once it is done)")
        else:
            for stage in stages:
                if built is None:
                    print(f"{stage:16s} {'stale' if stage in stale else 'fresh'}")
                else:
                    print(f"{stage:16s} {'built' if built[stage] else 'not built'}")
            if built is not None:
                print("  (the raw root, on object storage, was not listed: `imnet status --raw` compares "
                      "the stages with it)")
    else:
        print(f"catalog stages   unknown here: no catalog at {s.catalog} (IMNET_CATALOG; it lives on the "
              "machine that builds the stages and runs the audit)")
    # tars a shard run found changed in place since indexing (core/changed_sources.py)
    changed = changed_sources.pending(s.out_root)
    for marker in changed.values():
        print(f"  {marker.describe()}: the next `imnet build` indexes it again")
    if has_home:
        os.environ["DAGSTER_HOME"] = str(home)
    inst = dagster_instance() if has_home else None
    status = shard_partition_status(s, inst)
    counts = Counter(status.values())
    print("wds_shards       " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    if changed or (stale and {"filtered_index", "shuffled_plan"} & set(stale)):
        print("  (judged against the published plan, which is stale: `imnet build` makes the plan again first, "
              "then builds the shards whose plan slices change)")
    not_fresh = [k for k, v in status.items() if v != "fresh"]
    if not_fresh:
        print("  not fresh: " + ", ".join(not_fresh[:32]) + (" ..." if len(not_fresh) > 32 else ""))
    print(f"shard_audit      {audit_unknown or _audit_state(s, audit, not_fresh)}")
    dotenv = env_file(root)
    print(f"project root     {root}  ({'settings from .env there and the environment' if dotenv.is_file() else 'no .env'})")
    print(f"  raw root       {fs.redact(s.raw_root)}")
    print(f"  out root       {fs.redact(s.out_root)}")
    print(f"  catalog        {s.catalog}")
    print(f"  DAGSTER_HOME   {home}" + ("" if has_home else "  (no instance there yet: `imnet build` makes it)"))
    return 0


def _audit_state(s: Settings, recorded: str | None, not_fresh: list[str]) -> str:
    """The audit: fresh (its record in the catalog is the fingerprint of the shards as they are
    now), stale, or not built."""
    from .core.audit import audit_fingerprint

    if recorded is None:
        return "not built"
    if not_fresh:
        return f"stale ({len(not_fresh)} shards not fresh)"
    return "fresh" if audit_fingerprint(s) == recorded else "stale (the shards changed since it ran)"


def cmd_lineage(args) -> int:
    from .catalog import open_reader
    from .core import fs
    from .core.rawfolders import describe_source

    s = Settings.from_env()
    with open_reader(s.catalog) as cat:
        rows = cat.dicts("lineage", {"key": args.key})
    if not rows:
        print(f"no image with key {args.key!r} in {s.catalog}", file=sys.stderr)
        return 1
    for r in rows:
        print(f"key          {r['key']}  ({r['wnid']})")
        where, how = describe_source(s.raw_root, r["tar"], r["member"], r["offset"])
        print(f"source       {where}")
        print(f"             {how}  size {r['size']}  sha256 {r['sha256'] or '(unreadable)'}")
        print(f"status       {r['status']}" + (f"  ({r['reason']})" if r["reason"] else ""))
        if r["shard"] is not None:
            where = fs.join(s.out_root, r["path"] or s.shard_name(r["shard"]))
            if r["position"] is None:  # planned there; not written (yet, or refused by the encoder)
                print(f"shard        {r['shard']}  plan position {r['plan_position']}  file {where}")
            else:
                moved = f" (plan position {r['plan_position']})" if r["position"] != r["plan_position"] else ""
                print(f"shard        {r['shard']}  position {r['position']}{moved}  file {where}")
            if not r["run_id"]:
                print("written by   (not written yet: run `imnet build`)")
            elif r["webp_sha256"] is None:
                print(f"written by   run {r['run_id']}  code version {r['code_version']}  at {r['written_at']}"
                      "  (this image is not in the shard: excluded when encoding)")
            else:
                print(f"written by   run {r['run_id']}  code version {r['code_version']}  at {r['written_at']}")
                print(f"webp sha256  {r['webp_sha256']}  repaired {r['repaired']}")
        print()
    return 0


VERIFY_SHOWN = 20  # problems printed per shard; the rest are counted
PROGRESS_EVERY_S = 10.0


def _catalog_rows(path: str, shards: list[dict]) -> Iterator[tuple[dict, list[tuple]]]:
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

    from .catalog import open_reader

    with tempfile.TemporaryFile(prefix="imnet-verify-") as spool:
        where: dict[str, tuple[int, int]] = {}

        def keep(shard: str | None, rows: list[tuple]) -> None:
            if shard is not None:
                data = zlib.compress(pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL), 1)
                where[shard] = (spool.tell(), len(data))
                spool.write(data)

        with open_reader(path) as cat:
            cat.run("verify_memory")
            cur = cat.run("verify_samples", {"shards": [sh["shard"] for sh in shards]})
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
    """A progress line every 5% of the shards or every PROGRESS_EVERY_S, whichever comes first."""

    def __init__(self, total: int, total_bytes: int):
        self.total, self.total_bytes = total, total_bytes
        self.done = self.failed = self.bytes = 0
        self.started = self.last = time.perf_counter()
        self.step = max(1, total // 20)

    def add(self, nbytes: int, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        self.bytes += nbytes
        now = time.perf_counter()
        if self.done % self.step == 0 or self.done == self.total or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            elapsed = max(now - self.started, 1e-9)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate else 0
            print(f"verify: {self.done}/{self.total} shards checked ({self.failed} failed), {rate:.1f} shards/s, "
                  f"{self.bytes / 1e6 / elapsed:.0f} MB/s, eta {eta:.0f}s", flush=True)


def _first_done(pending) -> set:
    """The futures of `pending` that are done, waiting until one is. The wait wakes every quarter
    second: a Ctrl-C that the kernel delivers to another thread (a shard run's, a reader's) only
    sets Python's flag, and a main thread blocked in one long wait would see it once a shard run
    finished (minutes at the real size) instead of at once."""
    from concurrent.futures import FIRST_COMPLETED, wait

    while True:
        finished, _ = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
        if finished:
            return finished


def _checked(jobs: int, tasks: Iterator[tuple[dict, str, list[tuple]]], decode: bool):
    """(shard record, problems) per task, checked in `jobs` processes (here when 1), as they
    finish; at most jobs + 2 shards' rows are in memory."""
    from .core.verify import verify_catalog_shard

    if jobs <= 1:
        for sh, url, rows in tasks:
            yield sh, verify_catalog_shard(url, sh, rows, decode)
        return
    from .core.procpool import process_pool

    with process_pool(jobs) as pool:
        pending: dict = {}
        for sh, url, rows in tasks:
            pending[pool.submit(verify_catalog_shard, url, sh, rows, decode)] = sh
            del rows
            while len(pending) >= jobs + 2:
                finished = _first_done(pending)
                for fut in finished:
                    yield pending.pop(fut), fut.result()
        while pending:
            finished = _first_done(pending)
            for fut in finished:
                yield pending.pop(fut), fut.result()


def _verify_info(s: Settings, shards: list[dict]) -> list[str]:
    """`_info.json` is exactly the document the catalog's shards give: the same shards, in order,
    in the same splits, with their sample counts and totals."""
    import json

    from .core import fs
    from .core.audit import info_differences, info_document

    url = fs.join(s.out_root, "_info.json")
    if not fs.exists(url):
        return [f"{url} is missing"]
    try:
        doc = json.loads(fs.read_bytes(url))
    except ValueError as e:
        return [f"{url} is not JSON ({e})"]
    lengths = {sh["shard"]: sh["num_samples"] for sh in shards}
    if sorted(lengths) != s.partition_keys:
        return [f"the catalog records {len(lengths)} shards, the plan under {s.out_root} has "
                f"{s.num_shards}: run `imnet build`"]
    return info_differences(doc, info_document(s, lengths))


def _as_built(s: Settings) -> Settings:
    """`s` with the shard layout the out root was built with (its plan index: shard count and
    holdout), which `imnet demo` chooses itself when IMNET_NUM_SHARDS is not set."""
    import dataclasses

    from .core.plan import read_index

    index = read_index(s.out_root)
    if index is None:
        return s
    return dataclasses.replace(s, num_shards=index["num_shards"],
                               holdout=tuple((name, n) for name, n in index["holdout"]))


def cmd_verify(args) -> int:
    from .catalog import open_reader
    from .core import fs
    from .core.audit import conservation_problems, stray_problem, stray_shards

    s = _as_built(Settings.from_env())
    wanted = parse_shards(args.shards, s.partition_keys)
    every = set(wanted) == set(s.partition_keys)
    with open_reader(s.catalog) as cat:
        recorded = {sh["shard"]: sh for sh in cat.dicts("verify_shards")}
        # every raw member accounted for, per tar and per shard (the audit's blocking check too)
        conservation = conservation_problems(cat)
    if not recorded:
        print(f"no shards recorded in {s.catalog}: run `imnet build` first", file=sys.stderr)
        return 1
    jobs = args.jobs or s.workers
    unrecorded = [k for k in wanted if k not in recorded]
    shards = [recorded[k] for k in wanted if k in recorded]
    print(f"verify: {len(shards)} shards under {s.out_root} against {s.catalog}, {jobs} processes"
          + (", decoding every WebP" if args.decode else ""), flush=True)
    for k in unrecorded:
        print(f"FAIL shard {k}: not recorded in the catalog (not built, or not audited yet: run `imnet build`)")
    progress = _Progress(len(shards), sum(sh["bytes"] or 0 for sh in shards))
    tasks = ((sh, fs.join(s.out_root, sh["path"]), rows) for sh, rows in _catalog_rows(s.catalog, shards))
    bad = []
    for sh, problems in _checked(jobs, tasks, args.decode):
        label = f"shard {sh['shard']} ({sh['path']})"
        for p in problems[:VERIFY_SHOWN]:
            print(f"FAIL {label}: {p}")
        if len(problems) > VERIFY_SHOWN:
            print(f"FAIL {label}: ... and {len(problems) - VERIFY_SHOWN} more problems")
        if problems:
            bad.append(sh["shard"])
        elif args.verbose:
            print(f"ok   {label}: {sh['num_samples']} samples")
        progress.add(sh["bytes"] or 0, not problems)
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
    print(f"verify: {len(shards) - len(bad)} of {len(wanted)} shards ok" + (f", {failed} FAILED" if failed else "")
          + (f" ({', '.join(sorted(bad + unrecorded)[:16])}{' ...' if failed > 16 else ''})" if failed else "")
          + (", _info.json FAILED" if info_problems else "")
          + (f", {len(stray)} stray shard files" if stray else "")
          + (f", {len(conservation)} conservation differences" if conservation else "")
          + ("" if every else "; _info.json and stray files not checked (only some shards selected)"))
    return 1 if failed or info_problems or stray or conservation else 0


def stop_on_signals() -> None:
    """SIGTERM (a container stopped, a pod preempted) stops a command as Ctrl-C does: both raise
    KeyboardInterrupt in the main thread (the same cleanup, "imnet: interrupted", exit 130),
    whatever dispositions the process inherited. A process started with SIGINT ignored (`&` in a
    script, some supervisors) would otherwise keep it ignored, and Dagster, which points SIGTERM
    at whatever handles SIGINT each time a run in the main thread ends, would then ignore
    SIGTERM too. Only the main thread of the main interpreter can set handlers."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _positive(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text.strip()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="imnet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("sample-raw", help="write a small synthetic raw release with ImageNet's quirks")
    sp.add_argument("dir")
    sp.add_argument("--synsets", type=int, default=6)
    sp.add_argument("--images", type=int, default=40)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--layout", choices=["tars", "folders"], default="tars", help="tars: <wnid>.tar per synset "
                    "(as ImageNet distributes them); folders: the extracted layout <wnid>/<wnid>_<n>.JPEG")
    sp.set_defaults(func=cmd_sample_raw)
    sp = sub.add_parser("build", help="materialize every stage through Dagster, then shards, then the audit")
    sp.add_argument("--shards", help="shard partitions to build, e.g. 0000-0015,0042 (default all; 'none' "
                    "builds only the catalog stages and the plan)")
    sp.add_argument("--keep-going", action="store_true", help="when a shard fails, build every other one, then "
                    "exit non-zero naming the failed ones (the audit is skipped)")
    sp.add_argument("--parallel", type=_positive, metavar="N", help="shard runs at once (default "
                    "IMNET_PARALLEL_SHARDS, else about the CPUs over IMNET_WORKERS, at least 2)")
    sp.add_argument("-v", "--verbose", action="store_true", help="also print Dagster's warnings and errors "
                    "(with stack traces)")
    sp.set_defaults(func=cmd_build)
    sp = sub.add_parser("demo", help="write the demo's settings into the project's .env (8 shards, data/ paths, DAGSTER_HOME), sample-raw into the raw root when empty, then build")
    sp.add_argument("--synsets", type=int, default=6)
    sp.add_argument("--images", type=int, default=40)
    sp.add_argument("-v", "--verbose", action="store_true", help="as for build")
    sp.set_defaults(func=cmd_demo)
    sp = sub.add_parser("status", help="the resolved roots, and which stages, shard partitions and the audit are fresh")
    sp.add_argument("--raw", action="store_true", help="also list a raw root on object storage and compare "
                    "the catalog stages with it (20 listing pages at 19,167 tars)")
    sp.set_defaults(func=cmd_status)
    sp = sub.add_parser("lineage", help="where a sample came from and where it went")
    sp.add_argument("key")
    sp.set_defaults(func=cmd_lineage)
    sp = sub.add_parser("verify", help="re-read every shard and check it against the catalog")
    sp.add_argument("--shards", help="shards to check, e.g. 0000-0015,0042 (default all; _info.json and stray "
                    "shard files are checked only with all)")
    sp.add_argument("--jobs", type=_positive, metavar="N", help="processes checking shards (default IMNET_WORKERS)")
    sp.add_argument("--decode", action="store_true", help="also decode every WebP")
    sp.add_argument("-v", "--verbose", action="store_true")
    sp.set_defaults(func=cmd_verify)
    args = p.parse_args(argv)
    if args.command in ("build", "demo", "verify"):
        stop_on_signals()
    from .catalog import CatalogDamaged

    try:
        # the project's .env under the environment, for this process and what it starts (DAGSTER_HOME, AWS_*)
        apply_env_file()
        return args.func(args)
    except CatalogDamaged as e:  # one line: the file and the recovery
        print(f"imnet: {e}", file=sys.stderr)
        return 1
    except SettingsError as e:
        print(f"imnet: configuration error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"imnet: {e}", file=sys.stderr)
        return 1
    except StorageError as e:
        print(f"imnet: {e}", file=sys.stderr)
        return 1
    except OutRootBusy as e:
        print(f"imnet: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `imnet status | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("imnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
