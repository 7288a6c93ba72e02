#!/usr/bin/env bash
# Makes the Docker build context for deploy/docker/Dockerfile in DIR: the project's sources and a
# wheelhouse of every dependency, made here with pip (which reaches the package index), so that
# `docker build DIR` needs no network at all:
#
#   deploy/docker/make-context.sh /tmp/imnet-context
#   docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm -t imnet-assets:0.1.0 /tmp/imnet-context
#
# The wheels must fit the image: the same Python minor version (3.11) and a glibc no newer than the
# image's (Debian bookworm: 2.36). Run it with that Python (PYTHON=/path/to/python3.11 to choose);
# manylinux wheels from the index fit any such image. The wheelhouse is kept and reused while
# pyproject.toml and this script are unchanged; the sources are copied afresh every time.
set -euo pipefail

dir=${1:?usage: make-context.sh DIR}
repo=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-python3}

# What the image installs besides the project: the Postgres storage, the launchers' libraries, and
# setuptools for the project's own (editable) install, all from the wheelhouse.
extras=(".[postgres]" "dagster-docker==0.29.27" "dagster-k8s==0.29.27" "setuptools>=68" "wheel")

mkdir -p "$dir"
py_tag=$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
# Debian bookworm's python3, and python:3.11-slim-bookworm's, are 3.11: wheels for another
# version would not install there (the build would fail offline, far from the cause).
if [ "$py_tag" != "${IMAGE_PY_TAG:-cp311}" ]; then
    echo "error: $python is $py_tag; the image's Python is ${IMAGE_PY_TAG:-cp311}: set PYTHON to a Python 3.11" >&2
    exit 1
fi
stamp=$(cat "$repo/pyproject.toml" "$0" | sha256sum | cut -c1-16)-$py_tag
if [ "$(cat "$dir/wheels/.complete" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$dir/wheels" "$dir/wheels.partial"
    (cd "$repo" && "$python" -m pip wheel -q --wheel-dir "$dir/wheels.partial" "${extras[@]}")
    rm -f "$dir"/wheels.partial/imnet_assets-*.whl    # the project itself is installed from its sources
    echo "$stamp" > "$dir/wheels.partial/.complete"
    mv "$dir/wheels.partial" "$dir/wheels"
fi

rm -rf "$dir/src"
mkdir -p "$dir/src/deploy"
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/imnet_assets" "$repo/sql" "$dir/src/"
cp "$repo/deploy/dagster.yaml" "$dir/src/deploy/"
find "$dir/src" -name __pycache__ -prune -exec rm -rf {} +
cp "$repo/deploy/docker/Dockerfile" "$dir/Dockerfile"
echo "build context ready: $dir ($(ls "$dir/wheels" | wc -l) wheels)"
