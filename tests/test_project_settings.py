"""The project root's `.env`: read by `imnet` and Settings.from_env() under the environment,
relative paths resolved against the project root from any folder, and a mistyped IMNET_* name
refused naming the closest known one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from imnet_assets.settings import VARIABLES, Settings, SettingsError, project_root

from .conftest import REPO, imnet


def make_project(folder: Path, dotenv: str | None = None) -> Path:
    """A project folder as a clone has one: its pyproject.toml marks the root."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "pyproject.toml", folder / "pyproject.toml")
    if dotenv is not None:
        (folder / ".env").write_text(dotenv)
    return folder


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any IMNET_* variable or DAGSTER_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMNET_", "DAGSTER_HOME"))}
    env.update(extra)
    return env


@pytest.fixture
def in_project(tmp_path, monkeypatch):
    """A project with a .env; this process inside a subfolder of it, with no IMNET_* variable."""
    root = make_project(tmp_path / "proj", "# mine\nIMNET_SEED=5\nIMNET_NUM_SHARDS=3\nIMNET_OUT_ROOT=built/out\n")
    for name in [n for n in os.environ if n.startswith("IMNET_")]:
        monkeypatch.delenv(name)
    (root / "sub" / "dir").mkdir(parents=True)
    monkeypatch.chdir(root / "sub" / "dir")
    return root


def test_env_file_is_read_and_the_environment_wins(in_project, monkeypatch):
    assert project_root() == in_project.resolve()
    s = Settings.from_env()
    assert (s.seed, s.num_shards) == (5, 3)
    monkeypatch.setenv("IMNET_NUM_SHARDS", "7")
    s = Settings.from_env()
    assert (s.seed, s.num_shards) == (5, 7)


def test_relative_paths_resolve_against_the_project_root_from_a_subfolder(in_project):
    s = Settings.from_env()
    root = in_project.resolve()
    assert s.out_root == str(root / "built" / "out")  # from .env
    assert s.raw_root == str(root / "data" / "raw") and s.catalog == str(root / "data" / "catalog.duckdb")


def test_imnet_status_from_another_folder_reads_the_projects_env_and_prints_its_roots(tmp_path):
    root = make_project(tmp_path / "proj", "IMNET_NUM_SHARDS=3\nIMNET_CATALOG=cat/c.duckdb\n").resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = imnet(["status"], clean_env(IMNET_PROJECT_ROOT=str(root)), cwd=elsewhere).stdout
    assert f"project root     {root}  (settings from .env there and the environment)" in out
    assert f"  raw root       {root / 'data' / 'raw'}\n" in out
    assert f"  out root       {root / 'data' / 'out'}\n" in out
    assert f"  catalog        {root / 'cat' / 'c.duckdb'}\n" in out
    assert f"  DAGSTER_HOME   {root / 'data' / 'dagster_home'}" in out
    assert "wds_shards       3 missing" in out and "shard_audit      not built yet" in out  # nothing built anywhere
    assert "catalog stages   not built yet: " in out and "`imnet build` makes them" in out
    # found from a subfolder too, by the pyproject.toml above it
    (root / "a" / "b").mkdir(parents=True)
    assert f"  raw root       {root / 'data' / 'raw'}\n" in imnet(["status"], clean_env(), cwd=root / "a" / "b").stdout
    assert not (elsewhere / "data").exists() and not (root / "a" / "b" / "data").exists()


@pytest.mark.parametrize("where", ["environment", ".env"])
def test_a_mistyped_variable_is_an_error_naming_the_closest_known_one(tmp_path, where):
    root = make_project(tmp_path / "proj", "IMNET_NUM_SHARD=8\n" if where == ".env" else "")
    extra = {"IMNET_NUM_SHARD": "8"} if where == "environment" else {}
    proc = imnet(["status"], clean_env(IMNET_PROJECT_ROOT=str(root), **extra), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "IMNET_NUM_SHARD " in lines[0] and "did you mean IMNET_NUM_SHARDS?" in lines[0]
    assert (str(root / ".env") if where == ".env" else "the environment") in lines[0]
    assert proc.stdout == ""


def test_every_variable_the_code_reads_is_declared():
    """The declared list is the one place: every IMNET_* name in the package's source is in it."""
    import re

    names = set()
    for path in (REPO / "imnet_assets").rglob("*.py"):
        names |= set(re.findall(r"\bIMNET_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert names - set(VARIABLES) == set()
    with pytest.raises(SettingsError, match="IMNET_WORKER .*did you mean IMNET_WORKERS"):
        Settings.from_env({"IMNET_WORKER": "2"})


def test_from_a_folder_outside_any_project_the_root_is_the_packages_project(tmp_path, monkeypatch):
    """As in a code server that `dagster dev -w /path/workspace.yaml` started from another folder:
    no pyproject.toml above the current folder, so the project is the one holding this package
    (an editable install: the repository)."""
    monkeypatch.delenv("IMNET_PROJECT_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert project_root() == REPO
    assert Settings.from_env({}).raw_root == str(REPO / "data" / "raw")
