"""What one Dagster run of `imnet build` ended with, read from its result: the failures to name (a
stop signal inside the run is no failure: KeyboardInterrupt, as outside it), a stage's metadata,
and the facts a stage's line shows."""

from __future__ import annotations

from imnet_assets.orchestrate.interrupts import INTERRUPTS

# Counts a stage reports as 0 until a later stage has counted them: raw_tars' members and the
# synset manifest's images come from filtered_index's walk of the tars' headers.
NOT_COUNTED_YET = {"raw_tars": "members", "synset_manifest": "images"}


def failures_of(result) -> list[str]:
    """One line per failed step or check of the run `result` ([] when it succeeded). Raises
    KeyboardInterrupt when the run was stopped (Ctrl-C or SIGTERM inside it): say so, not "FAILED"
    (cli.main)."""
    failures = []
    for ev in result.get_step_failure_events():
        err = ev.step_failure_data.error
        if err is not None and err.cls_name in INTERRUPTS:
            raise KeyboardInterrupt
        while err is not None and err.cause is not None:
            err = err.cause  # the user code's own error, not Dagster's wrapper
        failures.append(f"{ev.step_key} failed: {err.message.strip() if err else 'unknown error'}")
    for ev in result.get_asset_check_evaluations():
        if not ev.passed:
            failures.append(f"check {ev.asset_key.to_user_string()}:{ev.check_name} failed: {ev.description}")
    if not result.success and not failures:
        # stopped outside any step (while Dagster set up the run's resources, a stage's IO
        # manager): the run's own failure names the interrupt
        for ev in result.filter_events(lambda ev: ev.is_run_failure):
            err = ev.event_specific_data.error if ev.event_specific_data is not None else None
            if err is not None and err.cls_name in INTERRUPTS:
                raise KeyboardInterrupt
        failures.append(f"run {result.run_id} failed")
    return failures


def metadata(result, asset: str) -> dict:
    """The metadata of `asset`'s materialization in the run `result` ({} when it made none)."""
    for ev in result.get_asset_materialization_events():
        mat = ev.event_specific_data.materialization
        if mat.asset_key.to_user_string() == asset:
            return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    return {}


def facts(result, asset: str) -> str:
    """The first six numbers of `asset`'s metadata, as `name=value, ...`."""
    md = metadata(result, asset)
    shown = {k: v for k, v in md.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and not (v == 0 and NOT_COUNTED_YET.get(asset) == k)}
    return ", ".join(f"{k}={v}" for k, v in list(shown.items())[:6])
