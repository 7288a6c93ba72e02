"""`imnet build --shards SPEC`: which partitions a shard spec selects."""

from __future__ import annotations

import re

import pytest

from imnet_assets.cli import parse_shards
from imnet_assets.settings import SettingsError

KEYS = [f"{i:04d}" for i in range(16)]


def test_ranges_and_single_shards():
    assert parse_shards("0000-0002,0005", KEYS) == ["0000", "0001", "0002", "0005"]
    assert parse_shards("0015", KEYS) == ["0015"]
    assert parse_shards("0003-0003", KEYS) == ["0003"]


def test_unpadded_numbers_and_spaces_are_accepted():
    assert parse_shards(" 1-2 , 7 ", KEYS) == ["0001", "0002", "0007"]


def test_order_given_is_kept_and_repeats_are_dropped():
    assert parse_shards("0005,0000-0002,0001,0005", KEYS) == ["0005", "0000", "0001", "0002"]


@pytest.mark.parametrize("spec", [None, "", "all"])
def test_all_or_nothing_selects_every_shard(spec):
    assert parse_shards(spec, KEYS) == KEYS
    assert parse_shards(spec, KEYS) is not KEYS  # a copy the caller may change


@pytest.mark.parametrize(
    "spec",
    [
        "abc",
        "0000-",
        "-0003",
        "0001-0002-0003",
        "0000..0003",
        "1.5",
        "0016",  # one past the last shard
        "0010-0020",  # runs past the last shard
        "0005-0002",  # a backwards range selects nothing: an error, not a silent empty build
        ",",  # nothing at all
        "0_1",  # Python's int() reads these as numbers; a shard spec does not
        "+3",
        "\u0663",  # ARABIC-INDIC DIGIT THREE
        "00001",  # more digits than a shard key has
    ],
)
def test_bad_specs_raise_settings_error(spec):
    with pytest.raises(SettingsError, match="--shards"):
        parse_shards(spec, KEYS)


def test_an_unreachable_s3_endpoint_is_a_clear_error_naming_it(tmp_path):
    """No traceback: what could not be done, on which URL, and what to check."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": "AKIAUNREACHABLE0001", "AWS_SECRET_ACCESS_KEY": "s3cr3t-unreachable",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1",
           "IMNET_RAW_ROOT": "s3://nowhere/raw", "IMNET_OUT_ROOT": "s3://nowhere/out",
           "IMNET_CATALOG": str(tmp_path / "catalog.duckdb")}
    result = subprocess.run([sys.executable, "-m", "imnet_assets.cli", "status"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # (no catalog here, so status goes straight to the plan under the out root)
    assert result.stderr.startswith("imnet: cannot read s3://nowhere/out/_plan/_index.json: "), result.stderr
    # a read held to the plan index's limit (limits24): its bytes, up to a byte past the limit
    assert re.search(rf"GET s3://nowhere/out/_plan/_index\.json bytes 0-[0-9]+ at http://127\.0\.0\.1:{port}: ",
                     result.stderr), result.stderr
    assert "the endpoint cannot be reached: check AWS_ENDPOINT_URL and the network" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one line
    assert "s3cr3t-unreachable" not in result.stderr + result.stdout


def test_refused_credentials_are_named_as_such():
    from imnet_assets.storage import fs

    err = fs.storage_error("s3://b/raw", "list", PermissionError("Forbidden"))
    assert isinstance(err, OSError) and not isinstance(err, FileNotFoundError)
    assert str(err).startswith("cannot list s3://b/raw: PermissionError: Forbidden (the storage refused the credentials")


def test_none_selects_no_shard():
    from imnet_assets.cli import parse_shards

    assert parse_shards("none", [f"{i:04d}" for i in range(4)]) == []


@pytest.mark.parametrize("argv", [["verify", "--jobs", "0"], ["verify", "--jobs", "x"], ["build", "--parallel", "-2"]])
def test_counts_must_be_whole_numbers_of_at_least_one(argv, capsys):
    from imnet_assets.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "is not a whole number >= 1" in capsys.readouterr().err


def test_verify_help_names_its_exit_statuses(capsys):
    """A script tells damage (1: rebuild) from shards not checked (3: check again) by `imnet verify`'s
    exit status, which --help lists with the CLI's own (2 usage, 130 interrupted)."""
    from imnet_assets.cli import main
    from imnet_assets.orchestrate.verify_command import FAILED, NOT_CHECKED, OK

    assert (OK, FAILED, NOT_CHECKED) == (0, 1, 3)
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--help"])
    assert exc.value.code == 0
    said = " ".join(capsys.readouterr().out.split())
    for status in ("0 every shard ok", "1 something FAILED", "3 nothing failed but some shards were NOT CHECKED",
                   "2 a usage or configuration error", "130 interrupted"):
        assert status in said, said


def test_lock_holder_names_the_writing_process():
    """DuckDB's message when another process holds the catalog, read into a pid and its command."""
    import os
    import sys

    from imnet_assets.storage.catalog import lock_holder

    msg = (f'IO Error: Could not set lock on file "/x/catalog.duckdb": Conflicting lock is held in '
           f'{sys.executable} (PID {os.getpid()}). See also https://duckdb.org/docs/current/connect/concurrency')
    assert lock_holder(RuntimeError(msg)).startswith(f"pid {os.getpid()}: python")
    assert lock_holder(RuntimeError("IO Error: No such file or directory")) is None


def test_waiting_for_shard_runs_sees_a_ctrl_c_that_another_thread_received():
    """The kernel may hand Ctrl-C (SIGINT to the process group) to any thread of `imnet build`; the
    main thread, waiting for the first of its shard runs to end, must raise KeyboardInterrupt
    at once, not when a run ends (a shard committed behind the user's back)."""
    import signal
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from imnet_assets.orchestrate.interrupts import first_done

    hold = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(hold.wait, 30)  # a shard run that goes on for a while
        other = threading.Thread(target=lambda: time.sleep(1.0))
        other.start()
        threading.Timer(0.3, lambda: signal.pthread_kill(other.ident, signal.SIGINT)).start()
        started = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                first_done({run: "0000"})
            assert time.monotonic() - started < 5, "the interrupt waited for the run"
            assert not run.done()
        finally:
            hold.set()
            other.join()


@pytest.mark.parametrize("where", ["equal", "inside", "containing", "s3-inside"])
def test_build_refuses_an_out_root_overlapping_the_raw_root_before_writing_anything(tmp_path, where):
    """One line on stderr, exit 2, within seconds, and nothing written: no out folder, no catalog,
    no Dagster storage, the raw release as it was (no request goes out to the endpoint either:
    nothing listens on it)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from imnet_assets.sample.sample_raw import write_sample_raw
    from tests.conftest import build_env, dagster_home

    raw = tmp_path / "data" / "raw"
    write_sample_raw(raw, synsets=2, images=3, seed=0)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = {"equal": raw, "inside": raw / "wds", "containing": tmp_path / "data",
           "s3-inside": "s3://bucket/raw/wds"}[where]
    env = build_env(tmp_path, "s3://bucket/raw" if where.startswith("s3") else raw, IMNET_OUT_ROOT=str(out),
                    DAGSTER_HOME=str(dagster_home(tmp_path)), AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
                    AWS_ACCESS_KEY_ID="AKIAOVERLAP00000001", AWS_SECRET_ACCESS_KEY="overlap-secret")
    def snapshot():
        return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))

    before = snapshot()
    exe = os.path.join(os.path.dirname(sys.executable), "imnet")
    started = time.monotonic()
    result = subprocess.run([exe, "build"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert time.monotonic() - started < 60
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imnet: configuration error: IMNET_OUT_ROOT="), result.stderr
    assert {"equal": "is the raw root", "inside": "is inside the raw root", "containing": "contains the raw root",
            "s3-inside": "is inside the raw root"}[where] in lines[0]
    assert snapshot() == before, "something was written"


def test_a_reader_gone_from_the_output_is_exit_141_not_a_traceback(monkeypatch, capfd):
    """`imnet status | head`: the write to a pipe whose reader has gone raises BrokenPipeError (an
    OSError with an errno not a full disk's): said nothing, exit 141, as before main learnt the full
    disk's OSError (review17: that handler came first and re-raised it, a Traceback)."""
    import os

    import imnet_assets.cli as cli

    def to_a_closed_pipe(_args) -> int:
        read, write = os.pipe()
        os.close(read)
        try:
            os.write(write, b"status line\n")  # the reader is gone: EPIPE (SIGPIPE is ignored by Python)
        finally:
            os.close(write)
        return 0

    monkeypatch.setattr(cli, "cmd_status", to_a_closed_pipe)
    assert cli.main(["status"]) == 141


def test_a_second_command_in_one_process_says_nothing_of_the_first_ones_late_signal(tmp_path, capsys):
    """What "after the work" knows (orchestrate/interrupts.py: the exit code, the late signals) is one
    command's: a first command whose work was done, then stopped by a SIGTERM that had nothing left to
    stop, and a second `main()` in the same process: the second said the first's "came after the work
    was done" line again, and kept its signal handling (SIGTERM noted, not stopping it)."""
    import os
    import signal

    import imnet_assets.cli as cli
    from imnet_assets.orchestrate import interrupts

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        interrupts.work_done(0)  # the first command's work done (as Build.run says it)
        os.kill(os.getpid(), signal.SIGTERM)  # one signal after it: noted, nothing to stop
        assert "SIGTERM came after the work was done" in interrupts.said_late()
        capsys.readouterr()
        assert cli.main(["sample-raw", str(tmp_path / "raw"), "--synsets", "1", "--images", "2"]) == 0
        assert "came after the work was done" not in capsys.readouterr().err
        assert interrupts.said_late() == ""
        assert {s: signal.getsignal(s) for s in saved} == saved  # as they were before the first command's end
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        interrupts.begin()


def test_a_second_command_in_one_process_finds_the_signal_handling_the_first_one_found(tmp_path, monkeypatch):
    """`imnet verify` (as `imnet build` and `imnet demo`) stops on SIGTERM as on Ctrl-C (stop_on_signals):
    a second `main()` in the same process (here `sample-raw`) kept that, SIGTERM raising
    KeyboardInterrupt instead of ending the process as it did before the first command; only what
    work_done set was put back (begin). Each command finds the handlers the process had."""
    import signal

    import imnet_assets.cli as cli
    from imnet_assets.orchestrate import interrupts

    for name, value in {"IMNET_RAW_ROOT": str(tmp_path / "raw"), "IMNET_OUT_ROOT": str(tmp_path / "out"),
                        "IMNET_CATALOG": str(tmp_path / "catalog.duckdb")}.items():
        monkeypatch.setenv(name, value)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a process starts
        found = {s: signal.getsignal(s) for s in saved}
        assert cli.main(["verify"]) == 1  # no catalog there: it ends at once, having set its handling
        assert cli.main(["sample-raw", str(tmp_path / "raw"), "--synsets", "1", "--images", "2"]) == 0
        assert {s: signal.getsignal(s) for s in saved} == found
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        interrupts.begin()
