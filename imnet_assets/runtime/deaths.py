"""Which worker deaths count against an image, and what follows (SPEC "Failure behaviour"): the one
place of the rule the shard runs' encoding (stages/shard_jobs.py), the index's scan
(stages/scan_pool.py) and the eval set's hashing (stages/eval_pool.py) apply.

A WorkerDied (runtime/workerpool.py) blamed on an image is one of five kinds, in this order: while
reading its source (`READING`: the storage's, whatever the signal), out of memory, past the time
limit, a crash signal (workerpool.CRASH_SIGNALS), else killed from outside (SIGKILL: the OOM killer,
a cgroup limit, preemption; SIGTERM). A death blamed on no image (the job was queued in the
worker, or between images) is `HELD`. `DeathCount.count` counts it per image and
kind and says what follows (`Death`): retry in a fresh process; `fails` (the run or stage fails
naming the image: never an exclusion); or `settles_crash` (the image crashed DEATHS_TO_EXCLUDE
times: the caller's control step, crash_control, decides whether it is excluded). The wording of
the log lines and exceptions stays with each caller.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from imnet_assets.runtime.workerpool import WorkerDied

DEATHS_TO_EXCLUDE = 2  # crashes (workerpool.CRASH_SIGNALS) one image causes before it is excluded, naming them


MEMORY_RETRIES = 3  # MemoryErrors of one image before the run fails (each time in a fresh worker)


KILLS_TO_FAIL = 4  # kills from outside (SIGKILL, SIGTERM) while working on one image before the run fails


TIMEOUTS_TO_FAIL = 2  # times one image runs past IMNET_IMAGE_TIMEOUT (each in a fresh worker) before the run fails


MAX_JOB_RETRIES = 8  # deaths of a job's workers while it held no image (queued, between images) before the run fails


# deaths while reading one source (the index's raw tar, an eval file or tar), each time in a fresh process (the
# index's: without a memory map), before the stage fails: the storage's fault, never the image's
READ_DEATHS_TO_FAIL = 4

HELD = "held"  # the job held no image: queued in the worker, or between images
OUT_OF_MEMORY = "out of memory"
TIMED_OUT = "timed out"
CRASHED = "crashed"
KILLED = "killed"
READING = "reading"  # any death while the job read an image's source: the storage's (a SIGBUS under a map)

LIMITS = {HELD: MAX_JOB_RETRIES, OUT_OF_MEMORY: MEMORY_RETRIES, TIMED_OUT: TIMEOUTS_TO_FAIL,
          CRASHED: DEATHS_TO_EXCLUDE, KILLED: KILLS_TO_FAIL, READING: READ_DEATHS_TO_FAIL}


def kind_of(died: WorkerDied, blamed: bool = True, reading: bool = False) -> str:
    """The kind of a death; `blamed`: it was blamed on an image (else HELD); `reading`: while its
    source was read (READING, whatever killed it)."""
    if not blamed:
        return HELD
    if reading:
        return READING
    if died.out_of_memory:
        return OUT_OF_MEMORY
    if died.timed_out is not None:
        return TIMED_OUT
    if died.crashed:
        return CRASHED
    return KILLED


@dataclass(frozen=True)
class Death:
    """One death, counted: its `kind` and all deaths of that kind on its image so far (`deaths`,
    the last one this; HELD: the job's), against the kind's `limit`."""

    kind: str
    deaths: tuple[WorkerDied, ...]

    @property
    def count(self) -> int:
        return len(self.deaths)

    @property
    def limit(self) -> int:
        return LIMITS[self.kind]

    @property
    def fails(self) -> bool:
        """The run or stage fails naming the image (or the job's images): never an exclusion. HELD
        allows MAX_JOB_RETRIES retries; the others fail at their limit."""
        if self.kind == CRASHED:
            return False
        return self.count > self.limit if self.kind == HELD else self.count >= self.limit

    @property
    def settles_crash(self) -> bool:
        """The image crashed DEATHS_TO_EXCLUDE times: the caller's control step decides."""
        return self.kind == CRASHED and self.count >= self.limit

    def say(self, template: str, **more) -> str:
        """`template` filled with the count and the deaths: {count}, {limit}, {seconds} (the last
        death's time limit), {how} and {named} (the last death), {hows} and {nameds} (all, joined
        with ", "), and `more`."""
        last = self.deaths[-1]
        return template.format(count=self.count, limit=self.limit, seconds=last.timed_out, how=last.how,
                               named=last.named, hows=", ".join(d.how for d in self.deaths),
                               nameds=", ".join(d.named for d in self.deaths), **more)

    def follow(self, notes: dict, failures: dict, log: Callable[[str], None], **more) -> None:
        """What every caller does with a death blamed on an image: logs `notes[kind]`, and when it
        `fails`, raises `failures[kind]` (an exception class and its template), each `say`-filled
        with `more`. A crash that `settles_crash` is left to the caller's control step."""
        log(self.say(notes[self.kind], **more))
        if self.fails:
            fault, template = failures[self.kind]
            raise fault(self.say(template, **more)) from None  # the WorkerDied being handled says nothing more


class DeathCount:
    """The deaths of one job's images (any hashable names them), per image and kind."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, Hashable], list[WorkerDied]] = collections.defaultdict(list)

    def count(self, died: WorkerDied, image: Hashable | None, reading: bool = False) -> Death:
        """Counts `died`, blamed on `image` (None: on no image, HELD), `reading` its source (READING)."""
        kind = kind_of(died, image is not None, reading)
        seen = self._seen[kind, image]
        seen.append(died)
        return Death(kind, tuple(seen))
