"""The long-lived worker pool that shard runs (and the scan) share: jobs in, replies out, a dead
worker replaced and its jobs failed naming the item it was working on, a time limit per item."""

from __future__ import annotations

import atexit
import heapq
import itertools
import os
import selectors
import signal
import socket
import threading
import time

from imnet_assets.runtime.procpool import forkserver_context
from imnet_assets.runtime.wire import (
    EXIT_OUT_OF_MEMORY,
    INDEX_BITS,
    REPAIR_DECODE,
    RETIRE,
    SLOT_WORDS,
    Link,
    environment,
    worker_main,
)

# The deaths a process's own work causes (a codec crashing on the bytes it was given): the only ones
# that say something about the item it was working on. SIGKILL (the OOM killer, a cgroup limit,
# preemption, this pool's time limit), SIGTERM and exits come from outside.
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT})


class WorkerDied(Exception):
    """The worker process running a job died: killed from outside (SIGKILL by the OOM killer, a
    cgroup limit, preemption; SIGTERM), killed by the pool past the job's time limit (`timed_out`,
    the limit in seconds), crashed (a codec segfault: `crashed`), or exited on MemoryError
    (`out_of_memory`). `culprit`: the index (within the job) of the item the worker was working on
    when it died, for the job it was running (see `mark`); None for the other jobs it held.
    `repairing`: it died in the repair decode of that item (wire.step's REPAIR_DECODE)."""

    def __init__(self, exitcode: int | None, culprit: int | None, timed_out: float | None = None,
                 repairing: bool = False):
        self.exitcode = exitcode
        self.culprit = culprit
        self.timed_out = timed_out
        self.repairing = repairing
        super().__init__(f"worker process died ({self.how}) working on item {culprit}")

    @property
    def out_of_memory(self) -> bool:
        return self.exitcode == EXIT_OUT_OF_MEMORY

    @property
    def crashed(self) -> bool:
        """Whether the process died of a crash signal its own work raised (CRASH_SIGNALS), not of a
        kill from outside or the pool's time limit."""
        return (self.timed_out is None and self.exitcode is not None and self.exitcode < 0
                and -self.exitcode in CRASH_SIGNALS)

    @property
    def named(self) -> str:
        """`how`, with the signal's name when it died of one: "signal 11 (SIGSEGV)"."""
        if self.timed_out is None and self.exitcode is not None and self.exitcode < 0:
            try:
                return f"{self.how} ({signal.Signals(-self.exitcode).name})"
            except ValueError:
                pass
        return self.how

    @property
    def how(self) -> str:
        if self.timed_out is not None:
            return f"killed past its time limit of {self.timed_out:g} s"
        if self.exitcode is None:
            return "unknown exit"
        if self.exitcode < 0:
            return f"signal {-self.exitcode}"
        if self.exitcode == EXIT_OUT_OF_MEMORY:
            return "out of memory"
        return f"exit status {self.exitcode}"


class ReplyUnreadable(Exception):
    """A job's reply came back but could not be unpickled here (the job fails; the pool goes on)."""


class _Worker:
    def __init__(self, proc, link: Link, slot):
        self.proc, self.link, self.slot = proc, link, slot
        self.tasks: dict[int, tuple[object, object, float]] = {}  # task id -> (job, future, time limit or 0)
        self.retiring = False
        self.retired = False  # told to exit once its jobs are done
        self.buried = False
        self.events = 0  # what the dispatcher's selector watches its socket for
        self.killed_for: tuple[int, int, float] | None = None  # (task, item, limit): killed past a time limit

    def working_on(self) -> tuple[int, int, float | None] | None:
        """(task id, item index, since (time.monotonic()); None: untimed) of the item it works on, or None."""
        packed = self.slot[0]
        if packed < 0:
            return None
        since = self.slot[1]  # written before slot[0]: never older than the item read there
        return packed >> INDEX_BITS, packed & ((1 << INDEX_BITS) - 1), since / 1e9 if since >= 0 else None


class WorkerPool:
    """Long-lived worker processes (forkserver, exit with this process) that run jobs, shared by
    every thread of this process (`shared_pool`).

    A job is a picklable object with `prefetch(readers) -> state` (called in the worker as soon as
    the job arrives, to start its reads in the worker's reader threads: it must not block) and
    `run(state, mark) -> result` (called in the worker's main thread, one job after another;
    `mark(i)` says the job now works on item i, `mark(-1)` that it is between items, so a death is
    blamed on that item; `mark(i, timed=False)`: an item the time limit does not apply to). Each worker holds up to `depth` jobs, so its reads run ahead of its
    encoding: with `threads` reader threads each, a pool keeps up to 32 x workers source reads in
    flight: a worker's `depth` jobs of shard_jobs.BATCH rows are 32 sources read ahead, one ranged GET
    each (storage/s3read.py), about 1,400 reads/s per worker at 20 ms per S3 request.

    A job fails alone: an exception in the worker, a reply that cannot be unpickled here
    (ReplyUnreadable) or a job that cannot be pickled fail its future only; other jobs, and the
    other shard runs sharing the pool, go on. A worker that dies is replaced; each of its jobs
    fails with `WorkerDied` (naming the item it was working on, for the job that was running) and
    the caller decides what to retry. A job with a `time_limit` attribute (seconds) gets its worker
    SIGKILLed when one item (from its `mark(i)`) runs longer: `WorkerDied.timed_out`. Replies to
    jobs no longer held (failed by the dispatcher) are dropped. A job with a `hold` attribute goes
    only to a worker holding fewer than `hold` jobs (1: an idle one), and waits here till there is
    one (the jobs of its priority queued behind it go meanwhile, where they fit; another priority's
    wait, oldest first): a job that reads nothing ahead
    (the scan's) then never waits in a busy worker behind a long job while another worker idles,
    and no more than one dies with a worker.

    Every job travels with the submitting process's storage and IMNET_* variables as they were at
    `submit` (wire.environment), adopted by the worker before the job's reads: a worker's own
    environment is the forkserver's, fixed when the process's first pool started.

    One dispatcher thread owns the sockets, never blocking on one worker (non-blocking sends and
    receives, no waits on a process); `submit` is thread-safe.
    """

    def __init__(self, workers: int, threads: int = 32, depth: int = 4):
        self.pid = os.getpid()
        self.threads, self.depth = threads, depth
        self._ctx = forkserver_context()
        self._lock = threading.Lock()
        # (priority, task id, job, future), a heap: the lowest priority number first, then in order
        self._queue: list = []
        self._workers: list[_Worker] = []
        self._target = max(1, workers)
        self._next_id = 0
        self.started = 0  # worker processes started so far (replacements included)
        # At interpreter exit, multiprocessing's exit handler terminates the (daemonic) workers; the
        # dispatcher, still running, would replace them, and a replacement whose start the exit
        # cuts short leaves its forked child an EOFError traceback (reading a process object never
        # sent). So no worker starts once the exit has begun: this handler, registered after
        # multiprocessing's, runs before it, and waits for a start under way.
        self._closing = False
        self._start_lock = threading.Lock()
        atexit.register(self._stop_starting)
        self._check_every = 1.0  # seconds between looks at the time limits (shorter for short limits)
        self._next_check = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()  # the dispatcher's: sockets, sentinels, wake-up
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._thread = threading.Thread(target=self._loop, name="worker-pool", daemon=True)
        self._thread.start()

    @property
    def size(self) -> int:
        return self._target

    def pids(self) -> list[int]:
        """The live workers' process ids (tests kill one)."""
        with self._lock:
            return [w.proc.pid for w in self._workers if w.proc.pid and not w.retiring]

    def working_on(self) -> list[tuple[int, object, int]]:
        """(process id, job, item index) for each worker now working on an item (tests kill them)."""
        busy = []
        for w in list(self._workers):
            at = w.working_on()
            entry = w.tasks.get(at[0]) if at else None
            if entry is not None and w.proc.pid:
                busy.append((w.proc.pid, entry[0], at[1]))
        return busy

    def resize(self, workers: int) -> None:
        with self._lock:
            self._target = max(1, workers)
        self._wake()

    def submit(self, job, priority: int = 0):
        """Queue `job`; a free worker takes the queued job of the lowest `priority`, in submission
        order among equals (shard runs pass their `next_priority()`: see there). The job carries
        this process's storage and IMNET_* variables as they are now (wire.environment): the worker
        adopts them before its reads start."""
        from concurrent.futures import Future

        future: Future = Future()
        env = environment()
        with self._lock:
            self._next_id += 1
            heapq.heappush(self._queue, (priority, self._next_id, job, future, env))
        self._wake()
        return future

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except BlockingIOError:  # already awake
            pass

    # -- the dispatcher thread

    def _start_worker(self) -> _Worker:
        ours, theirs = socket.socketpair()
        slot = self._ctx.RawArray("q", SLOT_WORDS)
        slot[0], slot[1], slot[2] = -1, 0, 0
        proc = self._ctx.Process(target=worker_main, args=(theirs, slot, self.threads), daemon=True,
                                 name="imnet-encode")
        proc.start()
        theirs.close()
        self.started += 1
        w = _Worker(proc, Link(ours), slot)
        self._watch(w, selectors.EVENT_READ)
        self._selector.register(proc.sentinel, selectors.EVENT_READ, ("dead", w))
        return w

    def _watch(self, w: _Worker, events: int) -> None:
        """Have the selector watch `w`'s socket for `events` (0: not at all)."""
        if events == w.events:
            return
        if not w.events:
            self._selector.register(w.link.sock, events, ("conn", w))
        elif not events:
            self._selector.unregister(w.link.sock)
        else:
            self._selector.modify(w.link.sock, events, ("conn", w))
        w.events = events

    def _loop(self) -> None:
        while True:
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - never leave callers waiting forever
                self._fail_everything(e)
                time.sleep(0.1)  # not a busy loop should it keep failing

    def _fail_everything(self, error: BaseException) -> None:
        """The last resort of a fault in the dispatcher itself: every caller gets `error`; the
        workers' late replies to these jobs are dropped."""
        with self._lock:
            queued, self._queue = [q[1:4] for q in self._queue], []
        for w in self._workers:
            for _job, fut, _limit in w.tasks.values():
                if not fut.done():
                    fut.set_exception(error)
            w.tasks.clear()
        for _tid, _job, fut in queued:
            if not fut.done():
                fut.set_exception(error)

    def _step(self) -> None:
        self._balance()
        self._dispatch()
        dead = []
        for key, mask in self._selector.select(self._select_timeout()):
            kind, w = key.data
            if kind == "wake":
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            elif kind == "dead":
                dead.append(w)
            elif not w.buried:
                if mask & selectors.EVENT_WRITE:
                    self._flush(w)
                if mask & selectors.EVENT_READ:
                    self._receive(w)
        for w in dead:
            if not w.buried:
                self._bury(w)
        if dead:
            self._balance()  # replaced at once, not at the next job
        self._enforce_time_limits()

    def _select_timeout(self) -> float | None:
        if not any(w.tasks for w in self._workers):
            return None
        return max(0.0, self._next_check - time.monotonic())

    def _send(self, w: _Worker, task_id: int, data) -> None:
        w.link.queue(task_id, data)
        self._flush(w)

    def _flush(self, w: _Worker) -> None:
        try:
            sent = w.link.flush()
        except OSError:  # gone: its sentinel fails its jobs
            w.link.outbox.clear()
            sent = True
        if not w.link.eof:
            self._watch(w, selectors.EVENT_READ | (0 if sent else selectors.EVENT_WRITE))

    def _receive(self, w: _Worker) -> None:
        for task_id, data in w.link.receive():
            self._settle(w, task_id, data)
            del data  # freed before the next message's buffer is allocated
        if w.link.eof:  # it exited (or is exiting): its sentinel says the rest
            self._watch(w, 0)

    def _settle(self, w: _Worker, task_id: int, data) -> None:
        import pickle

        entry = w.tasks.pop(task_id, None)
        if w.retiring and not w.tasks and not w.retired and not w.buried:
            self._retire(w)
        if entry is None:
            return  # a reply to a job failed meanwhile: dropped
        job, fut, _limit = entry
        try:
            ok, value = pickle.loads(data)
        except Exception as e:  # noqa: BLE001 - this job fails, nothing else
            ok, value = False, ReplyUnreadable(
                f"the reply to a {type(job).__name__} cannot be unpickled: {type(e).__name__}: {e}")
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value if isinstance(value, BaseException) else RuntimeError(repr(value)))

    def _retire(self, w: _Worker) -> None:
        w.retired = True
        self._send(w, RETIRE, b"")

    def _bury(self, w: _Worker) -> None:
        w.buried = True
        if not w.link.eof:  # results it sent before dying are good
            for task_id, data in w.link.receive():
                self._settle(w, task_id, data)
                del data
        self._watch(w, 0)
        self._selector.unregister(w.proc.sentinel)
        w.proc.join(0)  # its sentinel was ready: the exit status is known, nothing to wait for
        if w.killed_for is not None:
            task, index, limit = w.killed_for
        else:
            at = w.working_on()
            task, index, limit = (at[0], at[1], None) if at else (None, None, None)
        repairing = task is not None and w.slot[2] == REPAIR_DECODE
        for task_id, (_job, fut, _limit) in w.tasks.items():
            mine = task_id == task
            if not fut.done():
                fut.set_exception(WorkerDied(w.proc.exitcode, index if mine else None, limit if mine else None,
                                             repairing and mine))
        w.tasks.clear()
        w.link.sock.close()
        self._workers.remove(w)

    def _enforce_time_limits(self) -> None:
        """SIGKILL each worker whose current item has run past its job's `time_limit`."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self._check_every
        for w in self._workers:
            if w.killed_for is not None or not w.tasks:
                continue
            at = w.working_on()
            if at is None:
                continue
            task, index, since = at
            entry = w.tasks.get(task)
            limit = entry[2] if entry is not None else 0.0
            # the second look: still the same item (task ids are never reused)
            if limit and since is not None and now - since > limit and w.slot[0] == task << INDEX_BITS | index:
                w.killed_for = (task, index, limit)
                try:
                    os.kill(w.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _balance(self) -> None:
        with self._lock:
            target = self._target
        active = [w for w in self._workers if not w.retiring]
        for w in active[target:]:  # shrink: retire the extra ones once idle
            w.retiring = True
            if not w.tasks:
                self._retire(w)
        for _ in range(target - len(active)):
            with self._start_lock:
                if self._closing:
                    return
                self._workers.append(self._start_worker())

    def _stop_starting(self) -> None:
        with self._start_lock:
            self._closing = True

    def _holds(self, job) -> int:
        """How many jobs a worker may hold for `job` to go to it (its `hold`, at most the depth)."""
        return min(self.depth, getattr(job, "hold", None) or self.depth)

    def _next_job(self) -> tuple[tuple, list] | None:
        """The queued entry to send now, taken off the queue, and the workers it may go to; None
        when no queued job fits a worker. The queue's head goes first; when it holds back (its
        `hold` finds no worker with few enough jobs), the first job of the head's own priority (its
        run's, its stage's) that fits goes instead, so a held job never stalls the jobs of its own
        run behind it. A job of another priority (a younger run's) waits: sent past the held head
        it would refill the free slot of every worker as each comes back, and the older run's held
        tail would wait till the younger run's whole shard was done (oldest first, see
        `next_priority`); a cancelled job (a failed run's) holds nothing back. One look costs a
        pass over the queue, never one over every worker per queued job (512 held singles and 64
        workers at the real size). Called with the lock held."""
        if not self._queue:
            return None
        live = [w for w in self._workers if not w.retiring and len(w.tasks) < self.depth]
        if not live:
            return None
        lowest = min(len(w.tasks) for w in live)
        head = self._queue[0]
        if self._holds(head[2]) > lowest or head[3].cancelled():  # a cancelled one: dropped by _dispatch
            entry = heapq.heappop(self._queue)
        else:  # rare: a held head and no idle-enough worker
            for entry in sorted(self._queue):
                if entry[0] != head[0]:
                    return None
                if self._holds(entry[2]) > lowest:
                    self._queue.remove(entry)
                    heapq.heapify(self._queue)
                    break
            else:
                return None
        holds = self._holds(entry[2])
        return entry, [w for w in live if len(w.tasks) < holds]

    def _dispatch(self) -> None:
        import pickle

        while True:
            with self._lock:
                picked = self._next_job()
                if picked is None:
                    return
                (_priority, task_id, job, fut, env), free = picked
            if not fut.set_running_or_notify_cancel():
                continue
            w = min(free, key=lambda x: len(x.tasks))
            try:
                data = pickle.dumps((env, job), protocol=5)
                limit = float(getattr(job, "time_limit", None) or 0)
            except Exception as e:  # noqa: BLE001 - a job that cannot be sent fails alone
                fut.set_exception(e)
                continue
            if limit:
                self._check_every = min(self._check_every, max(0.05, limit / 4))
            w.tasks[task_id] = (job, fut, limit)
            self._send(w, task_id, data)


_shared: WorkerPool | None = None
_shared_lock = threading.Lock()
_priorities = itertools.count(1)


def next_priority() -> int:
    """A priority for one shard run's jobs in the shared pool, lower than every later run's: the
    runs that share the pool (`imnet build --parallel`) are served oldest first, so the oldest one
    encodes at the whole pool's speed while the younger ones fill what it leaves (its reads, its
    commit and check, the gap before the next run starts), instead of all of them slowing down
    alike, finishing together and leaving the workers idle while the next ones start."""
    return next(_priorities)


def shared_pool(workers: int) -> WorkerPool:
    """This process's worker pool, started on first use and kept for the life of the process (shard
    runs reuse it), resized to `workers` when asked for another size (the latest request wins while
    several threads share it). A forked child gets a pool of its own."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.pid != os.getpid():
            _shared = WorkerPool(workers)
        elif _shared.size != workers:
            _shared.resize(workers)
        return _shared
