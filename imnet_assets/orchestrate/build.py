"""`imnet build`: the shared catalog stages once, then for each release (IMNET_RELEASES; unset: the
one default release) its plan, its shard partitions (several Dagster runs at once, on threads of
this process) and its audit, each a Dagster run recorded in the instance; one build at a time per
out root (its lease)."""

from __future__ import annotations

import os
import sys
import threading
import time

from imnet_assets.defs.release_keys import RELEASE_TAG, SHARED_STAGES, asset_key, label
from imnet_assets.orchestrate.dagster_quirks import (
    capture_without_mirror,
    console_kept_through_output_capture,
    materialize_keeping_interrupts,
    one_engine_per_sqlite_storage,
    skip_per_run_logging_config,
)
from imnet_assets.orchestrate.first_look import FirstLook
from imnet_assets.orchestrate.instance import dagster_instance
from imnet_assets.orchestrate.interrupts import end_now_leaving_runs, work_done
from imnet_assets.orchestrate.run_result import facts, failures_of, metadata
from imnet_assets.orchestrate.shard_runs import ShardRuns, runs_at_once
from imnet_assets.settings import Settings
from imnet_assets.storage.fs import redact

BUILD_LEASE = "build"  # <out root>/_locks/build/: the lease of the build writing the out root


class OutRootBusy(RuntimeError):
    """Another `imnet build` holds the out root (its lease names it)."""


class Build:
    """Materializes stages through Dagster, in this process, recording into the instance."""

    def __init__(self, settings: Settings, out=sys.stdout, verbose: bool = False, keep_going: bool = False,
                 parallel: int | None = None, releases: list[Settings] | None = None,
                 selected: list[Settings] | None = None, first_look=None):
        """`settings`: the base, which the shared stages read (raw root, catalog, workers);
        `releases`: every release (default: `settings` alone), all in the definitions;
        `selected`: the releases this build builds (default: all)."""
        from imnet_assets.definitions import build_definitions

        self.settings = settings
        self.releases = [settings] if releases is None else releases
        self.selected = self.releases if selected is None else selected
        self.defs = build_definitions(settings, self.releases)
        self.marker_roots = [r.out_root for r in self.releases]  # where shard runs mark changed sources
        self.assets = list(self.defs.assets)
        # The persistent instance the UI reads (DAGSTER_HOME, by default data/dagster_home under the
        # project root): what the build does shows there, and its history carries over.
        self.instance = dagster_instance(prepare_out=out)
        one_engine_per_sqlite_storage(self.instance)  # each statement compiled once, not once a run
        self.out = out
        # Dagster's console logger prints each failed step's whole stack trace; this command names
        # the failure itself (`fail`), so by default only -v shows them (the instance keeps them all)
        self.log_level = "WARNING" if verbose else "CRITICAL"
        if not verbose:  # nor would a step's output be copied to the terminal: no tail processes per run
            capture_without_mirror(self.instance)
        self.keep_going = keep_going
        self.parallel = parallel if parallel is not None else settings.parallel_shards
        self.first_look = first_look  # first_look.FirstLook, started before this (imnet build)
        self._looked: list[str] | None = None  # what it found stale, while no stage was built since
        self._say_lock = threading.Lock()
        self.leases: dict[str, object] = {}  # out root -> its build lease, once this build is about to write
        self.runs_left_behind = 0  # shard runs still going in other threads when an interrupt came
        self.failed_releases: list[str] = []

    def say(self, msg: str) -> None:
        with self._say_lock:  # shard runs finish in several threads: whole lines only
            print(msg, file=self.out, flush=True)

    def materialize(self, selection: list[str], partition_key: str | None = None, release: Settings | None = None):
        """Materialize the stages named in `selection` (of `release`: its keys; default: the
        default release's plain keys) as one Dagster run: (its result, its failures: run_result.failures_of,
        which raises KeyboardInterrupt for a run that was stopped)."""
        from imnet_assets.defs.schedules import build_run_tags

        release = self.selected[0] if release is None and len(self.releases) == 1 else release
        keys = [asset_key(release, s) if release is not None else s for s in selection]
        tags = {RELEASE_TAG: release.release} if release is not None and release.release else {}
        result = materialize_keeping_interrupts(  # a stop signal during the run: KeyboardInterrupt
            self.assets, selection=keys, partition_key=partition_key, instance=self.instance,
            raise_on_error=False, tags={**build_run_tags(), **tags},
            run_config={"loggers": {"console": {"config": {"log_level": self.log_level}}}},
        )
        return result, failures_of(result)

    def hold_out_root(self, release: Settings | None = None) -> bool:
        """Take the build lease (release.lease) of this release's out root (None: of every selected
        release's) before this build writes anything: one build at a time per out root (SPEC:
        Failure behaviour). A build with nothing to do takes none (it writes nothing). True when
        one was taken by this call: the caller then looks again at what it was about to do, which a
        build that just ended may have done. Raises OutRootBusy naming the holder when another
        build holds it; a holder whose process is gone (kill -9), or of another host that stopped
        renewing it, is taken over."""
        took = False
        for r in (self.selected if release is None else [release]):
            took = self._hold(r.out_root) or took
        return took

    def _hold(self, out_root: str) -> bool:
        from imnet_assets.release.lease import LeaseHeld, LeaseLost, acquire

        lease = self.leases.get(out_root)
        if lease is not None:
            try:
                lease.check()
            except LeaseLost as e:
                raise OutRootBusy(f"this build lost the out root {out_root}: {e}") from None
            return False
        try:
            self.leases[out_root] = acquire(out_root, BUILD_LEASE, "imnet build")
        except LeaseHeld as e:
            raise self._busy(out_root, str(e)) from None
        return True

    def _busy(self, out_root: str, held: str) -> OutRootBusy:
        return OutRootBusy(f"the out root {out_root} is in use by another build: {held}; wait for it "
                           "to end, or stop it (the lease of a process that is gone is taken over)")

    def refuse_if_held(self) -> None:
        """Refuse at once when another build holds a selected release's out root, before reading
        the catalog (a reader waits for the catalog's writer: at full size the index stage holds it
        for an hour)."""
        from imnet_assets.release.lease import describe, holder_of

        for r in self.selected:
            held = holder_of(r.out_root, BUILD_LEASE)
            if held is not None:
                raise self._busy(r.out_root, f"{describe(held[0])} holds it (lease {held[1]})")

    def release(self) -> None:
        for out_root in list(self.leases):
            self.leases.pop(out_root).release()

    def run(self, wanted: list[str] | dict[str, list[str]]) -> int:
        """Builds the shared stages, then per selected release its plan, its shard partitions
        `wanted` (a list: the same keys for each; a dict: by release name) and its audit when all
        are wanted."""
        try:
            return work_done(self._run(wanted))  # a stop signal now has nothing to stop (the cleanup, the exit)
        finally:
            # Shard runs left going in other threads (Ctrl-C) end with this process: its lease
            # then names a process that is gone, and the next build takes it over.
            if not self.runs_left_behind:
                self.release()
            from imnet_assets.stages import shard_ahead

            shard_ahead.drop()  # jobs submitted ahead that no run took over

    def _shards_to_build(self, r: Settings, wanted: list[str]) -> tuple[list[str], list[str]]:
        """(partitions to build, partitions with a run in flight elsewhere) of those wanted."""
        from imnet_assets.defs.schedules import shard_partition_status

        status = shard_partition_status(r, self.instance, read_streaks=False)  # only fresh and in flight matter here
        todo = [k for k in wanted if status[k] != "fresh"]
        busy = [k for k in todo if status[k] == "in_flight"]
        return [k for k in todo if k not in busy], busy

    def _run(self, wanted: list[str] | dict[str, list[str]]) -> int:
        from imnet_assets.defs.schedules import fail_dead_runs
        from imnet_assets.storage.catalog import CatalogVolumeMissing, check_catalog_volume

        s = self.settings
        named = [r.release for r in self.selected if r.release]
        if named:
            self.say(f"imnet build: raw {s.raw_root}, catalog {s.catalog}, {s.workers} workers, instance "
                     f"{os.environ['DAGSTER_HOME']}; releases: "
                     + "; ".join(f"{r.release} -> {r.out_root} ({r.num_shards} shards)" for r in self.selected))
        else:
            self.say(f"imnet build: raw {s.raw_root} -> out {s.out_root}, catalog {s.catalog}, "
                     f"{s.num_shards} shards, {s.workers} workers, instance "
                     f"{os.environ['DAGSTER_HOME']}")  # always set: dagster_instance settles it
        self.refuse_if_held()
        try:  # before the lease: a container without the catalog's volume writes nothing at all
            check_catalog_volume(s.catalog)
        except CatalogVolumeMissing as e:
            return self.fail("catalog", [str(e)])
        # the first look's (one listing of the raw root) while no stage was built since (_stale)
        self._looked = self.first_look.stale_stages(self.say) if self.first_look is not None else None
        for stage in SHARED_STAGES:  # once, whatever the number of releases
            if stage not in self._stale(s, log=self.say) or (
                    self.hold_out_root() and stage not in self._stale(s, again=True)):
                self.say(f"  {stage:16s} fresh, skipped")
                continue
            self._looked = None
            t0 = time.perf_counter()
            result, failures = self.materialize([stage])
            if failures:
                return self.fail(stage, failures)
            self.say(f"  {stage:16s} materialized in {time.perf_counter() - t0:.1f}s  {facts(result, stage)}")
        if self.instance is not None:
            fail_dead_runs(self.instance, log=lambda m: self.say(f"  wds_shards: {m}"))
        failed_releases = self.failed_releases
        for r in self.selected:
            keys = wanted.get(r.release, r.partition_keys) if isinstance(wanted, dict) else wanted
            code = self._run_release(r, keys)
            if code:
                failed_releases.append(r.release)
                if not self.keep_going:
                    break
        if failed_releases and named:
            self.say(f"imnet build: releases FAILED: {', '.join(failed_releases)}")
        return 1 if failed_releases else 0

    def _stale(self, r: Settings, log=lambda _m: None, again: bool = False) -> list[str]:
        """The shared stages and release `r`'s plan that are stale (stages.fingerprints.stale_stages): the
        first look's for the base settings while no stage was built since, unless looking `again`
        (the lease just taken)."""
        from imnet_assets.stages.fingerprints import stale_stages

        if again:
            self._looked = None
        if self._looked is not None and r == self.settings:
            return self._looked
        return stale_stages(r, log=log, marker_roots=self.marker_roots)

    def _run_release(self, r: Settings, wanted: list[str]) -> int:
        """One release after the shared stages: its plan, its shards `wanted`, then its audit."""
        name = label(r)

        def shown(stage: str) -> str:
            return f"{asset_key(r, stage).to_user_string():16s}"

        plan = asset_key(r, "shuffled_plan").to_user_string()
        if "shuffled_plan" not in self._stale(r) or (
                self.hold_out_root(r) and "shuffled_plan" not in self._stale(r, again=True)):
            self.say(f"  {shown('shuffled_plan')} fresh, skipped")
        else:
            t0 = time.perf_counter()
            self._looked = None
            result, failures = self.materialize(["shuffled_plan"], release=r)
            if failures:
                return self.fail(plan, failures)
            self.say(f"  {shown('shuffled_plan')} materialized in {time.perf_counter() - t0:.1f}s  "
                     f"{facts(result, plan)}")
        todo, busy = self._shards_to_build(r, wanted)
        if todo and self.hold_out_root(r):
            todo, busy = self._shards_to_build(r, wanted)
        if busy:
            self.say(f"  {name}wds_shards: {len(busy)} shards have a run in flight elsewhere, left to it: {busy[:8]}")
        self.say(f"  {name}wds_shards: {len(wanted) - len(todo) - len(busy)} of {len(wanted)} selected shards fresh, "
                 f"{len(todo)} to build")
        look = self.first_look
        if look is not None and look.ahead_key in todo and r == look.release:
            self.say(f"  {name}wds_shards: shard {look.ahead_key}'s first {look.ahead_images} images went to the "
                     f"encoders {look.ahead_at:.2f}s after the command started, ahead of its run")
        failed = self.build_shards(todo, r)
        if not wanted:
            self.say(f"  {name}shards and audit: skipped (--shards none: the catalog stages and the plan only)")
            return 0
        if failed:
            return self.fail(f"{asset_key(r, 'wds_shards').to_user_string()}[{', '.join(failed)}]", [
                f"{len(failed)} of {len(todo)} shards failed: {', '.join(failed)}",
                "shard_audit: skipped (it vouches for every shard; run `imnet build` again once they build)"])
        if set(wanted) != set(r.partition_keys):
            self.say(f"  {name}shard_audit: skipped (only some shards were selected; run `imnet build` for all)")
            return 0
        if self._audit_fresh(todo, r) or (self.hold_out_root(r) and self._audit_fresh(todo, r)):
            self.say(f"  {shown('shard_audit')} fresh, skipped")
        else:
            result, failures = self.materialize(["shard_audit"], release=r)
            audit = asset_key(r, "shard_audit").to_user_string()
            if failures:
                return self.fail(audit, failures)
            if r is self.selected[-1]:  # the build's last run ended and is recorded: nothing left to stop
                work_done(1 if self.failed_releases else 0)
            md = metadata(result, audit)
            self.say(f"  {shown('shard_audit')} ok: {md.get('samples')} samples in {md.get('shards')} shards, "
                     f"{md.get('excluded')} excluded, {md.get('repaired')} repaired")
        self.say(f"{name}shards: {r.out_root}  (_info.json beside them); catalog: {r.catalog}")
        return 0

    def _audit_fresh(self, built: list[str], r: Settings) -> bool:
        from imnet_assets.stages.audit import audit_fingerprint

        if built:  # shards were just built: their audit is to be done (no look at the out root)
            return False
        fp = audit_fingerprint(r)
        return fp is not None and self._stage_fp("shard_audit", r) == fp

    def build_shards(self, todo: list[str], release: Settings | None = None) -> list[str]:
        """Materialize each shard partition in `todo`, a Dagster run each, several at once (threads
        of this process: each run is recorded in the instance like any other). Returns the failed
        keys, in `todo` order. On a failure, no further shard starts unless --keep-going; the runs
        already going finish."""
        if not todo:
            return []
        r = release or self.selected[0]
        runs = runs_at_once(self.parallel, self.settings.workers, self.instance, len(todo))
        if runs > 1 and not skip_per_run_logging_config(self.instance):
            self.say("  wds_shards: one shard run at a time (the instance's python_logs.dagster_handler_config "
                     "makes Dagster reconfigure logging per run, which concurrent runs in one process cannot share)")
            runs = 1
        if runs > 1:
            self.say(f"  {label(r)}wds_shards: {runs} shard runs at once, sharing {self.settings.workers} encode "
                     f"worker{'s' if self.settings.workers != 1 else ''}")
        # The encode workers (and their forkserver's imports) start now, while the first runs are
        # being set up in Dagster, instead of when the first run asks for them (IMNET_WORKERS=1 too:
        # one pool worker, shard_jobs.prepared_samples).
        from imnet_assets.runtime.workerpool import shared_pool

        shared_pool(self.settings.workers)
        with console_kept_through_output_capture(self):
            return self._build_shards(todo, runs, r)

    def _build_shards(self, todo: list[str], runs: int, r: Settings) -> list[str]:
        started, images, done = time.perf_counter(), 0, 0
        failed: list[str] = []
        name = label(r)
        shard_runs = ShardRuns(lambda key: self.materialize(["wds_shards"], key, r), runs)
        # Held by a name: a Ctrl-C in the loop's body (a progress line being printed) reaches the
        # except below before the generator is closed (leaving the loop would close it at once, and
        # its close waited for the runs in flight, which then committed after the stop).
        results = shard_runs.finished(todo, stop=lambda: bool(failed) and not self.keep_going)
        try:
            for key, result, failures in results:
                done += 1
                if failures:
                    failed.append(key)
                    self.say(f"  [{done}/{len(todo)}] {name}shard {key}: FAILED")
                    for f in failures:
                        self.say("    " + redact(f))
                    if not self.keep_going:
                        self.say("  wds_shards: stopping at the first failure (--keep-going builds the others)")
                    continue
                md = metadata(result, asset_key(r, "wds_shards").to_user_string())
                images += int(md.get("samples", 0))
                elapsed = time.perf_counter() - started
                eta = elapsed / done * (len(todo) - done)
                self.say(f"  [{done}/{len(todo)}] {name}shard {key}: {md.get('samples')} samples "
                         f"({md.get('excluded')} excluded, {md.get('repaired')} repaired), "
                         f"{md.get('images_per_s')} img/s; overall {images / elapsed:.1f} img/s, eta {eta:.0f}s")
        except KeyboardInterrupt:  # here, not in the runs' generator (a progress line being printed)
            shard_runs.interrupted()
            raise
        except BaseException:  # an error here (a progress line that cannot be written): the runs in
            results.close()  # flight end as they would before the lease is released (ShardRuns.finished)
            raise
        finally:
            self.runs_left_behind = shard_runs.left_behind  # Ctrl-C: the runs still going in other threads
        order = {k: i for i, k in enumerate(todo)}
        return sorted(failed, key=order.__getitem__)

    def _stage_fp(self, stage: str, r: Settings) -> str | None:
        from imnet_assets.storage.catalog import open_reader

        if not os.path.exists(self.settings.catalog):
            return None
        with open_reader(self.settings.catalog, say=lambda m: self.say(f"  {m}")) as cat:
            return cat.stage_fingerprint(stage, r.release)

    def fail(self, stage: str, failures: list[str]) -> int:
        self.say(f"imnet build: {stage} FAILED")
        for f in failures:
            self.say("  " + redact(f))
        if self.log_level == "CRITICAL":
            self.say("  (the full error with its stack trace: run again with -v, or see the run in the Dagster UI:"
                     " `dg dev`)")
        return 1


LOOK_HEAD_START_SECONDS = 0.5  # the first look alone before Dagster is imported, at most (build)
SHARD_JOBS_MODULE = "imnet_assets.stages.shard_jobs"  # what the encode workers run (preload(__name__) there)
LOOK_JOIN_SECONDS = 120  # at most: past it the look is stuck on storage, which has its own time limits


def build(settings: Settings, wanted: list[str] | dict[str, list[str]], verbose: bool = False,
          keep_going: bool = False, parallel: int | None = None, releases: list[Settings] | None = None,
          selected: list[Settings] | None = None) -> int:
    """`imnet build` for the shard partitions `wanted`: its exit code. Ctrl-C / SIGTERM raise
    KeyboardInterrupt, unless shard runs are left going in other threads: then the process ends
    at once (end_now_leaving_runs says why it must)."""
    import gc

    from imnet_assets.runtime.procpool import preload, start_forkserver

    # The forkserver preloads the encode workers' module, named here rather than imported (it
    # names itself when imported): the import (Pillow, fsspec: ~0.1 s) then happens in the look's
    # thread while the forkserver starts on another core, not before it, so the first workers fork
    # that much sooner. The index's module (numpy, the perceptual hash: 0.1 s more in the forkserver
    # before the first worker forks) is left to the scan workers, which import it once each when an
    # index is built; most builds build none.
    preload(SHARD_JOBS_MODULE)
    start_forkserver()  # its imports overlap Dagster's; encode workers then fork at once
    # the stages' freshness and the first shard's first jobs, while Dagster is imported and set up
    everyone = releases or [settings]
    only = (selected or everyone)[0] if len(selected or everyone) == 1 else None  # a build of one release
    keys = (wanted.get(only.release, only.partition_keys) if isinstance(wanted, dict) else wanted) if only else []
    look = FirstLook(settings, BUILD_LEASE, [r.out_root for r in everyone], only, keys)
    # A head start for the look: on local storage it is done within it, its jobs at the encoders
    # before Dagster's import begins (the two in one interpreter take turns at the GIL: its jobs went
    # 0.15 s later); a slower look (a listing of 19,167 tars on S3) goes on beside the import.
    look.join(timeout=LOOK_HEAD_START_SECONDS)
    # Dagster's import and the instance allocate ~300k objects that live as long as the process;
    # the cyclic collector would scan them all three times meanwhile (0.2-0.4 s of CPU) and again
    # in every later full collection (0.1-0.2 s each) for the ~4k objects of garbage they leave.
    # So no collection while they are made, then they are frozen (never scanned again).
    gc.disable()
    try:
        runner = Build(settings, verbose=verbose, keep_going=keep_going, parallel=parallel, releases=releases,
                       selected=selected, first_look=look)
    finally:
        gc.freeze()
        gc.enable()
    try:
        return runner.run(wanted)
    except KeyboardInterrupt:
        left = runner.runs_left_behind
        if not left:
            raise
        end_now_leaving_runs(left)
    finally:
        # The look may still be at work when the build ends early (another build holds the out root:
        # refused at once). A daemon thread inside DuckDB when the interpreter finalizes is ended by
        # a forced unwind that DuckDB's C++ catches: "FATAL: exception not rethrown", SIGABRT. It
        # does what the build's own look would do (one listing, the catalog read once): wait for it.
        look.join(timeout=LOOK_JOIN_SECONDS)
