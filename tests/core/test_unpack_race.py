"""Unpacking `winter21_whole.tar.gz` into a raw root that builds of other out roots (other catalogs)
share: real processes running the raw_tars stage. Two at once: one unpacks, the other waits for the
unpack's lease and finds the tars there, so both record the tars as they stay (before the lease the
second unpacked again, replacing every tar: the first's record was stale at once). A run killed
with kill -9 mid-unpack leaves no partial tar at a final path, and the next run unpacks again,
removing the killed one's partial file, to the same tars."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from imnet_assets.stages.fingerprints import stale_stages
from imnet_assets.storage.inventory import WHOLE_RELEASE, list_raw
from tests.conftest import REPO, local_settings

QUIET = lambda _m: None  # noqa: E731
TARS = 12
TAR_BYTES = 4 << 20  # incompressible: unpacking takes a while (~0.3 s)

CHILD = f"""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from tests.conftest import local_settings
from imnet_assets.stages.raw_tars import build_raw_tars
raw, folder, go = sys.argv[1:4]
settings = local_settings(Path(raw), Path(folder), IMNET_NUM_SHARDS=2)
Path(go + ".ready").touch()
while not os.path.exists(go):
    time.sleep(0.005)
facts = build_raw_tars(settings, "run-" + Path(folder).name, log=lambda m: print("LOG", m, flush=True))
print("FACTS", json.dumps({{"fingerprint": facts["fingerprint"], "tars": facts["tars"]}}), flush=True)
"""


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A real `winter21_whole.tar.gz` of TARS synset tars (random bytes: the stage reads none)."""
    path = tmp_path_factory.mktemp("whole") / WHOLE_RELEASE
    digests = {}
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        for i in range(TARS):
            name, data = f"n{i:08d}.tar", os.urandom(TAR_BYTES)
            digests[name] = hashlib.sha256(data).hexdigest()
            info = tarfile.TarInfo(f"winter21_whole/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path, digests


def raw_root(tmp_path: Path, archive) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    os.link(archive[0], raw / WHOLE_RELEASE)
    return raw


def start(raw: Path, folder: Path) -> tuple[subprocess.Popen, Path]:
    go = folder.parent / f"go-{folder.name}"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(raw), str(folder), str(go)], cwd=folder.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, go


def ready(go: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not Path(str(go) + ".ready").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def unpacking(raw: Path) -> bool:
    """Whether an unpack is under way: its mark, or a tar being written, is there."""
    return any(n.startswith(".") for n in os.listdir(raw))


def finished(proc: subprocess.Popen) -> tuple[list[str], dict]:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return [line for line in out.splitlines() if line.startswith("LOG unpacking")], \
        json.loads(out.split("FACTS ", 1)[1])


def unpacked_as_published(raw: Path, digests: dict[str, str]) -> None:
    """Every synset tar, byte for byte, and nothing else: no partial file, no mark, no lease."""
    assert sorted(os.listdir(raw)) == sorted([*digests, WHOLE_RELEASE])
    assert {n: hashlib.sha256((raw / n).read_bytes()).hexdigest() for n in digests} == digests


def test_two_builds_sharing_a_raw_root_unpack_it_once_and_record_the_tars_as_they_stay(tmp_path, archive):
    raw = raw_root(tmp_path, archive)
    (a, go_a), (b, go_b) = start(raw, tmp_path / "a"), start(raw, tmp_path / "b")
    ready(go_a, a)
    ready(go_b, b)
    go_a.touch()
    deadline = time.monotonic() + 60
    while not unpacking(raw):  # the second build starts while the first unpacks
        assert a.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    go_b.touch()
    (said_a, facts_a), (said_b, facts_b) = finished(a), finished(b)
    assert len(said_a) == 1 and said_b == []  # one unpack
    unpacked_as_published(raw, archive[1])
    now = list_raw(str(raw), log=QUIET).tars_fingerprint
    assert facts_a == facts_b == {"fingerprint": now, "tars": TARS}
    for folder in ("a", "b"):  # each build's record is of the tars as they are
        assert "raw_tars" not in stale_stages(local_settings(raw, tmp_path / folder, IMNET_NUM_SHARDS=2), log=QUIET)


def test_a_kill_mid_unpack_leaves_no_partial_tar_and_the_next_run_unpacks_the_same(tmp_path, archive):
    raw = raw_root(tmp_path, archive)
    a, go_a = start(raw, tmp_path / "a")
    ready(go_a, a)
    go_a.touch()
    deadline = time.monotonic() + 60
    while True:  # killed with three tars committed and the fourth being written
        names = os.listdir(raw)
        if sum(n.endswith(".tar") and not n.startswith(".") for n in names) >= 3 and \
                any(".tar.tmp-" in n for n in names):
            break
        assert a.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    there = sorted(n for n in os.listdir(raw) if n.endswith(".tar") and not n.startswith("."))
    assert 3 <= len(there) < TARS, there
    for n in there:  # what is at a final path is whole
        assert hashlib.sha256((raw / n).read_bytes()).hexdigest() == archive[1][n]
    partial = [n for n in os.listdir(raw) if ".tar.tmp-" in n]
    assert partial  # the tar it was writing, beside its final path

    b, go_b = start(raw, tmp_path / "b")
    go_b.touch()
    said, facts = finished(b)
    assert len(said) == 1 and "again" in said[0]
    unpacked_as_published(raw, archive[1])  # the killed run's partial tar removed
    assert facts == {"fingerprint": list_raw(str(raw), log=QUIET).tars_fingerprint, "tars": TARS}
