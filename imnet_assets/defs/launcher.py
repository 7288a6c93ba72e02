"""Dagster's DockerRunLauncher, refusing at launch a run whose environment would be incomplete.

`env_vars` in deploy/docker/dagster.yaml names variables (bare `NAME`) that the launcher copies
from the daemon's environment into each run container. Dagster's own launcher stops at the first
one missing with a bare message; this one names every missing variable and where they come from,
before any container is created. The run fails at launch with that message (the run's event log
and the UI show it). Configure it in place of dagster_docker's:

    run_launcher:
      module: imnet_assets.defs.launcher
      class: DockerRunLauncher
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import dagster_docker


class LauncherEnvironmentError(RuntimeError):
    """A variable the run launcher should pass on is not set in the launching process."""


def missing_env_vars(env_vars: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The bare names in `env_vars` (not NAME=value) that `environ` lacks."""
    return [v for v in env_vars if "=" not in v and v not in environ]


class DockerRunLauncher(dagster_docker.DockerRunLauncher):
    def _check_env(self, run) -> None:
        names = self.get_container_context(run).env_vars
        missing = missing_env_vars(names, os.environ)
        if missing:
            raise LauncherEnvironmentError(
                f"cannot launch run {run.run_id}: {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} named in the run launcher's env_vars "
                "(dagster.yaml, run_launcher.config.env_vars) but not set in the environment of the "
                "process that launches runs (the dagster-daemon; docker-compose passes imnet.env to "
                "it). Set them there, or drop them from env_vars, then re-execute the run."
            )

    def launch_run(self, context) -> None:
        self._check_env(context.dagster_run)
        super().launch_run(context)

    def resume_run(self, context) -> None:
        self._check_env(context.dagster_run)
        super().resume_run(context)
