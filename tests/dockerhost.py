"""A real Docker engine for tests: Debian's docker.io, a dockerd of the test's own, an offline base image.

- `ensure_tools()` installs Debian's `docker.io` and `debootstrap` with apt-get when they are
  missing (root, or sudo); without apt-get it fails with what to install. It never skips.
- `Dockerd` uses an engine that already answers (DOCKER_HOST, else /var/run/docker.sock), or starts
  one as root: data-root (on a tmpfs where mounting one works), exec-root, pidfile and unix socket
  in a folder of its own under /tmp, no iptables, no bridge (containers use the host's network).
  `stop()` removes what it started.
- `base_image()` makes a Debian bookworm image with python3 and python3-venv, offline for Docker:
  `debootstrap` from the mirror apt on this machine uses, `tar | docker import`. The rootfs
  tarball is cached under ~/.cache/imnet-docker (or $XDG_CACHE_HOME/imnet-docker), so an engine
  with an empty data-root imports it in seconds.
- `build_context()` runs deploy/docker/make-context.sh into the cache (the wheelhouse is rebuilt
  only when pyproject.toml changes).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imnet-docker"
DOCKER = "/usr/bin/docker"  # Debian's docker.io client; /usr/local/bin/docker may be something else
DOCKERD = "/usr/sbin/dockerd"
DEBOOTSTRAP = "/usr/sbin/debootstrap"
SUITE = "bookworm"
BASE_TAG = f"imnet-debian-base:{SUITE}"
TMPFS_SIZE = "8g"  # a cap, not a reservation: the test's engine holds about 2 GB
# python3 + venv for the image's virtual environment, passwd for its user, ca-certificates for HTTPS
# to S3 at run time (the python:3.11-slim-bookworm default has all four).
BASE_PACKAGES = ["python3", "python3-venv", "passwd", "ca-certificates"]


def _sudo() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo"):
        return ["sudo", "-n"]
    pytest.fail("the docker test needs root (or passwordless sudo): it installs docker.io and starts dockerd")


def ensure_tools() -> None:
    """Debian's docker.io (dockerd, containerd, runc, the docker client) and debootstrap."""
    missing = [p for p, path in (("docker.io", DOCKERD), ("docker.io", DOCKER), ("debootstrap", DEBOOTSTRAP))
               if not Path(path).exists()]
    if not missing:
        return
    if not shutil.which("apt-get"):
        pytest.fail(f"{', '.join(sorted(set(missing)))} missing ({DOCKERD}, {DOCKER}, {DEBOOTSTRAP}) and no apt-get to install them")
    sudo = _sudo()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker.io", "debootstrap"]):
        proc = subprocess.run([*sudo, *cmd], env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    still = [p for p in (DOCKERD, DOCKER, DEBOOTSTRAP) if not Path(p).exists()]
    if still:
        pytest.fail(f"apt-get installed docker.io and debootstrap but {still} are still missing")


class Dockerd:
    """A Docker engine to talk to: `docker(*args)` runs the client against it, `env` points others at it."""

    def __init__(self) -> None:
        self.host = ""
        self.proc: subprocess.Popen | None = None
        self.folder: Path | None = None
        self.log_path: Path | None = None

    @property
    def owned(self) -> bool:
        """Whether this object started the engine (and `stop()` removes it with all it holds)."""
        return self.proc is not None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def docker(self, *args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run([DOCKER, *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)[:300]} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}{self.log_tail()}")
        return proc

    def answers(self, host: str) -> bool:
        try:
            proc = subprocess.run([DOCKER, "version", "--format", "{{.Server.Version}}"],
                                  env={**os.environ, "DOCKER_HOST": host}, capture_output=True, text=True, timeout=15)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0 and bool(proc.stdout.strip())

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n--- dockerd log (tail) ---\n" + self.log_path.read_text(errors="replace")[-chars:]

    def start(self) -> Dockerd:
        for host in filter(None, (os.environ.get("DOCKER_HOST"), "unix:///var/run/docker.sock")):
            if self.answers(host):
                self.host = host
                return self
        sudo = _sudo()
        # A short path: a unix socket's path is limited to about 100 bytes.
        self.folder = Path(tempfile.mkdtemp(prefix="imnet-dockerd-", dir="/tmp"))
        self.host = f"unix://{self.folder}/docker.sock"
        self.log_path = self.folder / "dockerd.log"
        # The data-root on a tmpfs where the kernel allows: image layers are ~1.5 GB in many small
        # files (a Python venv), which a shared disk writes and deletes slowly; a tmpfs goes with
        # one umount. Elsewhere the folder's own disk.
        (self.folder / "data").mkdir()
        subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0710", "tmpfs",
                        str(self.folder / "data")], capture_output=True)
        argv = [*sudo, DOCKERD, "--iptables=false", "--ip6tables=false", "--bridge=none",
                f"--data-root={self.folder}/data", f"--exec-root={self.folder}/exec",
                f"--pidfile={self.folder}/dockerd.pid", "-H", self.host]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while not self.answers(self.host):
            if self.proc.poll() is not None:
                pytest.fail(f"dockerd exited {self.proc.returncode} at start: {' '.join(argv)}{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"dockerd did not answer on {self.host} within 90 s{self.log_tail()}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        """Stop the engine this object started (its containerd too) and delete its folder."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        if self.folder is not None:
            # Anything dockerd left mounted under its folder (overlay layers, shm, netns) first.
            with open("/proc/self/mounts") as f:
                points = [line.split()[1] for line in f]
            for point in sorted((p for p in points if p.startswith(f"{self.folder}/")), key=len, reverse=True):
                subprocess.run(["umount", "-l", point], capture_output=True)
            stopped = time.monotonic()
            shutil.rmtree(self.folder, ignore_errors=True)
            print(f"dockerd's folder {self.folder} removed in {time.monotonic() - stopped:.0f} s")
            self.folder = None


def apt_mirror() -> str:
    """The Debian archive apt on this machine uses for `bookworm main` (deb822 or one-line sources)."""
    texts = []
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.sources")),
                 *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            texts.append(Path(path).read_text())
        except OSError:
            continue
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):  # deb822 stanzas
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, flags=re.MULTILINE))
            if SUITE in fields.get("Suites", "").split() and "main" in fields.get("Components", "").split() \
                    and "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                return fields["URIs"].split()[0]
        for line in text.splitlines():  # deb [opts] URI SUITE COMPONENTS
            m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line.strip())
            if m and m.group(2) == SUITE and "main" in m.group(3).split():
                return m.group(1)
    return "http://deb.debian.org/debian"


def base_rootfs_tarball() -> Path:
    """A cached tar of a debootstrapped Debian bookworm: minbase + BASE_PACKAGES."""
    tarball = CACHE / f"debian-{SUITE}-{'-'.join(BASE_PACKAGES)}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
    try:
        rootfs = work / "rootfs"
        cmd = [*_sudo(), DEBOOTSTRAP, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
               SUITE, str(rootfs), apt_mirror()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            log = rootfs / "debootstrap" / "debootstrap.log"
            detail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n{detail}")
        for leftover in glob.glob(str(rootfs / "var/cache/apt/archives/*.deb")) + glob.glob(str(rootfs / "var/lib/apt/lists/*_*")):
            os.unlink(leftover)
        partial = work / "rootfs.tar"
        subprocess.run([*_sudo(), "tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."],
                       check=True, capture_output=True, timeout=600)
        os.replace(partial, tarball)  # complete or absent: a killed run leaves no half tarball
    finally:
        subprocess.run([*_sudo(), "rm", "-rf", str(work)], capture_output=True)
    return tarball


def base_image(engine: Dockerd) -> str:
    """BASE_TAG in the engine: kept if present, else imported from the cached rootfs tarball."""
    if engine.docker("image", "inspect", BASE_TAG, check=False).returncode == 0:
        return BASE_TAG
    tarball = base_rootfs_tarball()
    with open(tarball, "rb") as f:
        engine.docker("import", "-", BASE_TAG, stdin=f, timeout=600)
    return BASE_TAG


def build_context() -> Path:
    """deploy/docker/make-context.sh into the cache: the sources, and the wheelhouse when pyproject.toml changed."""
    context = CACHE / "context"
    proc = subprocess.run(["bash", str(REPO / "deploy" / "docker" / "make-context.sh"), str(context)],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"deploy/docker/make-context.sh exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return context


def inspect(engine: Dockerd, *ids: str) -> list[dict]:
    return json.loads(engine.docker("inspect", *ids).stdout)
