"""Shared fixtures: a generated raw release, isolated settings, and running `imnet` for real."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from imnet_assets.sample.sample_raw import write_sample_raw
from imnet_assets.settings import Settings

REPO = Path(__file__).resolve().parent.parent

# `imnet` and Settings.from_env() read the `.env` of the project root and resolve relative paths
# against it; the repository's own `.env` (after `imnet demo`) must not reach the tests: they get an
# empty project root of their own (build_env gives each test's commands its tmp_path instead).
os.environ["IMNET_PROJECT_ROOT"] = tempfile.mkdtemp(prefix="imnet-tests-project-")


@pytest.fixture(scope="session")
def sample_release(tmp_path_factory) -> tuple[Path, object]:
    """The default sample release (6 synsets x 40 images, every quirk), generated once."""
    root = tmp_path_factory.mktemp("raw")
    summary = write_sample_raw(root, synsets=6, images=40, seed=0)
    return root, summary


@pytest.fixture
def raw_copy(sample_release, tmp_path) -> Path:
    """A private copy of the sample release, for tests that change the raw input."""
    dst = tmp_path / "raw"
    shutil.copytree(sample_release[0], dst)
    return dst


def build_env(tmp_path: Path, raw: Path | str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMNET_", "DAGSTER_HOME"))}
    env.update(
        # the project root: no .env, and `imnet`'s default instance (data/dagster_home) in tmp_path
        IMNET_PROJECT_ROOT=str(tmp_path),
        IMNET_RAW_ROOT=str(raw),
        IMNET_OUT_ROOT=str(tmp_path / "out"),
        IMNET_CATALOG=str(tmp_path / "catalog.duckdb"),
        IMNET_NUM_SHARDS="4",
        IMNET_WORKERS="2",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def built_sample_release(tmp_path_factory, name: str) -> tuple[Path, dict[str, str]]:
    """A 3-synset sample release built into 3 shards by a real `imnet build` (folder, its env): the
    damage tests' module fixture, copied per case with copy_built_release."""
    tmp = tmp_path_factory.mktemp(name)
    imnet(["sample-raw", str(tmp / "raw"), "--synsets", "3", "--images", "12"], os.environ.copy())
    env = build_env(tmp, tmp / "raw", IMNET_NUM_SHARDS="3")
    imnet(["build"], env, cwd=tmp)
    return tmp, env


def copy_built_release(release: tuple[Path, dict[str, str]], into: Path, **env: str) -> tuple[Path, dict[str, str]]:
    """A private copy of a built_sample_release (out root, raw root, catalog; copytree keeps mtimes:
    the shards stay fresh) and its env pointed at the copy."""
    tmp, built_env = release
    for name in ("out", "raw"):
        shutil.copytree(tmp / name, into / name)
    shutil.copy2(tmp / "catalog.duckdb", into / "catalog.duckdb")
    return into, {**built_env, "IMNET_OUT_ROOT": str(into / "out"), "IMNET_CATALOG": str(into / "catalog.duckdb"),
                  "IMNET_RAW_ROOT": str(into / "raw"), **env}


def shard_verdict(out_root, key: str, name: str, expected_fingerprint: str | None) -> str:
    """One shard's "fresh", "missing" or "stale", judged as `imnet build`, `imnet status` and the
    schedule judge it (freshness.shard_states)."""
    from imnet_assets.release.freshness import shard_states

    expected = {key: expected_fingerprint} if expected_fingerprint is not None else {}
    return shard_states(str(out_root), [key], [name], expected)[key]


def settings_of(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


def local_settings(raw: Path | str, folder: Path | str, **env) -> Settings:
    """Settings for core-level tests: out root and catalog under `folder`, one encode worker;
    `env` adds or overrides IMNET_* variables."""
    values = {
        "IMNET_RAW_ROOT": str(raw),
        "IMNET_OUT_ROOT": str(Path(folder) / "out"),
        "IMNET_CATALOG": str(Path(folder) / "catalog.duckdb"),
        "IMNET_WORKERS": "1",
    }
    values.update({k: str(v) for k, v in env.items()})
    return Settings.from_env(values)


def build_catalog_stages(settings: Settings) -> dict:
    """raw_tars, synset_manifest, filtered_index and shuffled_plan, without Dagster; the plan's facts."""
    from imnet_assets.stages.filtered_index import build_filtered_index
    from imnet_assets.stages.raw_tars import build_raw_tars
    from imnet_assets.stages.shuffled_plan import build_shuffled_plan
    from imnet_assets.stages.synset_manifest import build_synset_manifest

    def quiet(_msg: str) -> None:
        pass

    build_raw_tars(settings, "run-raw", log=quiet)
    build_synset_manifest(settings, "run-syn", log=quiet)
    build_filtered_index(settings, "run-idx", log=quiet)
    return build_shuffled_plan(settings, "run-plan", log=quiet)


def imnet(args: list[str], env: dict[str, str], cwd: Path | None = None, check: bool = True,
          timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the installed `imnet` command in a subprocess, as a user would."""
    exe = shutil.which("imnet", path=os.path.dirname(sys.executable)) or "imnet"
    proc = subprocess.run([exe, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"imnet {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def dagster_home(tmp_path: Path) -> Path:
    """A DAGSTER_HOME holding the project's own dagster.yaml."""
    home = tmp_path / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    return home


@contextlib.contextmanager
def environ(**values: str):
    """Set these variables of this process for a while, then put back what was there (a
    DAGSTER_HOME for DagsterInstance.get(); an AWS_ENDPOINT_URL pointing fs at a proxy: fs keeps
    one client per endpoint)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def dead_pid() -> int:
    """The number of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def other_pid_namespace() -> tuple[subprocess.Popen, str]:
    """A live process in a pid namespace of its own (as a container's), and that namespace's name.
    Stop it with kill() and wait()."""
    for cmd in (["unshare", "--pid", "--fork", "sleep", "120"],
                ["unshare", "--user", "--map-root-user", "--pid", "--fork", "sleep", "120"]):
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline and proc.poll() is None:
            try:
                children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                if children:
                    return proc, os.readlink(f"/proc/{children[0]}/ns/pid")
            except OSError:
                pass
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    raise RuntimeError("unshare cannot make a pid namespace on this machine")


# The quick subset (`pytest -m quick tests`, about 2 minutes on 2 cores): the plain modules' tests,
# the settings and the catalog, with no `imnet build` in a subprocess, no S3 server behind faults,
# no Dagster webserver, Docker or PostgreSQL. The whole suite (about 21 minutes on 2 cores) is what
# CI runs. A module listed here that grows slow belongs out of the list, not in it.
QUICK_MODULES = {
    "tests/test_settings.py", "tests/test_project_settings.py", "tests/test_catalog.py", "tests/test_deploy.py",
    "tests/test_dagster_quirks.py", "tests/test_layout.py",
    "tests/core/test_audit.py", "tests/core/test_byte_accounting.py", "tests/core/test_card.py",
    "tests/core/test_changed_sources.py", "tests/core/test_commit_record.py", "tests/core/test_encode.py",
    "tests/core/test_encode_exclusions.py", "tests/core/test_features.py", "tests/core/test_index.py",
    "tests/core/test_inventory.py", "tests/core/test_plan.py", "tests/core/test_prefetch.py",
    "tests/core/test_probe.py", "tests/core/test_probe_fast.py", "tests/core/test_procpool.py",
    "tests/core/test_rawfolders.py", "tests/core/test_rawtar.py", "tests/core/test_rawtar_fast.py",
    "tests/core/test_sample_raw.py", "tests/core/test_shard.py", "tests/core/test_shard_workers.py",
    "tests/core/test_verify.py",
    "tests/core/test_jpeg_codec.py", "tests/core/test_synset_lists.py",  # issue 25
    "tests/core/test_guard.py", "tests/core/test_guard_runs.py", "tests/core/test_crash_control.py",  # the guard
    "tests/core/test_guard_formats.py", "tests/core/test_guard_repair.py",  # its controls; the repair path
    "tests/core/test_scan_faults.py",  # the index's scan in the worker pool
    "tests/core/test_one_worker.py", "tests/core/test_verify_runs.py",  # IMNET_WORKERS=1; verify's dead workers
    "tests/core/test_deaths.py",  # runtime/deaths.py's counting, no processes
    "tests/test_build_interrupts.py",  # a stop inside a Dagster run told from a failure
}


def pytest_collection_modifyitems(config, items):
    root = Path(__file__).resolve().parent.parent
    for item in items:
        try:
            module = Path(item.fspath).resolve().relative_to(root).as_posix()
        except ValueError:
            continue
        if module in QUICK_MODULES:
            item.add_marker(pytest.mark.quick)
