"""SIGTERM in the moment between the audit's record and the end of its Dagster run (SPEC "Failure
behaviour": SIGTERM stops a build as Ctrl-C does).

The audit records itself in the catalog (its seal: stages/audit.py `sealed`) inside its step; Dagster
then stores the step's materialization, its success and the run's. A SIGTERM there stops the build:
exit 130, "imnet: interrupted", and nothing that says the audit failed or that anything was lost. What
the audit wrote and recorded stands: `_info.json` is back, and the next build finds the audit fresh
and every shard fresh (no rework), exit 0.

The moment is made exactly, not raced: a real `imnet build` (cli.main in its own process) whose Dagster
instance, as it stores the audit run's event named, sends the process SIGTERM (as `docker stop`
does), once. Before it, the release is built, then its `_info.json` removed: the build redoes the
audit alone (the card's seal no longer matches), no shard."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import built_sample_release, copy_built_release, imnet

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sends signals")

# cli.main as `imnet build` runs it, its instance sending SIGTERM once it stored the audit's event `$STOP_AT`
STOPPED_BUILD = """
import os, signal, sys
from dagster import DagsterEventType, DagsterInstance

real, sent = DagsterInstance.handle_new_event, []

def handle(self, event, *args, **kwargs):
    real(self, event, *args, **kwargs)
    ev = event.dagster_event
    if (not sent and ev is not None and ev.event_type == DagsterEventType[os.environ["STOP_AT"]]
            and ev.step_key == "shard_audit"):
        sent.append(ev.event_type)
        with open(os.environ["STOP_NOTE"], "w") as note:  # (a step's output goes to its compute log)
            note.write(ev.event_type.value)
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs at once, in this (the main) thread

DagsterInstance.handle_new_event = handle
from imnet_assets.cli import main
sys.argv = ["imnet", "build"]
sys.exit(main())
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return built_sample_release(tmp_path_factory, "sigterm-audit")


@pytest.mark.parametrize("stop_at", ["ASSET_MATERIALIZATION", "STEP_SUCCESS"])
def test_sigterm_after_the_audits_record_stops_the_build_and_loses_nothing(built, tmp_path, stop_at):
    root, env = copy_built_release(built, tmp_path, IMNET_PROJECT_ROOT=str(tmp_path))
    info = root / "out" / "_info.json"
    published = info.read_bytes()
    info.unlink()  # the audit is due again, alone
    note = tmp_path / "sigterm-sent"
    stopped = subprocess.run([sys.executable, "-c", STOPPED_BUILD], env={**env, "STOP_AT": stop_at, "STOP_NOTE": str(note)},
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    said = stopped.stdout + stopped.stderr
    assert note.exists(), said
    assert "wds_shards: 3 of 3 selected shards fresh" in stopped.stdout, said  # the audit alone was redone
    assert stopped.returncode == 130 and "imnet: interrupted" in stopped.stderr, said
    assert "FAILED" not in said and "Traceback" not in said and "failed" not in said, said
    assert info.read_bytes() == published  # what the audit wrote stands

    again = imnet(["build"], env, cwd=tmp_path)
    assert "shard_audit      fresh, skipped" in again.stdout, again.stdout
    assert "wds_shards: 3 of 3 selected shards fresh" in again.stdout, again.stdout
    assert info.read_bytes() == published
