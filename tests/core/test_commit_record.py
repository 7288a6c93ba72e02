"""The commit record (`<key>.state.json`) vouches only for the bytes the shard check read: its
stamp is the tar's size and stamp read at the commit, before the check, and read again once the
check passed; a tar changed in between gets no record, and the run fails naming the shard."""

from __future__ import annotations

import os

import pytest

from imnet_assets.release.outroot import state_url
from imnet_assets.release.plan import write_slice
from imnet_assets.stages.shard import ShardChangedDuringCheck, build_shard
from imnet_assets.storage.fs import read_json
from tests.conftest import shard_verdict
from tests.core.test_shard import ENC, KEY, NAME, ORDER, planned


def build(out, raw_root, **hooks):
    return build_shard(out_root=str(out), raw_root=str(raw_root), shard_key=KEY, shard_name=NAME, settings=ENC,
                       workers=1, run_id="run-test", **hooks)


def test_a_tar_rewritten_after_its_check_gets_no_commit_record(raw, tmp_path):
    """Another writer puts other bytes of the same size at the final path after the check read the
    committed ones: a record written now would call them checked and fresh."""
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(raw.rows, ORDER))

    def rewrite(url: str) -> None:
        data = bytearray(open(url, "rb").read())
        data[700] ^= 0xFF  # inside the first sample's bytes; same size
        tmp = url + ".other-writer"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, url)

    with pytest.raises(ShardChangedDuringCheck) as err:
        build(out, raw.root, after_check=rewrite)
    assert f"shard {KEY}: " in str(err.value) and NAME in str(err.value) and "changed on storage" in str(err.value)
    assert read_json(state_url(str(out), KEY)) is None
    assert shard_verdict(str(out), KEY, NAME, "any") == "missing"  # not fresh: the next build makes it again
    build(out, raw.root)  # and it does
    assert read_json(state_url(str(out), KEY)) is not None


def test_a_tar_touched_while_it_is_checked_gets_no_commit_record(raw, tmp_path):
    """Same bytes, a new stamp (mtime) between the commit and the check: the record would hold a
    stamp that was never the committed file's; it is not written."""
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(raw.rows, ORDER))

    def touch(url: str) -> None:
        st = os.stat(url)
        os.utime(url, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    with pytest.raises(ShardChangedDuringCheck):
        build(out, raw.root, after_commit=touch)
    assert read_json(state_url(str(out), KEY)) is None


def test_the_record_holds_the_stamp_of_the_checked_tar(raw, tmp_path):
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(raw.rows, ORDER))
    build(out, raw.root)
    state = read_json(state_url(str(out), KEY))
    st = os.stat(out / NAME)
    assert state["bytes"] == st.st_size and state["stamp"] == str(st.st_mtime)
    assert shard_verdict(str(out), KEY, NAME, state["fingerprint"]) == "fresh"


def test_a_manifest_changed_after_its_write_leaves_the_shard_not_fresh(raw, tmp_path):
    """The manifest's stamp is recorded as its write gave it (no second look after the check): a
    manifest changed while the tar is checked (or at any time after) makes the shard stale at the
    next look, as freshness and the audit judge it, never fresh over it."""
    out = tmp_path / "out"
    write_slice(str(out), KEY, planned(raw.rows, ORDER))
    manifest = out / "_manifests" / f"{KEY}.json"

    def rewrite_manifest(_url: str) -> None:
        data = manifest.read_bytes()
        st = os.stat(manifest)
        manifest.write_bytes(data.replace(b'"run-test"', b'"run-tset"'))  # same size, other bytes
        os.utime(manifest, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    build(out, raw.root, after_check=rewrite_manifest)
    state = read_json(state_url(str(out), KEY))
    assert state["manifest_stamp"] != str(os.stat(manifest).st_mtime)
    assert shard_verdict(str(out), KEY, NAME, state["fingerprint"]) == "stale"
