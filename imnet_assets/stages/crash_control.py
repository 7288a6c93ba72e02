"""The machinery guard (image/guard.py) for crashes: an image that crashed its encode worker is
excluded only once the known-good control image of its kind passed the same path in a worker.

A worker that dies of a crash signal (workerpool.CRASH_SIGNALS: SIGSEGV, SIGBUS...) while encoding
one image, DEATHS_TO_EXCLUDE times (runtime/deaths.py), excludes that image. A codec library broken
for every input (a bad libwebp build that segfaults on every image) would so exclude every image,
and the build would succeed. So before such an exclusion is recorded, `settle_crash` sends two jobs to the
pool (a fresh worker replaced the crashed one):

- a KindJob reads the image's source and finds the control of its kind (controls.control_for, with the
  release's max_short). Should the image's header crash that worker too (its own bytes again, in
  the header's parser), it runs again, taking the kind from what the bytes say without a decoder.
  When a crash came in the repair decode (WorkerDied.repairing: the worker had marked that step,
  runtime/wire.py), the control is cut short, as a truncated image's is, so that it takes the repair
  path too: a complete control never reaches it, and a repair path broken for every input would
  otherwise exclude every damaged image that looks complete (a JPEG with a bad marker mid-data);
- a ControlJob runs the control (controls.control_image) through what the crashed worker ran on the
  image (encode_path_problem: the same codec and EncodeSettings through encode_or_refusal, then a
  decode of the stored image as the shard check does; the index and the eval set pass their own).

If the control's worker dies of a crash signal too, the fault is the machinery's:
guard.crash_fault (a MachineryFault naming the signals) fails the shard run, nothing committed,
nothing excluded, and the build after the fix builds every image. If the control is refused, or its
stored image does not check, likewise. If it passes, the exclusion is recorded and the kind is
remembered for the shard run (`passed`): the next crashing image of that kind costs one KindJob (a
source read and a header parse, in a worker that lives on), not another control. A kind that has
not passed in this shard run always gets its control, so a codec that crashes on everything is
caught at the first exclusion it would make.

A control job whose worker is killed from outside, runs out of memory or past its time limit while
running it is retried in a fresh process up to CONTROL_RETRIES times, one lost while it waited behind
another image's crashing job up to HELD_RETRIES times; then the run fails (ControlUnsettled): the
exclusion is never recorded unchecked.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from imnet_assets.image.controls import ControlKind, control_for, control_image
from imnet_assets.image.encode import EncodeSettings, encode_or_refusal
from imnet_assets.image.faults import arm
from imnet_assets.image.guard import MachineryFault, crash_fault
from imnet_assets.release.verify import stored_image_problem
from imnet_assets.runtime.procpool import preload
from imnet_assets.runtime.workerpool import WorkerDied, WorkerPool
from imnet_assets.settings import crash_hook_hits

preload(__name__)  # the forkserver imports this module once for all workers

CONTROL_RETRIES = 4  # deaths of a control job's worker while running it (not a crash) before the run fails
# Deaths of a worker that held a control job queued behind another job (the crashes of other images,
# of this run or of one beside it in the shared pool) before the run fails: each such death is
# another image's crash, of which there are few, so the bound only stops a loop.
HELD_RETRIES = 64


class ControlUnsettled(RuntimeError):
    """The control that decides whether an image's crashes are its own could not be run: its
    workers kept dying of something else (killed from outside, out of memory, past the time limit).
    Not an exclusion: the shard run fails, naming the image, and commits nothing."""


def crash_hook(sha256: str, hook: str | None) -> None:
    """Test hook (settings.test_crash_sha256, IMNET_TEST_CRASH_SHA256): the encode worker process
    segfaults (a real SIGSEGV, as a codec crash would) whenever it is about to encode the source of
    that sha256, or, with `*`, any image, the control images included (a codec broken for every
    input). Only ever in a pool worker, never in the coordinating process."""
    if crash_hook_hits(hook, sha256) and multiprocessing.parent_process() is not None:
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV


@dataclass
class KindJob:
    """The control kind of one crashing image, found in a worker (its header is parsed there)."""

    read: Callable[[], tuple[bytes, str]]  # the image's source bytes (shard_jobs._read_source, bound)
    max_short: int
    header: bool = True  # False: from what the bytes say without a decoder (controls.control_for)
    time_limit: float | None = None
    cut: bool | None = None  # True: cut short whatever the image's end (a crash in the repair decode)

    def prefetch(self, readers):
        return readers.submit(self.read)

    def run(self, read, mark) -> ControlKind:
        data, _ = read.result()
        mark(0)
        return control_for(data, self.max_short, self.header, self.cut)


@dataclass
class ControlJob:
    """The control of `kind` through the path a crashed worker ran on an image: `problem(control,
    kind)` says why the known-good control image fails that path (None: it passes); a module-level
    function or a partial of one, so that the job pickles (encode_path_problem: the shard runs'
    encoder; scan_pool.index_path_problem: the index's decoding; eval_pool.eval_path_problem: the eval
    set's pHash). `fault`: the index's test hook (image/faults.py), armed while it runs."""

    kind: ControlKind
    problem: Callable[[bytes, ControlKind], str | None]
    fault: str | None = None
    time_limit: float | None = None

    def prefetch(self, readers):
        return None

    def run(self, _state, mark) -> str | None:
        arm(self.fault)
        try:
            mark(0)
            return self.problem(control_image(self.kind), self.kind)
        finally:
            arm(None)


def encode_path_problem(control: bytes, _kind: ControlKind, settings: EncodeSettings, encode: Callable | None = None,
                        crash_sha256: str | None = None) -> str | None:
    """What a shard run's encode worker runs on an image (shard_jobs.prepare_sample: the codec with
    these settings, then a decode of the stored image as the shard check does), on the control: None
    when it passes, else why not. Raises MachineryFault when the codec fails it with an exception
    (encode_or_refusal settles that on the control's own control). `encode`: the run's codec (None:
    encode_image); `crash_sha256`: the test hook, as the shard run's jobs carry it."""
    crash_hook(hashlib.sha256(control).hexdigest(), crash_sha256)
    got = encode_or_refusal(control, settings, encode)
    if isinstance(got, str):
        return got
    return stored_image_problem(settings.extension, got.webp, (got.width, got.height), True) or None


def _outcome(pool: WorkerPool, job, priority: int, what: str):
    """(the job's result, None), or (None, its WorkerDied) when its worker died of a crash signal
    while running it. Other deaths are retried in fresh processes (CONTROL_RETRIES, HELD_RETRIES)."""
    deaths: list[str] = []
    held = 0
    while True:
        try:
            return pool.submit(job, priority).result(), None
        except WorkerDied as died:
            if died.culprit is None:  # another job's death: this one was queued in that worker
                held += 1
                if held <= HELD_RETRIES:
                    continue
            elif died.crashed:
                return None, died
            else:
                deaths.append(died.named)
            if len(deaths) >= CONTROL_RETRIES or held > HELD_RETRIES:
                raise ControlUnsettled(
                    f"{what}: the processes running it died {len(deaths)} times ({', '.join(deaths) or 'none'}), each "
                    f"a fresh one, and {held} times while it waited behind other images' jobs; nothing was committed. "
                    "A kill or a hang is not an exclusion: build again") from None


def settle_crash(pool: WorkerPool, read: Callable[[], tuple[bytes, str]], settings: EncodeSettings,
                 seen: str, crashes: Sequence[WorkerDied], passed: set[ControlKind], *, encode: Callable | None = None,
                 crash_sha256: str | None = None, time_limit: float | None = None, priority: int = 0,
                 log: Callable[[str], None] = lambda _m: None) -> None:
    """Returns when an image's crashes (``seen``: what happened, and on which image) are its own:
    the control of its kind passed the same path in a worker, now or earlier in this shard run
    (``passed``, updated). Raises MachineryFault when the control crashes or fails too."""
    settle_crash_of(pool, read, settings.max_short, seen, crashes, passed,
                    functools.partial(encode_path_problem, settings=settings, encode=encode, crash_sha256=crash_sha256),
                    "encoder", time_limit=time_limit, priority=priority, log=log)


def settle_crash_of(pool: WorkerPool, read: Callable[[], tuple[bytes, str]], max_short: int, seen: str,
                    crashes: Sequence[WorkerDied], passed: set[ControlKind],
                    problem: Callable[[bytes, ControlKind], str | None], path: str, *,
                    fault: str | None = None, time_limit: float | None = None, priority: int = 0,
                    log: Callable[[str], None] = lambda _m: None) -> None:
    """settle_crash for any path a worker runs on an image: `problem` runs that path on the control
    of a kind (a ControlJob's), and `path` names it in messages ("encoder"; "index":
    stages/scan_pool.py; "pHash": stages/eval_pool.py). `crashes`: the image's crashes; one in
    the repair decode (WorkerDied.repairing) gets a control cut short, which takes that path too.
    `fault`: the index's test hook."""
    what = f"deciding whether the crashes are the image's own ({seen})"
    cut = True if any(d.repairing for d in crashes) else None  # None: cut short when the image looks cut
    kind, died = _outcome(pool, KindJob(read, max_short, True, time_limit, cut), priority, what)
    if died is not None:  # its header crashed the parser: its own bytes again
        kind, died = _outcome(pool, KindJob(read, max_short, False, time_limit, cut), priority, what)
        if died is not None:  # no decoder ran there: Python itself is broken
            raise MachineryFault(f"machinery fault: {seen}, and reading its signature without a decoder crashed "
                                 f"too ({died.named}); nothing was committed")
    if kind in passed:
        return
    failed, died = _outcome(pool, ControlJob(kind, problem, fault, time_limit), priority, what)
    if died is not None:
        raise crash_fault(seen, kind, f"crashed the {path}'s process the same way ({died.named})")
    if failed is not None:
        raise crash_fault(seen, kind, f"failed the same path ({failed})")
    passed.add(kind)
    log(f"a known-good {kind.describe()} control image passed the {path}: the crashes are the image's own")
