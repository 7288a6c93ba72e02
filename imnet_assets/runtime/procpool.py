"""Process pools whose workers never outlive the process that started them.

A `ProcessPoolExecutor` worker blocks reading its task queue, and with the forkserver start
method every worker also holds the forkserver's "alive" pipe: when the parent is SIGKILLed
(OOM killer, a run terminated from the UI, `kill -9`), nothing ever wakes them, so the workers
and the forkserver would sit there forever. Each worker here watches its parent's sentinel (a
pipe the parent alone holds open) in a daemon thread and exits as soon as the parent is gone.

Workers start fast: the forkserver imports, once, what every worker would otherwise import again
before its first task. Python keeps one forkserver per process, started by whichever pool comes
first with that pool's preload list, so every pool asks for the same list: the modules whose
functions run in pools, and what the main script imports. (Multiprocessing's "safe importing of
main" re-runs the main script in each worker; for the `dagster` and `imnet` console scripts that
is all of Dagster, 0.7-2.5 s of CPU per worker per shard run. A "__main__" preload does not help:
Python 3.11's forkserver is never told the main script's path.)
"""

from __future__ import annotations

import ast
import atexit
import collections
import heapq
import itertools
import multiprocessing
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from multiprocessing.connection import wait

EXIT_PARENT_GONE = 70
# Modules whose functions run in these pools (the scan and the encoder): each names itself with
# preload(__name__), so the forkserver imports them once and every worker starts with them loaded.
_preloaded: list[str] = []


def preload(module: str) -> None:
    """Have the forkserver (when it starts after this call) import `module` before forking workers."""
    if module not in _preloaded:
        _preloaded.append(module)


def preloaded() -> list[str]:
    return list(_preloaded)


def _watch_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    try:
        sentinel = parent.sentinel
    except ValueError:
        return

    def watch() -> None:
        wait([sentinel])  # readable (EOF) only once the parent has exited
        os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _forkserver_context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", *main_script_imports(), *_preloaded])
    return ctx


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A forkserver pool of `workers` processes that exit when this process dies."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=_forkserver_context(), initializer=_watch_parent)


def start_forkserver() -> None:
    """Start this process's forkserver (and its imports of the pool modules, ~0.5 s) in the
    background now, so that the first pool started later forks its workers at once."""
    from multiprocessing import forkserver

    _forkserver_context()
    threading.Thread(target=forkserver.ensure_running, name="forkserver-start", daemon=True).start()


def main_script_imports() -> list[str]:
    """Modules the main script imports at its top level (absolute imports only), or []."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read())
    except (TypeError, OSError, SyntaxError, ValueError):
        return []
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return [n for n in dict.fromkeys(names) if n != "__future__"]


def bounded_map(pool: Executor, fn: Callable, items: Iterable, window: int, *args) -> Iterator:
    """Ordered map with at most `window` tasks in flight, so results never pile up in memory
    ahead of a slower consumer (Executor.map submits everything at once)."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item, *args))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ----------------------------------------------------------------------------- long-lived worker pool

EXIT_OUT_OF_MEMORY = 71  # a worker whose job raised MemoryError exits with this (see WorkerPool)
# The deaths a process's own work causes (a codec crashing on the bytes it was given): the only ones
# that say something about the item it was working on. SIGKILL (the OOM killer, a cgroup limit,
# preemption, this pool's time limit), SIGTERM and exits come from outside.
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT})
RETIRE = -1  # the task id of the message that retires a worker (no payload)
_HEADER = struct.Struct("!Qq")  # a message's payload length and task id
_INDEX_BITS = 20  # a worker's marker holds task id << _INDEX_BITS | item index in one word


class WorkerDied(Exception):
    """The worker process running a job died: killed from outside (SIGKILL by the OOM killer, a
    cgroup limit, preemption; SIGTERM), killed by the pool past the job's time limit (`timed_out`,
    the limit in seconds), crashed (a codec segfault: `crashed`), or exited on MemoryError
    (`out_of_memory`). `culprit`: the index (within the job) of the item the worker was working on
    when it died, for the job it was running (see `mark`); None for the other jobs it held."""

    def __init__(self, exitcode: int | None, culprit: int | None, timed_out: float | None = None):
        self.exitcode = exitcode
        self.culprit = culprit
        self.timed_out = timed_out
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


class _Channel:
    """The worker's end of its socket (blocking): messages of one task id each, length-prefixed."""

    def __init__(self, sock):
        self.sock = sock

    def send(self, task_id: int, data) -> None:
        header = _HEADER.pack(len(data), task_id)
        sent = self.sock.sendmsg([header, data])  # one call: the reader sees header and payload together
        if sent < len(header):
            self.sock.sendall(header[sent:])
            sent = len(header)
        if sent - len(header) < len(data):
            self.sock.sendall(memoryview(data)[sent - len(header):])

    def _recv_exactly(self, buf) -> None:
        view, got = memoryview(buf), 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if not n:
                raise EOFError("the other end closed")
            got += n

    def recv(self) -> tuple[int, bytearray]:
        header = bytearray(_HEADER.size)
        self._recv_exactly(header)
        size, task_id = _HEADER.unpack(header)
        data = bytearray(size)
        self._recv_exactly(data)
        return task_id, data

    def close(self) -> None:
        self.sock.close()


class _Link:
    """The dispatcher's end of a worker's socket, non-blocking both ways, so that no worker (hung,
    stopped, slow to read or to write) ever holds the dispatcher up: what cannot be sent at once
    waits in `outbox` until the socket takes it, and a message is taken in as its bytes arrive,
    straight into one buffer (`recv_into`; the coordinator receives every sample's bytes here)."""

    def __init__(self, sock):
        sock.setblocking(False)
        self.sock = sock
        self.outbox: collections.deque[memoryview] = collections.deque()
        self.eof = False  # the worker's end is closed (it exited)
        self._head = bytearray(_HEADER.size)
        self._buf, self._got = self._head, 0
        self._task: int | None = None  # the task id of the payload coming in; None: a header is

    def queue(self, task_id: int, data) -> None:
        self.outbox.append(memoryview(_HEADER.pack(len(data), task_id)))
        if len(data):
            self.outbox.append(memoryview(data))

    def flush(self) -> bool:
        """Send what the socket takes now; whether everything queued is sent. OSError: gone."""
        while self.outbox:
            try:
                n = self.sock.send(self.outbox[0])
            except BlockingIOError:
                return False
            if n == len(self.outbox[0]):
                self.outbox.popleft()
            else:
                self.outbox[0] = self.outbox[0][n:]
        return True

    def receive(self) -> Iterator[tuple[int, bytearray]]:
        """(task id, payload) of each message completed by what has arrived (none, if none was),
        each as soon as it is complete (and dropped by the caller before the next is allocated)."""
        while not self.eof:
            if self._got < len(self._buf):
                try:
                    n = self.sock.recv_into(memoryview(self._buf)[self._got:])
                except BlockingIOError:
                    break
                except OSError:  # reset: the worker is gone
                    n = 0
                if not n:
                    self.eof = True
                    break
                self._got += n
                if self._got < len(self._buf):
                    break  # a short read: nothing more for now (the selector says when there is)
            if self._task is None:  # a header is complete: its payload comes next
                size, self._task = _HEADER.unpack(self._head)
                self._buf, self._got = bytearray(size), 0
                continue
            done, self._buf = self._buf, self._head
            task, self._task, self._got = self._task, None, 0
            yield task, done
            del done


class _Marker:
    """What a worker is working on, in shared memory the parent reads (to enforce a job's time
    limit, and after the worker died): task id << _INDEX_BITS | item index, -1 between items; and
    since when (time.monotonic_ns, one clock for every process of the host). A clock read (vDSO) and
    two plain stores, no system call."""

    def __init__(self, slot, task_id: int):
        self._slot, self._task = slot, task_id << _INDEX_BITS

    def __call__(self, index: int) -> None:
        if index < 0:
            self._slot[0] = -1
            return
        self._slot[1] = time.monotonic_ns()  # first: a reader that sees the new item sees its time
        self._slot[0] = self._task | index


def _worker_main(sock, slot, threads: int) -> None:
    """A pool worker: a receiver thread takes jobs off the pipe as they come and starts each one's
    `prefetch` at once (its reads run in `threads` reader threads while earlier jobs encode); the
    main thread runs the jobs in the order they came and sends each result back. A job that cannot
    be unpickled here, or whose result cannot be pickled, gets an error for its reply."""
    import pickle
    import queue
    from concurrent.futures import ThreadPoolExecutor

    _watch_parent()
    conn = _Channel(sock)
    readers = ThreadPoolExecutor(threads, thread_name_prefix="prefetch")
    jobs: queue.SimpleQueue = queue.SimpleQueue()

    def receive() -> None:
        try:
            while True:
                task_id, msg = conn.recv()
                if task_id == RETIRE:  # finish what is queued, then exit
                    jobs.put(None)
                    return
                try:
                    job = pickle.loads(msg)
                    jobs.put((task_id, job, job.prefetch(readers), None))
                except BaseException as e:  # noqa: BLE001 - sent back to the job's caller
                    jobs.put((task_id, None, None, e))
        except (EOFError, OSError):  # the parent is gone
            os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=receive, name="receive", daemon=True).start()
    while True:
        item = jobs.get()
        if item is None:
            conn.close()
            os._exit(0)
        task_id, job, state, error = item
        try:
            if error is not None:
                raise error
            reply = (True, job.run(state, _Marker(slot, task_id)))
        except MemoryError:
            # Not a property of the image: the parent retries it in a fresh process (the slot
            # still names the item).
            os._exit(EXIT_OUT_OF_MEMORY)
        except BaseException as e:  # noqa: BLE001 - sent back to the job's caller
            reply = (False, e)
        slot[0] = -1
        try:
            data = pickle.dumps(reply, protocol=5)
        except Exception as e:  # noqa: BLE001 - a result or exception that does not pickle
            data = pickle.dumps((False, RuntimeError(f"the job's reply cannot be pickled: {type(e).__name__}: {e}")),
                                protocol=5)
        conn.send(task_id, data)


class _Worker:
    def __init__(self, proc, link: _Link, slot):
        self.proc, self.link, self.slot = proc, link, slot
        self.tasks: dict[int, tuple[object, object, float]] = {}  # task id -> (job, future, time limit or 0)
        self.retiring = False
        self.retired = False  # told to exit once its jobs are done
        self.buried = False
        self.events = 0  # what the dispatcher's selector watches its socket for
        self.killed_for: tuple[int, int, float] | None = None  # (task, item, limit): killed past a time limit

    def working_on(self) -> tuple[int, int, float] | None:
        """(task id, item index, since (time.monotonic())) of the item it works on, or None."""
        packed = self.slot[0]
        if packed < 0:
            return None
        since = self.slot[1]  # written before slot[0]: never older than the item read there
        return packed >> _INDEX_BITS, packed & ((1 << _INDEX_BITS) - 1), since / 1e9


class WorkerPool:
    """Long-lived worker processes (forkserver, exit with this process) that run jobs, shared by
    every thread of this process (`shared_pool`).

    A job is a picklable object with `prefetch(readers) -> state` (called in the worker as soon as
    the job arrives, to start its reads in the worker's reader threads: it must not block) and
    `run(state, mark) -> result` (called in the worker's main thread, one job after another;
    `mark(i)` says the job now works on item i, `mark(-1)` that it is between items, so a death is
    blamed on that item). Each worker holds up to `depth` jobs, so its reads run ahead of its
    encoding: with `threads` reader threads each, a pool keeps up to 32 x workers source reads in
    flight: a worker's `depth` jobs of shard.BATCH rows are 32 sources read ahead, one ranged GET
    each (core/s3read.py), about 1,400 reads/s per worker at 20 ms per S3 request.

    A job fails alone: an exception in the worker, a reply that cannot be unpickled here
    (ReplyUnreadable) or a job that cannot be pickled fail its future only; other jobs, and the
    other shard runs sharing the pool, go on. A worker that dies is replaced; each of its jobs
    fails with `WorkerDied` (naming the item it was working on, for the job that was running) and
    the caller decides what to retry. A job with a `time_limit` attribute (seconds) gets its worker
    SIGKILLed when one item (from its `mark(i)`) runs longer: `WorkerDied.timed_out`. Replies to
    jobs no longer held (failed by the dispatcher) are dropped.

    One dispatcher thread owns the sockets, never blocking on one worker (non-blocking sends and
    receives, no waits on a process); `submit` is thread-safe.
    """

    def __init__(self, workers: int, threads: int = 32, depth: int = 4):
        self.pid = os.getpid()
        self.threads, self.depth = threads, depth
        self._ctx = _forkserver_context()
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
        order among equals (shard runs pass their `next_priority()`: see there)."""
        from concurrent.futures import Future

        future: Future = Future()
        with self._lock:
            self._next_id += 1
            heapq.heappush(self._queue, (priority, self._next_id, job, future))
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
        slot = self._ctx.RawArray("q", 2)
        slot[0], slot[1] = -1, 0
        proc = self._ctx.Process(target=_worker_main, args=(theirs, slot, self.threads), daemon=True,
                                 name="imnet-encode")
        proc.start()
        theirs.close()
        self.started += 1
        w = _Worker(proc, _Link(ours), slot)
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
            queued, self._queue = [q[1:] for q in self._queue], []
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
        for task_id, (_job, fut, _limit) in w.tasks.items():
            mine = task_id == task
            if not fut.done():
                fut.set_exception(WorkerDied(w.proc.exitcode, index if mine else None, limit if mine else None))
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
            if limit and now - since > limit and w.slot[0] == task << _INDEX_BITS | index:
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

    def _dispatch(self) -> None:
        import pickle

        while True:
            free = [w for w in self._workers if not w.retiring and len(w.tasks) < self.depth]
            if not free:
                return
            with self._lock:
                if not self._queue:
                    return
                _priority, task_id, job, fut = heapq.heappop(self._queue)
            if not fut.set_running_or_notify_cancel():
                continue
            w = min(free, key=lambda x: len(x.tasks))
            try:
                data = pickle.dumps(job, protocol=5)
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
