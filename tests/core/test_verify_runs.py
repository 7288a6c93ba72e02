"""`imnet verify`'s workers (release/verify_runs.py) killed for real (SIGKILL, as the OOM killer
sends) while they check real shards (build_shard's, of real photos, one with a flipped byte): the
shard is checked again in a fresh worker and the outcome is the undisturbed one, the bad shard's
verdict included; a shard whose checker is killed every time is reported not checked, naming the
deaths, never as bad, and the other shard's verdict stands."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
import types

import pytest

from imnet_assets.image.encode import EncodeSettings
from imnet_assets.orchestrate.interrupts import first_done
from imnet_assets.release import verify_runs
from imnet_assets.release.outroot import read_manifest
from imnet_assets.release.plan import write_slice
from imnet_assets.runtime import host
from imnet_assets.stages.shard import build_shard
from tests.core.test_shard import jpeg, planned, write_raw_tar
from tests.core.test_shard_workers import corrupt_an_image_byte

ENC = EncodeSettings(quality=80, method=2)
WNID = "n01440764"
PER_SHARD = 16
SHARDS = ["0000", "0001"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two committed shards of 1024x768 photos (each check decodes them: long enough to be caught
    at it), and per shard its catalog record and rows (verify.CATALOG_COLUMNS), as `imnet verify`
    reads them from the catalog. Shard 0000 has one flipped image byte."""
    tmp = tmp_path_factory.mktemp("verify_runs")
    members = [(f"{WNID}_{i}.JPEG", jpeg(1024, 768, i)) for i in range(2 * PER_SHARD)]
    (tmp / "raw").mkdir()
    where = write_raw_tar(tmp / "raw" / f"{WNID}.tar", members)
    rows = [[f"{WNID}_{i}", WNID, 0, f"{WNID}.tar", name, *where[name], hashlib.sha256(data).hexdigest(), 1024, 768,
             False] for i, (name, data) in enumerate(members)]
    out = tmp / "out"
    tasks = []
    for n, key in enumerate(SHARDS):
        mine = rows[n * PER_SHARD:(n + 1) * PER_SHARD]
        write_slice(str(out), key, planned(mine, list(range(PER_SHARD))))
        name = f"shard-{key}.tar"
        result = build_shard(out_root=str(out), raw_root=str(tmp / "raw"), shard_key=key, shard_name=name,
                             settings=ENC, workers=2, run_id="run-verify")
        assert result.problems == [] and result.num_samples == PER_SHARD
        by_key = {r[0]: r for r in mine}
        manifest = read_manifest(str(out), key)
        catalog_rows = [(s["key"], 0, WNID, s["webp_sha256"], s["webp_bytes"], s["width"], s["height"],
                         s["orig_width"], s["orig_height"], by_key[s["key"]][7], s["repaired"])
                        for s in manifest["samples"]]
        record = {"shard": key, "path": name, "sha256": manifest["sha256"], "bytes": (out / name).stat().st_size,
                  "num_samples": PER_SHARD}
        tasks.append((record, str(out / name), catalog_rows))
    bad = corrupt_an_image_byte(str(out / "shard-0000.tar"))
    return types.SimpleNamespace(tasks=tasks, bad=bad)


def verify(shards, jobs: int = 2) -> dict[str, tuple[list[str], str | None]]:
    done = verify_runs.checked_shards(jobs, iter(shards.tasks), True, "webp", first_done)
    return {c.shard["shard"]: (c.problems, c.lost) for c in done}


def kill_checkers(pool, times: dict[str, int], stop: threading.Event, killed: list[tuple[str, int]]) -> None:
    """SIGKILL each verify worker caught checking a shard, up to `times[shard]` times per shard."""
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        for pid, job, _index in pool.working_on():
            key = job.shard["shard"]
            if pid in {p for _, p in killed}:
                continue  # killed already, not yet seen dead by the pool (a busy machine: over 50 ms)
            if [k for k, _ in killed].count(key) < times.get(key, 0):
                os.kill(pid, signal.SIGKILL)
                killed.append((key, pid))
                time.sleep(0.05)  # let the pool see the death before looking again
                break
        time.sleep(0.001)


def verify_while_killing(shards, times: dict[str, int]):
    pool = verify_runs.verify_pool(2)
    killed: list[tuple[str, int]] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_checkers, args=(pool, times, stop, killed))
    killer.start()
    try:
        return verify(shards), killed
    finally:
        stop.set()
        killer.join()


def test_a_checker_killed_mid_shard_costs_a_fresh_check_and_the_verdicts_are_the_undisturbed_ones(shards):
    undisturbed = verify(shards)
    assert undisturbed["0001"] == ([], None)
    problems, lost = undisturbed["0000"]
    assert lost is None and any(f"sample {shards.bad}: webp" in p for p in problems), problems
    got, killed = verify_while_killing(shards, {"0000": 1, "0001": 2})
    assert sorted(k for k, _ in killed) == ["0000", "0001", "0001"], killed  # each caught checking its shard
    assert not any(host.pid_alive(pid) for _, pid in killed)
    assert got == undisturbed


def test_a_shard_whose_checker_is_killed_every_time_is_not_checked_and_never_bad(shards, tmp_path):
    # shard 0001 is read from a FIFO no one writes: each checker blocks opening it until it is killed,
    # so the killer catches every one however slow a busy machine makes it (a real shard's check
    # could end before the killer looked)
    fifo = tmp_path / "shard-0001.tar"
    os.mkfifo(fifo)
    blocked = types.SimpleNamespace(tasks=[(r, str(fifo) if r["shard"] == "0001" else url, rows)
                                           for r, url, rows in shards.tasks], bad=shards.bad)
    got, killed = verify_while_killing(blocked, {"0001": 99})
    assert [k for k, _ in killed] == ["0001"] * verify_runs.CHECK_DEATHS
    problems, lost = got["0001"]
    assert problems == [], problems  # no verdict on its bytes
    assert lost.startswith(f"the process checking it died {verify_runs.CHECK_DEATHS} times "
                           "(signal 9 (SIGKILL), "), lost
    assert got["0000"] == verify(shards)["0000"]  # the other shard's verdict stands


def test_a_commit_record_is_left_to_a_run_holding_the_shards_lease(tmp_path):
    """verify removes the commit record of a shard it failed only holding the shard's lease: while
    a run holds it (writing the shard again), the record is left to that run, and verify says so."""
    import json

    from imnet_assets.release import lease
    from imnet_assets.release.outroot import state_url

    out = str(tmp_path)
    record = state_url(out, "0000")
    os.makedirs(os.path.dirname(record))
    with open(record, "w") as f:
        json.dump({"sha256": "ab" * 32, "run_id": "r1"}, f)
    failed = {"shard": "0000", "sha256": "ab" * 32, "run_id": "r1"}
    with lease.acquire(out, lease.shard_lease_name("0000"), "run r2"):
        said = verify_runs.forget_failed(out, failed)
    assert said and said[0].startswith("commit record left alone: run r2 (host ")
    assert os.path.exists(record)
    assert verify_runs.forget_failed(out, failed) == [
        "commit record removed: the next `imnet build` writes this shard again"]
    assert not os.path.exists(record) and not os.path.exists(os.path.join(out, "_locks"))


def test_a_shard_a_run_is_writing_is_not_checked_and_a_lease_verify_holds_leaves_the_verdict(shards):
    """Damaged shard 0000 (a flipped image byte) checked with its out root while a run holds its lease
    (writing it again): no verdict, NOT CHECKED naming the run, its record left; the other shard is
    ok. While another `imnet verify` holds the lease instead (removing the record: it writes no
    shard), the FAIL stands, and the record is left to that verify, which the line names."""
    from imnet_assets.release import lease
    from imnet_assets.release.outroot import state_url

    out = os.path.dirname(shards.tasks[0][1])

    def check() -> dict[str, tuple[list[str], str | None]]:
        done = verify_runs.checked_shards(2, iter(shards.tasks), True, "webp", first_done, out)
        return {c.shard["shard"]: (c.problems, c.lost, c.done) for c in done}

    with lease.acquire(out, lease.shard_lease_name("0000"), "run r9"):
        got = check()
    assert got["0001"] == ([], None, [])
    problems, lost, did = got["0000"]
    assert problems == [] and did == [] and lost.startswith("it changed while it was checked: run r9 (host "), got
    assert "holds its lease: it is writing the shard again" in lost
    assert os.path.exists(state_url(out, "0000"))
    with lease.acquire(out, lease.shard_lease_name("0000"), verify_runs.FORGETTING):
        got = check()
    problems, lost, did = got["0000"]
    assert lost is None and problems == verify(shards)["0000"][0], got  # what verify did is no problem
    assert len(did) == 1 and did[0].startswith(f"commit record left alone: {verify_runs.FORGETTING} (host "), did
    assert os.path.exists(state_url(out, "0000"))


def test_a_shard_whose_commit_record_is_another_commit_than_the_catalogs_is_not_checked(shards):
    """The catalog verify read names run "run-old" for damaged shard 0000, its commit record another
    ("run-verify": a run wrote the shard since the catalog recorded it, whose audit has not recorded
    it yet): no verdict against a catalog that does not describe the commit there, and the record
    (that run's commit) is kept."""
    from imnet_assets.release.outroot import state_url

    out = os.path.dirname(shards.tasks[0][1])
    tasks = [(dict(sh, run_id="run-old") if sh["shard"] == "0000" else sh, url, rows) for sh, url, rows in shards.tasks]
    done = {c.shard["shard"]: (c.problems, c.lost)
            for c in verify_runs.checked_shards(2, iter(tasks), True, "webp", first_done, out)}
    problems, lost = done["0000"]
    assert problems == [] and lost.startswith("it changed while it was checked: its commit record is of another "
                                              "commit (run run-verify) than the catalog's (run run-old)"), done
    assert done["0001"] == ([], None)
    assert os.path.exists(state_url(out, "0000"))
