"""How `imnet build` tells a stop (Ctrl-C, SIGTERM) inside a Dagster run from a failure: by what
Dagster 1.13 records of it (orchestrate/interrupts.INTERRUPTS). A stop says "imnet: interrupted",
exit 130; a failure "<stage> FAILED", exit 1. Build.materialize on a real instance, with an asset
stopped at the two places the kill sweep (tests/integration/test_kill_sweep.py) stopped one."""

from __future__ import annotations

import os
import signal

import pytest
from dagster import ConfigurableResource, DagsterInstance, asset, with_resources

from imnet_assets.orchestrate.build import Build


class StoppedWhileMade(ConfigurableResource):
    """A resource whose setup is stopped by Ctrl-C (as a stage's IO manager was, by SIGTERM)."""

    def setup_for_execution(self, context) -> None:
        os.kill(os.getpid(), signal.SIGINT)


@asset
def stopped_in_its_op():
    raise KeyboardInterrupt  # what a catalog query stopped by SIGTERM raises (storage/catalog.py)


@asset
def stopped_before_its_op(stopper: StoppedWhileMade):
    return 1


@asset
def failing():
    raise ValueError("bad bytes")


def materializer(instance, assets) -> Build:
    """Build.materialize's state alone (no catalog, no out root)."""
    build = object.__new__(Build)
    build.assets, build.instance, build.log_level = assets, instance, "CRITICAL"
    build.releases = build.selected = []
    return build


@pytest.fixture
def instance(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with DagsterInstance.from_config(str(home)) as inst:
        yield inst


def test_a_keyboard_interrupt_in_an_op_is_a_stop(instance):
    """Dagster records it as a step failure of class KeyboardInterrupt. Found by the kill sweep:
    SIGTERM while a catalog query ran said "raw_tars FAILED ... KeyboardInterrupt", exit 1."""
    with pytest.raises(KeyboardInterrupt):
        materializer(instance, [stopped_in_its_op]).materialize(["stopped_in_its_op"])


def test_ctrl_c_while_dagster_sets_up_the_run_is_a_stop(instance):
    """Outside any step: Dagster records no step failure, only the run's failure
    (DagsterExecutionInterruptedError). Found by the hand-run SIGTERM sweep (1.8 s and 2.9 s into a
    build): "filtered_index FAILED / run ... failed", exit 1."""
    assets = with_resources([stopped_before_its_op], {"stopper": StoppedWhileMade()})
    with pytest.raises(KeyboardInterrupt):
        materializer(instance, assets).materialize(["stopped_before_its_op"])


def test_a_failure_is_still_a_failure(instance):
    result, failures = materializer(instance, [failing]).materialize(["failing"])
    assert not result.success
    assert len(failures) == 1 and "bad bytes" in failures[0], failures


@asset
def done_in_its_op():
    return 1


def test_a_stop_while_dagster_records_the_runs_success_is_a_stop(instance, monkeypatch):
    """After the last step, while Dagster records the run's success, its handler only notes a signal,
    and forgets it as the run ends: the build went on to its next stage (or, after the audit, exited
    0 as if never told to stop). Found by review17 (dagster_quirks.materialize_keeping_interrupts)."""
    from dagster import DagsterEventType

    real = instance.handle_new_event

    def handle(event, *args, **kwargs):  # the real write, then SIGTERM, as if it came during it
        real(event, *args, **kwargs)
        if event.dagster_event is not None and event.dagster_event.event_type == DagsterEventType.RUN_SUCCESS:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(instance, "handle_new_event", handle)
    saved = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop_on_signals' SIGTERM
    try:
        with pytest.raises(KeyboardInterrupt):
            materializer(instance, [done_in_its_op]).materialize(["done_in_its_op"])
    finally:
        signal.signal(signal.SIGTERM, saved)
