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
import select
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from multiprocessing.connection import wait

EXIT_PARENT_GONE = 70
# Modules whose functions run in these pools (the scan and the encoder).
POOL_MODULES = ("imnet_assets.core.index", "imnet_assets.core.shard")


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
    ctx.set_forkserver_preload(["__main__", *main_script_imports(), *POOL_MODULES])
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


def pid_namespace() -> str | None:
    """This process's pid namespace ("pid:[4026531836]"), where /proc shows it. Process numbers
    mean something only within one namespace: containers on the host's network have the host's
    name but numbers of their own, so a process of another namespace cannot be asked with
    `pid_alive` (None: not Linux, every process of the host is taken as one namespace)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def pid_alive(pid: int, started_by: float | None = None) -> bool:
    """Whether process `pid` of this host is running (not a zombie) and, when `started_by` (a Unix
    time) is given, started no later than that: a process that started after it is a reuse of the
    number by someone else, so the process that was meant is gone."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # is the number taken at all?
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # taken, by another user's process
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # no /proc (not Linux) or not ours to see (hidepid): the number is taken
        return True
    fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) ": state is field 3
    if fields[0] in (b"Z", b"X"):
        return False
    if started_by is None:
        return True
    return _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK") <= started_by + 1.0


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


# ----------------------------------------------------------------------------- long-lived worker pool

EXIT_OUT_OF_MEMORY = 71  # a worker whose job raised MemoryError exits with this (see WorkerPool)


class WorkerDied(Exception):
    """The worker process running a job died (SIGKILL by the OOM killer, a codec segfault, or it
    exited on MemoryError). `culprit`: the index (within the job) of the item the worker was
    working on when it died, when it was working on one (see `mark`)."""

    def __init__(self, exitcode: int | None, culprit: int | None):
        self.exitcode = exitcode
        self.culprit = culprit
        super().__init__(f"worker process died ({self.how}) working on item {culprit}")

    @property
    def out_of_memory(self) -> bool:
        return self.exitcode == EXIT_OUT_OF_MEMORY

    @property
    def how(self) -> str:
        if self.exitcode is None:
            return "unknown exit"
        if self.exitcode < 0:
            return f"signal {-self.exitcode}"
        if self.exitcode == EXIT_OUT_OF_MEMORY:
            return "out of memory"
        return f"exit status {self.exitcode}"


class _Channel:
    """Length-prefixed messages over a socket (one end of a socketpair). Unlike a multiprocessing
    Connection, a message is received straight into one buffer (`recv_into`), not gathered in a
    BytesIO and copied out: the coordinator receives every sample's bytes through here."""

    _HEADER = struct.Struct("!Q")

    def __init__(self, sock):
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_bytes(self, data) -> None:
        self.sock.sendall(self._HEADER.pack(len(data)))
        if len(data):
            self.sock.sendall(data)

    def _recv_exactly(self, buf) -> None:
        view, got = memoryview(buf), 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if not n:
                raise EOFError("the other end closed")
            got += n

    def recv_bytes(self) -> bytearray:
        header = bytearray(self._HEADER.size)
        self._recv_exactly(header)
        data = bytearray(self._HEADER.unpack(header)[0])
        self._recv_exactly(data)
        return data

    def poll(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])

    def close(self) -> None:
        self.sock.close()


class _Marker:
    """What a worker is working on, in shared memory the parent reads after the worker died:
    (task id, item index), -1 when between items. Two plain stores, no system call."""

    def __init__(self, slot, task_id: int):
        self._slot, self._task = slot, task_id

    def __call__(self, index: int) -> None:
        self._slot[1] = -1
        self._slot[0] = self._task
        self._slot[1] = index


def _worker_main(sock, slot, threads: int) -> None:
    """A pool worker: a receiver thread takes jobs off the pipe as they come and starts each one's
    `prefetch` at once (its reads run in `threads` reader threads while earlier jobs encode); the
    main thread runs the jobs in the order they came and sends each result back."""
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
                msg = conn.recv_bytes()
                if not msg:  # retired: finish what is queued, then exit
                    jobs.put(None)
                    return
                task_id, job = pickle.loads(msg)
                try:
                    jobs.put((task_id, job, job.prefetch(readers), None))
                except BaseException as e:  # noqa: BLE001 - sent back to the job's caller
                    jobs.put((task_id, job, None, e))
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
            reply = (task_id, True, job.run(state, _Marker(slot, task_id)))
        except MemoryError:
            # Not a property of the image: the parent retries it in a fresh process (the slot
            # still names the item).
            os._exit(EXIT_OUT_OF_MEMORY)
        except BaseException as e:  # noqa: BLE001 - sent back to the job's caller
            reply = (task_id, False, e)
        slot[1] = -1
        try:
            data = pickle.dumps(reply, protocol=5)
        except Exception as e:  # noqa: BLE001 - an exception that does not pickle
            data = pickle.dumps((task_id, False, RuntimeError(f"{type(e).__name__}: {e}")), protocol=5)
        conn.send_bytes(data)


class _Worker:
    def __init__(self, proc, conn, slot):
        self.proc, self.conn, self.slot = proc, conn, slot
        self.tasks: dict[int, tuple[object, object]] = {}  # task id -> (job, future)
        self.retiring = False


class WorkerPool:
    """Long-lived worker processes (forkserver, exit with this process) that run jobs, shared by
    every thread of this process (`shared_pool`).

    A job is a picklable object with `prefetch(readers) -> state` (called in the worker as soon as
    the job arrives, to start its reads in the worker's reader threads: it must not block) and
    `run(state, mark) -> result` (called in the worker's main thread, one job after another;
    `mark(i)` says which item the job works on, so a death is blamed on that item). Each worker
    holds up to `depth` jobs, so its reads run ahead of its encoding: with `threads` reader
    threads each, a pool keeps up to 32 x workers source reads in flight: a worker's `depth` jobs
    of shard.BATCH rows are 32 sources read ahead, one ranged GET each (core/s3get.py: ~0.3 ms of
    CPU per read), about 1,400 reads/s per worker at 20 ms per S3 request.

    A worker that dies is replaced; each of its jobs fails with `WorkerDied` (naming the item it
    was working on, for the job that was running) and the caller decides what to retry. One
    dispatcher thread owns the pipes; `submit` is thread-safe.
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
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()  # the dispatcher's: pipes, sentinels, wake-up
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
        slot[0] = slot[1] = -1
        proc = self._ctx.Process(target=_worker_main, args=(theirs, slot, self.threads), daemon=True,
                                 name="imnet-encode")
        proc.start()
        theirs.close()
        self.started += 1
        w = _Worker(proc, _Channel(ours), slot)
        self._selector.register(w.conn.sock, selectors.EVENT_READ, ("conn", w))
        self._selector.register(proc.sentinel, selectors.EVENT_READ, ("dead", w))
        return w

    def _loop(self) -> None:
        while True:
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - never leave callers waiting forever
                self._fail_everything(e)
                time.sleep(0.1)  # not a busy loop should it keep failing

    def _fail_everything(self, error: BaseException) -> None:
        with self._lock:
            queued, self._queue = [q[1:] for q in self._queue], []
        for w in self._workers:
            for _job, fut in w.tasks.values():
                if not fut.done():
                    fut.set_exception(error)
            w.tasks.clear()
        for _tid, _job, fut in queued:
            if not fut.done():
                fut.set_exception(error)

    def _step(self) -> None:
        import pickle

        self._balance()
        self._dispatch()
        ready = [key.data for key, _ in self._selector.select()]
        for kind, w in ready:
            if kind == "wake":
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            elif kind == "conn" and w in self._workers:
                try:
                    self._settle(w, pickle.loads(w.conn.recv_bytes()))
                except (EOFError, OSError):
                    w.proc.join(5)  # its sentinel says the rest
        for kind, w in ready:
            if kind == "dead" and w in self._workers:
                self._bury(w)

    def _settle(self, w: _Worker, reply) -> None:
        task_id, ok, value = reply
        _job, fut = w.tasks.pop(task_id)
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
        if w.retiring and not w.tasks:
            w.conn.send_bytes(b"")

    def _bury(self, w: _Worker) -> None:
        import pickle

        while True:  # results it sent before dying are good
            try:
                if not w.conn.poll():
                    break
                self._settle(w, pickle.loads(w.conn.recv_bytes()))
            except (EOFError, OSError, KeyError):
                break
        w.proc.join(5)
        task, index = w.slot[0], w.slot[1]
        for task_id, (_job, fut) in w.tasks.items():
            fut.set_exception(WorkerDied(w.proc.exitcode, index if task_id == task and index >= 0 else None))
        w.tasks.clear()
        self._selector.unregister(w.conn.sock)
        self._selector.unregister(w.proc.sentinel)
        w.conn.close()
        self._workers.remove(w)

    def _balance(self) -> None:
        with self._lock:
            target = self._target
        active = [w for w in self._workers if not w.retiring]
        for w in active[target:]:  # shrink: retire the extra ones once idle
            w.retiring = True
            if not w.tasks:
                w.conn.send_bytes(b"")
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
                data = pickle.dumps((task_id, job), protocol=5)
            except Exception as e:  # noqa: BLE001
                fut.set_exception(e)
                continue
            w.tasks[task_id] = (job, fut)
            try:
                w.conn.send_bytes(data)
            except OSError:
                pass  # dead: its sentinel fails the task, and the caller retries it


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
