"""How `imnet` stops: Ctrl-C and SIGTERM alike, at once, even while shard runs go on in threads; and
once its work is done, not at all (work_done)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import NoReturn

# A step failure whose error is one of these is a stop, not a failure: Dagster's own, for Ctrl-C at
# a point where its handler raises; KeyboardInterrupt, for SIGTERM (stop_on_signals) and for a
# Ctrl-C or SIGTERM that reached a catalog query (storage/catalog.py: QUERY_INTERRUPTED).
INTERRUPTS = ("DagsterExecutionInterruptedError", "KeyboardInterrupt")


def stop_on_signals() -> None:
    """SIGTERM (a container stopped, a pod preempted) stops a command as Ctrl-C does: both raise
    KeyboardInterrupt in the main thread (the same cleanup, "imnet: interrupted", exit 130),
    whatever dispositions the process inherited. A process started with SIGINT ignored (`&` in a
    script, some supervisors) would otherwise keep it ignored, and Dagster 1.13, which points
    SIGTERM at whatever handles SIGINT each time a run in the main thread ends
    (dagster._utils.interrupts.setup_interrupt_handlers, called when capture_interrupts restores
    SIGINT's handler), would then ignore SIGTERM too. Only the main thread of the main interpreter
    can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        return
    _keep_found()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


# Once the command's work is done: its exit `code` and the `late` signals. One command's: begin()
# empties it as the next command starts (cli.main).
_work_done: dict[str, object] = {}
# The SIGINT / SIGTERM handlers the command found before it set its own (stop_on_signals, work_done,
# exiting): begin() puts them back as the next command starts.
_found: dict[int, object] = {}


def _keep_found() -> None:
    if not _found:
        _found.update({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)})


def begin() -> None:
    """A command starts (cli.main): nothing of an earlier command in this process is kept (its late
    signals, said again after this one; its exit code), and the SIGINT / SIGTERM handlers that it set
    (stop_on_signals, work_done, exiting) are put back as they were before it set them."""
    if _found and threading.current_thread() is threading.main_thread():
        for signum, handler in _found.items():
            signal.signal(signum, handler)
    _found.clear()
    _work_done.clear()


def work_done(code: int) -> int:
    """The command's work is done, its results durable, its exit code `code`: only its cleanup is left
    (leases released, the first look joined, worker pools shut down at exit). A stop signal from now
    on has nothing to stop: it is noted (`said_late`), not raised. Raised, it made a finished build
    "imnet: interrupted", exit 130, though everything was built and recorded; or, landing in an atexit
    handler (multiprocessing's join of the workers), a traceback, and workers not shut down. A second
    signal ends the process at once, with `code` (nothing is lost: see end_now_leaving_runs). Returns `code`."""
    if threading.current_thread() is threading.main_thread():
        _keep_found()
        _work_done.update(code=code, late=_work_done.get("late", []))  # (said again at the end: the same)
        signal.signal(signal.SIGINT, _noted)
        signal.signal(signal.SIGTERM, _noted)
    return code


def _noted(signum: int, _frame) -> None:
    late = _work_done["late"]
    late.append(signal.Signals(signum).name)
    if len(late) > 1:
        sys.stdout.flush()
        print(said_late(), file=sys.stderr, flush=True)
        os._exit(int(_work_done["code"]))


def exiting() -> None:
    """The command returns its exit code: once its work was done (work_done), stop signals are ignored
    from now on, through the exit handlers (the worker pools' shutdown) and the interpreter's own
    finalization, which puts back the default action of the signals it handled: a SIGTERM in that last
    moment killed a build that had done everything (exit -15)."""
    if _work_done and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def said_late() -> str:
    """The line saying that stop signals came after the work was done ("" when none came)."""
    late = _work_done.get("late")
    if not late:
        return ""
    return (f"imnet: {' then '.join(late)} came after the work was done and recorded: nothing was left to stop "
            f"(exit {_work_done['code']}, the work's own)")


def first_done(pending) -> set:
    """The futures of `pending` that are done, waiting until one is. The wait wakes every quarter
    second: a Ctrl-C that the kernel delivers to another thread (a shard run's, a reader's) only
    sets Python's flag, and a main thread blocked in one long wait would see it once a shard run
    finished (minutes at the real size) instead of at once."""
    from concurrent.futures import FIRST_COMPLETED, wait

    while True:
        finished, _ = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
        if finished:
            return finished


def end_now_leaving_runs(left: int, code: int = 130) -> NoReturn:
    """Ends this process at once, without Python's exit, when shard runs still execute in other
    threads (Ctrl-C or SIGTERM during a parallel build). It must stay os._exit:
    - a Dagster run executing in process (materialize) can be interrupted only from the main
      thread: Dagster's interrupts are SIGINT handlers, which run in the main thread only, and
      the runs in other threads never see them;
    - a clean exit (SystemExit) first joins every ThreadPoolExecutor thread
      (concurrent.futures.thread._python_exit), so it would wait for the runs to end, minutes at
      the real size, committing shards after the user said stop; daemon threads instead would
      go on running, and writing, while atexit handlers stop the worker pools under them.
    Nothing is lost by skipping the exit handlers: the runs' workers exit with this process
    (procpool), their partial files are removed by each shard's next run, the build lease then
    names a process that is gone (taken over), and the next `imnet build` marks the runs failed
    (schedules.fail_dead_runs). Output is flushed first; the message says what was left."""
    print(f"imnet: interrupted; {left} shard runs in flight stopped with it (the next `imnet build` "
          "marks them failed and builds them again)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)
