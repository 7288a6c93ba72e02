"""The pool workers' side and the wire between them and the dispatcher (runtime/workerpool.py):
length-prefixed messages of one task id each over a socket pair, and a shared slot where a worker
marks the item it works on, so that a death is blamed on that item, and the step of the item's work it
is in (`step`: the repair decode), so that a death there is settled with a control that takes it."""

from __future__ import annotations

import collections
import contextlib
import os
import struct
import threading
import time
from collections.abc import Iterator

from imnet_assets.runtime.procpool import EXIT_PARENT_GONE, worker_start

EXIT_OUT_OF_MEMORY = 71  # a worker whose job raised MemoryError exits with this (see WorkerPool)
RETIRE = -1  # the task id of the message that retires a worker (no payload)
HEADER = struct.Struct("!Qq")  # a message's payload length and task id
# A worker's marker holds task id << INDEX_BITS | item index in one signed 64-bit word: items up to
# 2**32 per job (the scan packs a tar's member number in it: stages/scan_pool.py), task ids up to 2**31.
INDEX_BITS = 32
# A worker's slot: [item (task id << INDEX_BITS | index, -1 between items), since, step within the item]
SLOT_WORDS = 3
# The steps a worker marks within an item (`step`), read after its death (WorkerDied.repairing). 0: none
# marked. REPAIR_DECODE: image/decode.py's second, truncation-tolerant decode of data that failed to
# decode, which a complete control image never reaches (stages/crash_control.py settles a crash there on
# a control cut short).
REPAIR_DECODE = 1
_slot = None  # this worker's slot (worker_main), None in every other process
# The variables that say how storage is reached (endpoint, credentials, proxies) and what the IMNET_*
# settings say: every job carries the submitting process's (`environment`), and the worker `adopt`s
# them before the job's reads start.
ENV_PREFIXES = ("AWS_", "IMNET_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
                "https_proxy", "all_proxy", "no_proxy")


def environment() -> tuple[tuple[str, str], ...]:
    """This process's storage and IMNET_* variables (ENV_PREFIXES), as a worker `adopt`s them. A
    pool worker's own environment is the forkserver's, as it was when the process's first pool
    started it: the same in a production process, not in one (a test's) that sets them later."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)))


def adopt(env: tuple[tuple[str, str], ...]) -> None:
    """Make this process's `environment()` equal `env` (storage clients are cached per endpoint,
    so a changed endpoint gets its own). Nothing changes when they are equal already."""
    wanted = dict(env)
    for name in [k for k in os.environ if k.startswith(ENV_PREFIXES) and k not in wanted]:
        del os.environ[name]
    for name, value in wanted.items():
        if os.environ.get(name) != value:
            os.environ[name] = value




class Channel:
    """The worker's end of its socket (blocking): messages of one task id each, length-prefixed."""

    def __init__(self, sock):
        self.sock = sock

    def send(self, task_id: int, data) -> None:
        header = HEADER.pack(len(data), task_id)
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
        header = bytearray(HEADER.size)
        self._recv_exactly(header)
        size, task_id = HEADER.unpack(header)
        data = bytearray(size)
        self._recv_exactly(data)
        return task_id, data

    def close(self) -> None:
        self.sock.close()


class Link:
    """The dispatcher's end of a worker's socket, non-blocking both ways, so that no worker (hung,
    stopped, slow to read or to write) ever holds the dispatcher up: what cannot be sent at once
    waits in `outbox` until the socket takes it, and a message is taken in as its bytes arrive,
    straight into one buffer (`recv_into`; the coordinator receives every sample's bytes here)."""

    def __init__(self, sock):
        sock.setblocking(False)
        self.sock = sock
        self.outbox: collections.deque[memoryview] = collections.deque()
        self.eof = False  # the worker's end is closed (it exited)
        self._head = bytearray(HEADER.size)
        self._buf, self._got = self._head, 0
        self._task: int | None = None  # the task id of the payload coming in; None: a header is

    def queue(self, task_id: int, data) -> None:
        self.outbox.append(memoryview(HEADER.pack(len(data), task_id)))
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
                size, self._task = HEADER.unpack(self._head)
                self._buf, self._got = bytearray(size), 0
                continue
            done, self._buf = self._buf, self._head
            task, self._task, self._got = self._task, None, 0
            yield task, done
            del done


class Marker:
    """What a worker is working on, in shared memory the parent reads (to enforce a job's time
    limit, and after the worker died): task id << INDEX_BITS | item index, -1 between items; and
    since when (time.monotonic_ns, one clock for every process of the host; -1: `timed=False`, an
    item the job's time limit does not apply to, such as the scan reading a tar). A clock read (vDSO)
    and two plain stores, no system call."""

    def __init__(self, slot, task_id: int):
        self._slot, self._task = slot, task_id << INDEX_BITS

    def __call__(self, index: int, timed: bool = True) -> None:
        self._slot[2] = 0  # a new item (or none) starts with no step marked
        if index < 0:
            self._slot[0] = -1
            return
        # first: a reader that sees the new item sees its time
        self._slot[1] = time.monotonic_ns() if timed else -1
        self._slot[0] = self._task | index


@contextlib.contextmanager
def step(value: int):
    """Mark `value` (REPAIR_DECODE) as the step of its item this pool worker is in while the block
    runs, for the parent to read should the worker die in it; outside a pool worker, nothing. One
    plain store each way: the code it wraps decodes an image."""
    slot = _slot
    if slot is None:
        yield
        return
    before = slot[2]
    slot[2] = value
    try:
        yield
    finally:
        slot[2] = before


def worker_main(sock, slot, threads: int) -> None:
    """A pool worker: a receiver thread takes jobs off the pipe as they come and starts each one's
    `prefetch` at once (its reads run in `threads` reader threads while earlier jobs encode); the
    main thread runs the jobs in the order they came and sends each result back. A job that cannot
    be unpickled here, or whose result cannot be pickled, gets an error for its reply."""
    import pickle
    import queue
    from concurrent.futures import ThreadPoolExecutor

    global _slot
    _slot = slot
    worker_start()
    conn = Channel(sock)
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
                    env, job = pickle.loads(msg)
                    adopt(env)
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
            reply = (True, job.run(state, Marker(slot, task_id)))
        except MemoryError:
            # Not a property of the image: the parent retries it in a fresh process (the slot
            # still names the item).
            os._exit(EXIT_OUT_OF_MEMORY)
        except BaseException as e:  # noqa: BLE001 - sent back to the job's caller
            reply = (False, e)
        slot[0], slot[2] = -1, 0
        try:
            data = pickle.dumps(reply, protocol=5)
        except Exception as e:  # noqa: BLE001 - a result or exception that does not pickle
            data = pickle.dumps((False, RuntimeError(f"the job's reply cannot be pickled: {type(e).__name__}: {e}")),
                                protocol=5)
        conn.send(task_id, data)
