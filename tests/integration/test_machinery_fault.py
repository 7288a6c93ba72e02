"""A programming error in the chain, in every process of a real `imnet build` (the command, its
forkserver and its encode workers: a `sitecustomize` on PYTHONPATH breaks the code before it is
imported), is a machinery fault (image/guard.py), never an exclusion: the index stage fails on a
broken probe, the shard runs fail on a broken encoder, each naming the fault; nothing is recorded
for the images, no shard is committed; a codec that crashes its process on every image
(IMNET_TEST_CRASH_SHA256=*) fails the shard runs too, excluding nothing; the build after the fix
builds every image, and the
sample release's corrupt images are excluded with their own reasons as always."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb

from imnet_assets.sample.sample_raw import write_sample_raw
from tests.conftest import build_env, dagster_home, imnet

SITECUSTOMIZE = '''
import os

_fault = os.environ.get("GUARD_TEST_FAULT")


def _broken(*_args, **_kw):
    raise AttributeError("'memoryview' object has no attribute 'startswith'")


if _fault == "encode":  # every image's metadata step (image/encode.py imports it from here)
    from imnet_assets.image import exif

    exif.filter_exif = _broken
elif _fault == "probe":  # the limits every probe applies (image/probe.py imports it from here)
    from imnet_assets.image import decode

    decode.plan_decode = _broken
'''


def catalog_reasons(tmp: Path) -> tuple[int, list[str]]:
    with duckdb.connect(str(tmp / "catalog.duckdb"), read_only=True) as con:
        tables = {t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "images" not in tables:
            return 0, []
        count = con.execute("SELECT count(*) FROM images").fetchone()[0]
        reasons = [r for (r,) in con.execute("SELECT reason FROM images WHERE reason IS NOT NULL").fetchall()]
    return count, reasons


def test_a_broken_chain_fails_the_build_and_the_build_after_the_fix_builds_every_image(tmp_path):
    raw = tmp_path / "raw"
    summary = write_sample_raw(raw, synsets=2, images=20, seed=0)
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = build_env(tmp_path, raw, DAGSTER_HOME=str(dagster_home(tmp_path)))
    out = tmp_path / "out"

    probe = imnet(["build"], {**env, "PYTHONPATH": str(faults), "GUARD_TEST_FAULT": "probe"}, check=False)
    said = probe.stdout + probe.stderr
    assert probe.returncode != 0, said
    assert "filtered_index failed: " in said and "machinery fault: probing the header failed with AttributeError" in said
    assert "nothing was recorded as excluded" in said
    assert catalog_reasons(tmp_path) == (0, [])  # not one image recorded, excluded or not

    encode = imnet(["build"], {**env, "PYTHONPATH": str(faults), "GUARD_TEST_FAULT": "encode"}, check=False)
    said = encode.stdout + encode.stderr
    assert encode.returncode != 0, said
    assert "machinery fault: encoding (quality 90, method 4, max_short 768) failed with AttributeError" in said, said
    assert "known-good JPEG RGB 2069x1552 control image" in said and "(met on " in said
    count, reasons = catalog_reasons(tmp_path)
    assert count == summary.total_members  # the index is built, and holds no fault
    assert not [r for r in reasons if "AttributeError" in r or "machinery" in r]
    assert not list(out.glob("*.tar"))  # no shard committed
    assert not (out / "_manifests").exists() or not list((out / "_manifests").glob("*.json"))

    # A codec that crashes its process on every input (IMNET_TEST_CRASH_SHA256=*: every encode in a
    # pool worker segfaults, the control's too): the shard run fails, nothing is excluded.
    crash = imnet(["build"], {**env, "IMNET_TEST_CRASH_SHA256": "*"}, check=False)
    said = crash.stdout + crash.stderr
    assert crash.returncode != 0, said
    assert "machinery fault: the encoder's process died 2 times (signal 11 (SIGSEGV), signal 11 (SIGSEGV))" in said
    assert "control image made in memory crashed the encoder's process the same way (signal 11 (SIGSEGV))" in said
    assert not list(out.glob("*.tar"))
    assert not (out / "_manifests").exists() or not list((out / "_manifests").glob("*.json"))

    imnet(["build"], env)  # the fix: the same build, unbroken
    manifests = [json.loads(p.read_text()) for p in (out / "_manifests").glob("*.json") if ".state." not in p.name]
    assert len(manifests) == 4
    excluded = [e["reason"] for m in manifests for e in m["excluded"]]
    assert not [r for r in excluded if "AttributeError" in r]
    assert sum(m["num_samples"] + len(m["excluded"]) for m in manifests) == sum(m["planned"] for m in manifests)
    with duckdb.connect(str(tmp_path / "catalog.duckdb"), read_only=True) as con:
        rows = dict(con.execute("SELECT member, reason FROM images WHERE status = 'excluded'").fetchall())
    for member in summary.quirks["undecodable"] + summary.quirks["empty"]:  # corrupt images: their own reasons
        assert rows[member] and "AttributeError" not in rows[member] and "machinery" not in rows[member], member
