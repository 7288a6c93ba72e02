"""One byte changed, one byte cut, or the whole file emptied, in each kind of file a build leaves in
the out root, caused for real on a small built release (imnet sample-raw + imnet build, copied per
case), then `imnet status`, `imnet verify` and `imnet build` as a user runs them (SPEC "Failure
behaviour": damage is found and named, never reported fresh, and a build repairs exactly what is
damaged, byte-equal to a clean build, with nothing excluded).

- A shard tar edited in place (a byte in a member header, a JSON member, an image, the padding, the
  end-of-archive blocks; or cut short, or emptied): its tar is no longer the committed one, so
  status says stale naming it, verify fails naming it, and build writes that shard alone again.
- What the audit writes beside the shards (`_info.json`, `classes.tsv`, the card `README.md`): the
  audit's record is sealed with their bytes, so status does not call the audit fresh and build
  audits again, writing them anew, no shard rewritten.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import pytest

from tests.conftest import built_sample_release, copy_built_release, imnet

SHARD0 = "imagenet12k-train-0000.tar"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return built_sample_release(tmp_path_factory, "out_root_damage")


@pytest.fixture
def copy(release, tmp_path):
    """A private copy of the built release: out root, catalog and raw root (times kept)."""
    return copy_built_release(release, tmp_path, IMNET_PROJECT_ROOT=str(tmp_path))


def build_rewrites_shard0_alone(release, copy, clean: dict[str, str]) -> None:
    """The next build writes shard 0000 again and nothing else: the out root equal to the clean
    build's, the audit's rows too, and verify passes."""
    tmp, env = copy
    before = mtimes(tmp / "out")
    built = imnet(["build"], env, cwd=tmp)
    assert "2 of 3 selected shards fresh, 1 to build" in built.stdout
    after = mtimes(tmp / "out")
    assert [n for n in after if after[n] != before[n]] == [SHARD0]  # exactly the damaged one
    assert files(tmp / "out") == clean
    assert clean_audit_rows(copy) == clean_audit_rows(release)
    imnet(["verify"], env, cwd=tmp)


def files(out: Path) -> dict[str, str]:
    """Every file of the out root but the commit records and manifests (they name their run): sha256."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and not p.relative_to(out).as_posix().startswith("_manifests/")}


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}


def damage(path: Path, kind: str, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    if kind == "byte":
        i = len(data) // 2 if at is None else at
        data[i] ^= 0x20 if data[i] else 0x31
    elif kind == "short":
        del data[-1]
    else:
        data.clear()
    path.write_bytes(bytes(data))


def shard_offset(tar: Path, where: str) -> int:
    with tarfile.open(tar) as tf:
        ms = tf.getmembers()
    return {"header": ms[3].offset + 10, "json": ms[1].offset_data + 5,
            "image": ms[2].offset_data + ms[2].size // 2, "padding": ms[0].offset_data + ms[0].size + 3,
            "end": tar.stat().st_size - 100}[where]


def status_lines(env, cwd) -> list[str]:
    proc = imnet(["status"], env, cwd=cwd)
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stdout.splitlines()


def line(lines: list[str], name: str) -> str:
    return next(x for x in lines if x.startswith(name))


def clean_audit_rows(release) -> tuple:
    import duckdb

    with duckdb.connect(str(release[0] / "catalog.duckdb"), read_only=True) as con:
        return (con.execute("SELECT count(*) FROM images WHERE status = 'excluded'").fetchone(),
                con.execute("SELECT count(*) FROM shard_samples WHERE repaired").fetchone())


@pytest.mark.parametrize("case", ["byte:header", "byte:json", "byte:image", "byte:padding", "byte:end",
                                  "short:end", "empty:end"])
def test_a_damaged_shard_is_named_and_rebuilt_alone(release, copy, case):
    tmp, env = copy
    kind, where = case.split(":")
    clean = files(release[0] / "out")
    tar = tmp / "out" / SHARD0
    damage(tar, kind, shard_offset(tar, where) if kind == "byte" else None)
    lines = status_lines(env, tmp)
    assert "not fresh: 0000" in line(lines, "  not fresh")
    assert not line(lines, "shard_audit").split()[1] == "fresh"
    verify = imnet(["verify"], env, cwd=tmp, check=False)
    assert verify.returncode != 0 and "FAILED (0000)" in verify.stdout + verify.stderr
    build_rewrites_shard0_alone(release, copy, clean)


@pytest.mark.parametrize("name", ["_info.json", "classes.tsv", "README.md"])
@pytest.mark.parametrize("kind", ["byte", "short", "empty"])
def test_a_damaged_file_the_audit_wrote_is_not_fresh_and_build_writes_it_again(release, copy, name, kind):
    tmp, env = copy
    clean = files(release[0] / "out")
    assert line(status_lines(env, tmp), "shard_audit").split()[1] == "fresh"
    damage(tmp / "out" / name, kind)
    assert line(status_lines(env, tmp), "shard_audit").split()[1] == "stale"
    before = mtimes(tmp / "out")
    built = imnet(["build"], env, cwd=tmp)
    assert "3 of 3 selected shards fresh, 0 to build" in built.stdout
    assert "shard_audit      ok" in built.stdout
    assert mtimes(tmp / "out") == before  # no shard rewritten
    assert files(tmp / "out") == clean
    assert clean_audit_rows(copy) == clean_audit_rows(release)
    assert line(status_lines(env, tmp), "shard_audit").split()[1] == "fresh"


@pytest.mark.parametrize("kind", ["byte", "short", "empty"])
def test_a_damaged_plan_index_is_not_fresh_and_build_writes_it_again(release, copy, kind):
    """A byte of a digest changed leaves the JSON valid: the index's seal still finds it."""
    tmp, env = copy
    clean = files(release[0] / "out")
    index = tmp / "out" / "_plan" / "_index.json"
    at = index.read_bytes().index(b'"0000": "') + 12 if kind == "byte" else None
    damage(index, kind, at)
    lines = status_lines(env, tmp)
    assert line(lines, "shuffled_plan").split()[1] == "stale"
    assert line(lines, "shard_audit").split()[1] != "fresh"
    before = mtimes(tmp / "out")
    built = imnet(["build"], env, cwd=tmp)
    assert "shuffled_plan    materialized" in built.stdout
    assert "3 of 3 selected shards fresh, 0 to build" in built.stdout
    assert mtimes(tmp / "out") == before  # no shard rewritten
    assert files(tmp / "out") == clean
    assert line(status_lines(env, tmp), "shard_audit").split()[1] == "fresh"


def test_a_damaged_plan_slice_fails_the_shard_run_naming_it_and_the_next_build_repairs_both(release, copy):
    """A slice is read only by its shard's run (status and a build of fresh shards do not read
    them): when its shard is to be built, the run refuses the slice naming it, sets it aside, and the
    next build makes the plan again (that slice alone written) and then the shard."""
    tmp, env = copy
    clean = files(release[0] / "out")
    slice0 = tmp / "out" / "_plan" / "0000.csv"
    damage(slice0, "byte", len(slice0.read_bytes()) - 5)
    damage(tmp / "out" / SHARD0, "byte", shard_offset(tmp / "out" / SHARD0, "image"))
    failed = imnet(["build"], env, cwd=tmp, check=False)
    said = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "0000.csv is damaged" in said, said
    assert not slice0.exists() and slice0.with_name("0000.csv.damaged").exists()
    assert line(status_lines(env, tmp), "shuffled_plan").split()[1] == "stale"
    slices_before = {p.name: p.stat().st_mtime_ns for p in (tmp / "out" / "_plan").glob("000[12].csv")}
    built = imnet(["build"], env, cwd=tmp)
    assert "shuffled_plan    materialized" in built.stdout and "1 to build" in built.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (tmp / "out" / "_plan").glob("000[12].csv")} == slices_before
    assert files(tmp / "out") == clean  # the slice set aside is gone, the rest byte-equal
    assert clean_audit_rows(copy) == clean_audit_rows(release)
    imnet(["verify"], env, cwd=tmp)


def test_a_damaged_manifest_is_named_when_the_catalog_is_rebuilt_and_its_shard_built_again(release, copy):
    """The manifests are what a catalog moved aside is rebuilt from (SPEC "Failure behaviour"): one
    that does not parse (a byte changed with its mtime kept: freshness does not see it) fails that
    audit naming it and takes its shard's commit record away, so the next build writes that shard
    alone again, and ends byte-equal to the clean build."""
    tmp, env = copy
    clean = files(release[0] / "out")
    manifest = tmp / "out" / "_manifests" / "0000.json"
    kept = manifest.stat()
    damage(manifest, "byte", 0)
    os.utime(manifest, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    os.rename(tmp / "catalog.duckdb", tmp / "catalog.aside")
    failed = imnet(["build"], env, cwd=tmp, check=False)
    said = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "its manifest" in said and "0000.json is missing or damaged" in said, said
    lines = status_lines(env, tmp)
    assert "not fresh: 0000" in line(lines, "  not fresh") and line(lines, "shard_audit").split()[1] != "fresh"
    build_rewrites_shard0_alone(release, copy, clean)


@pytest.mark.parametrize("kind", ["removed", "short"])
def test_a_manifest_removed_or_cut_is_not_fresh_and_build_writes_its_shard_alone(release, copy, kind):
    """A shard's manifest is part of its commit: its commit record holds the manifest's size and
    stamp as listed right after it was committed, so a manifest removed or cut short (its mtime kept)
    makes the shard stale at once, and the next build writes that shard alone again."""
    tmp, env = copy
    clean = files(release[0] / "out")
    manifest = tmp / "out" / "_manifests" / "0000.json"
    kept = manifest.stat()
    if kind == "removed":
        manifest.unlink()
    else:
        damage(manifest, kind)
        os.utime(manifest, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    lines = status_lines(env, tmp)
    assert "not fresh: 0000" in line(lines, "  not fresh"), lines
    assert line(lines, "shard_audit").split()[1] != "fresh"
    build_rewrites_shard0_alone(release, copy, clean)


def test_a_manifest_byte_changed_with_its_stamp_kept_fails_verify_naming_it_then_is_rebuilt(release, copy):
    """A byte of a manifest changed with its size and mtime kept is fresh to status (stamps are
    trusted), and the JSON may still parse: `imnet verify` hashes it against the sha256 its commit
    record carries, fails the shard naming its manifest and removes its commit record; the next build
    writes that shard alone again."""
    tmp, env = copy
    clean = files(release[0] / "out")
    manifest = tmp / "out" / "_manifests" / "0000.json"
    kept = manifest.stat()
    damage(manifest, "byte", manifest.read_bytes().index(b'"sha256":"') + 12)  # still valid JSON
    os.utime(manifest, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert line(status_lines(env, tmp), "wds_shards").split()[1:3] == ["3", "fresh"]
    verify = imnet(["verify"], env, cwd=tmp, check=False)
    said = verify.stdout + verify.stderr
    assert verify.returncode != 0 and "FAILED (0000)" in said, said
    assert f"FAIL shard 0000 ({SHARD0}): its manifest" in said and "0000.json is damaged" in said, said
    assert "\n  -> commit record removed: the next `imnet build` writes this shard again\n" in said, said
    assert f"FAIL shard 0000 ({SHARD0}): its commit record" not in said, said
    assert "not fresh: 0000" in line(status_lines(env, tmp), "  not fresh")
    build_rewrites_shard0_alone(release, copy, clean)


def test_a_commit_record_from_before_manifest_stamps_keeps_its_shard_fresh_and_verify_parses_its_manifest(
        release, copy):
    """A commit record written before it held the manifest's size, stamp and sha256 does not make
    its shard stale (that would rewrite every shard of an existing release); its manifest must still
    be there, and `imnet verify` parses it against the catalog instead of hashing it."""
    import json

    tmp, env = copy
    record = tmp / "out" / "_manifests" / "0000.state.json"
    older = {k: v for k, v in json.loads(record.read_bytes()).items() if not k.startswith("manifest_")}
    assert len(older) < len(json.loads(record.read_bytes()))  # the record did hold them
    record.write_text(json.dumps(older, sort_keys=True))
    assert line(status_lines(env, tmp), "wds_shards").split()[1:3] == ["3", "fresh"]
    imnet(["verify"], env, cwd=tmp)
    manifest = tmp / "out" / "_manifests" / "0000.json"
    os.rename(manifest, tmp / "manifest.aside")
    assert "not fresh: 0000" in line(status_lines(env, tmp), "  not fresh")
    os.rename(tmp / "manifest.aside", manifest)
    damage(manifest, "byte", manifest.read_bytes().index(b'"sha256":"') + 12)  # parses, names another tar
    verify = imnet(["verify"], env, cwd=tmp, check=False)
    said = verify.stdout + verify.stderr
    assert verify.returncode != 0 and "0000.json is damaged" in said, said


@pytest.mark.parametrize("where", ["json", "image", "end"])
def test_a_byte_rotted_with_its_stamp_kept_is_found_by_verify_and_then_rebuilt(release, copy, where):
    """Freshness trusts a shard's size and stamp (its bytes are not hashed on every look), so a byte
    that rots with the mtime kept is fresh to status and build until `imnet verify` reads it: verify
    fails naming the shard and removes its commit record, and the next build writes it alone again."""
    tmp, env = copy
    clean = files(release[0] / "out")
    tar = tmp / "out" / SHARD0
    stamp = tar.stat()
    damage(tar, "byte", shard_offset(tar, where))
    os.utime(tar, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert line(status_lines(env, tmp), "wds_shards").split()[1:3] == ["3", "fresh"]
    verify = imnet(["verify"], env, cwd=tmp, check=False)
    said = verify.stdout + verify.stderr
    assert verify.returncode != 0 and "FAILED (0000)" in said, said
    assert "\n  -> commit record removed: the next `imnet build` writes this shard again\n" in said, said
    assert f"FAIL shard 0000 ({SHARD0}): its commit record" not in said, said
    assert "not fresh: 0000" in line(status_lines(env, tmp), "  not fresh")
    build_rewrites_shard0_alone(release, copy, clean)


@pytest.mark.parametrize("which", ["shard", "manifest"])
def test_a_read_error_while_verify_reads_is_not_checked_and_keeps_its_commit(release, copy, which):
    """A local read error (EIO: here the shard's or its manifest's path made a link to /proc/self/mem,
    which every read refuses so) is a fault of the machinery, not of the bytes: verify says NOT CHECKED
    naming it, never FAIL, and the shard's commit record stays (SPEC "Failure behaviour"); the file,
    put back, is fresh."""
    tmp, env = copy
    path = tmp / "out" / (SHARD0 if which == "shard" else "_manifests/0000.json")
    record = tmp / "out" / "_manifests" / "0000.state.json"
    kept = record.read_bytes()
    os.rename(path, tmp / "aside")
    os.symlink("/proc/self/mem", path)
    verify = imnet(["verify"], env, cwd=tmp, check=False)
    said = verify.stdout + verify.stderr
    assert verify.returncode == 3 and f"NOT CHECKED shard 0000 ({SHARD0}): cannot read " in said, said
    assert path.name in said and "Input/output error" in said and "FAIL" not in said and "not checked:" not in said, said
    assert "verify: 3/3 shards done (0 failed, 1 not checked)" in said, said
    assert ("verify: 2 of 3 shards ok, 1 NOT CHECKED (0000); nothing failed, run verify again to check the 1 "
            "not checked (exit 3)") in said, said
    assert record.read_bytes() == kept
    os.remove(path)
    os.rename(tmp / "aside", path)
    imnet(["verify"], env, cwd=tmp)
    if which == "manifest":  # damage beside a shard not checked: exit 1 (FAIL), whatever else was not checked
        os.rename(path, tmp / "aside")
        os.symlink("/proc/self/mem", path)
        other = tmp / "out" / SHARD0.replace("0000", "0001")
        stamp = other.stat()
        damage(other, "byte", shard_offset(other, "image"))
        os.utime(other, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        both = imnet(["verify"], env, cwd=tmp, check=False)
        said = both.stdout + both.stderr
        assert both.returncode == 1 and "1 of 3 shards ok, 1 FAILED (0001), 1 NOT CHECKED (0000)" in said, said
        assert "nothing failed" not in said, said


def test_shards_left_under_an_old_pattern_fail_the_audit_and_verify_naming_them(copy):
    # SPEC "Output": nothing duplicated in the out root a user uploads. After IMNET_SHARD_PATTERN (and
    # num_shards) changed, the shards written under the old names stay beside the new ones: the
    # audit and verify fail naming them (earlier commit records name them) with the command that
    # clears them; nothing is deleted, and a file this project did not write is not named.
    tmp, env = copy
    out = tmp / "out"
    mine = out / "imagenet12k-train-0009.tar"  # the user's, named like an old shard
    mine.write_bytes(b"not written by imnet")
    env = {**env, "IMNET_SHARD_PATTERN": "w21-{shard}.tar", "IMNET_NUM_SHARDS": "2"}
    old = [f"imagenet12k-train-000{i}.tar" for i in range(3)]
    built = imnet(["build"], env, cwd=tmp, check=False)
    text = built.stdout + built.stderr
    assert built.returncode != 0, text
    assert f"rm -- {' '.join(old)}" in text and mine.name not in text, text
    assert sorted(p.name for p in out.glob("w21-*.tar")) == ["w21-0000.tar", "w21-0001.tar"]
    assert all((out / n).exists() for n in old) and mine.exists()
    verify = imnet(["verify"], env, cwd=tmp, check=False)
    assert verify.returncode != 0 and "FAIL 3 files named like shards" in verify.stdout, verify.stdout
    for n in old:
        (out / n).unlink()
    imnet(["build"], env, cwd=tmp)  # the audit passes now, and verify
    imnet(["verify"], env, cwd=tmp)
    assert mine.exists()


def test_a_commit_record_too_large_to_be_one_is_one_line_naming_it_and_build_repairs_it_once_moved(copy):
    """A file at a commit record's name far larger than one can be (fs.TooLarge): `imnet status`
    and `imnet build` refuse in one line naming it and what to do (SPEC: damage is named), never a
    traceback; moved aside, the next build writes that shard alone again."""
    from imnet_assets.release.outroot import RECORD_MAX_BYTES

    tmp, env = copy
    record = tmp / "out" / "_manifests" / "0001.state.json"
    record.write_bytes(b"{" + b" " * (RECORD_MAX_BYTES + 10) + b"}")
    for args in (["status"], ["build"]):
        proc = imnet(args, env, cwd=tmp, check=False)
        said = proc.stdout + proc.stderr
        assert proc.returncode == 1 and "Traceback" not in said, said
        assert "0001.state.json holds more than" in said and "move it aside" in said, said
    record.rename(tmp / "record.aside")
    assert "1 to build" in imnet(["build"], env, cwd=tmp).stdout
    assert line(status_lines(env, tmp), "wds_shards").split()[1:3] == ["3", "fresh"]
