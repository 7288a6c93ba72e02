"""runtime/deaths.py, the one counting of SPEC "Failure behaviour"'s worker deaths, on WorkerDied
objects as the pool makes them (no processes): which kind a death is, per image and kind, when a
kind fails the run, and that only crashes ever reach the control step (never an exclusion otherwise)."""

from __future__ import annotations

import signal

from imnet_assets.runtime import deaths
from imnet_assets.runtime.deaths import CRASHED, HELD, KILLED, OUT_OF_MEMORY, TIMED_OUT, DeathCount, kind_of
from imnet_assets.runtime.workerpool import EXIT_OUT_OF_MEMORY, WorkerDied

SEGV = WorkerDied(-signal.SIGSEGV, 0)
KILL = WorkerDied(-signal.SIGKILL, 0)
TERM = WorkerDied(-signal.SIGTERM, 0)
OOM = WorkerDied(EXIT_OUT_OF_MEMORY, 0)
LATE = WorkerDied(-signal.SIGKILL, 0, timed_out=1.5)


def test_each_death_is_of_one_kind_in_the_rules_order():
    assert [kind_of(d) for d in (SEGV, KILL, TERM, OOM, LATE)] == [CRASHED, KILLED, KILLED, OUT_OF_MEMORY, TIMED_OUT]
    assert kind_of(WorkerDied(-signal.SIGSEGV, 0, timed_out=1.0)) == TIMED_OUT  # the pool's kill, not a crash
    assert kind_of(WorkerDied(None, 0)) == KILLED and kind_of(WorkerDied(1, 0)) == KILLED
    assert kind_of(SEGV, blamed=False) == HELD


def test_only_crashes_reach_the_control_and_the_rest_fail_at_their_limits():
    for died, limit in ((KILL, deaths.KILLS_TO_FAIL), (OOM, deaths.MEMORY_RETRIES), (LATE, deaths.TIMEOUTS_TO_FAIL)):
        count = DeathCount()
        seen = [count.count(died, "a") for _ in range(limit)]
        assert [d.fails for d in seen] == [False] * (limit - 1) + [True], died
        assert not any(d.settles_crash for d in seen) and seen[-1].count == limit == seen[-1].limit
    count = DeathCount()
    crashes = [count.count(SEGV, "a") for _ in range(deaths.DEATHS_TO_EXCLUDE)]
    assert [d.settles_crash for d in crashes] == [False] * (deaths.DEATHS_TO_EXCLUDE - 1) + [True]
    assert not any(d.fails for d in crashes)
    held = [count.count(SEGV, None) for _ in range(deaths.MAX_JOB_RETRIES + 1)]
    assert [d.fails for d in held] == [False] * deaths.MAX_JOB_RETRIES + [True]  # that many retries, then it fails


def test_counts_are_per_image_and_kind_and_name_the_deaths():
    count = DeathCount()
    count.count(KILL, ("tar", 1))
    count.count(SEGV, ("tar", 1))
    count.count(KILL, ("tar", 2))
    death = count.count(TERM, ("tar", 1))
    assert (death.kind, death.count) == (KILLED, 2)
    assert death.say("{how}; {hows}; {nameds} ({count} of {limit}) {where}", where="x") == (
        f"signal 15; signal 9, signal 15; signal 9 (SIGKILL), signal 15 (SIGTERM) (2 of {deaths.KILLS_TO_FAIL}) x")
    late = count.count(LATE, ("tar", 1))
    assert late.say("{seconds:g} s {named}") == "1.5 s killed past its time limit of 1.5 s"


def test_a_death_while_reading_is_the_storages_whatever_its_signal_and_fails_at_its_limit():
    for died in (SEGV, KILL, OOM):
        assert kind_of(died, reading=True) == deaths.READING
    assert kind_of(SEGV, blamed=False, reading=True) == deaths.HELD  # queued: not reading anything
    count = DeathCount()
    seen = [count.count(SEGV if n % 2 else KILL, "tar", reading=True) for n in range(deaths.READ_DEATHS_TO_FAIL)]
    assert [d.fails for d in seen] == [False] * (deaths.READ_DEATHS_TO_FAIL - 1) + [True]
    assert not any(d.settles_crash for d in seen)  # never the image's, never an exclusion
    assert count.count(SEGV, "tar").kind == CRASHED  # decoding: counted apart
