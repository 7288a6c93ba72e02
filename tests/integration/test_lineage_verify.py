"""`imnet build` over a damaged raw release (a tar cut mid-member, a tar cut mid-header, a tar
of hostile member names), then `imnet lineage` and `imnet verify` as a user runs them."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import tarfile
from pathlib import Path

import duckdb
import pytest
import webdataset as wds
from PIL import Image

from tests.conftest import build_env, imnet

HOSTILE = "n99999999"  # sorts after every sample wnid: its duplicate of another tar's key loses


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (seed * 40 % 256, 90, 200)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def hostile_tar(path: Path, duplicate_of: str) -> None:
    def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        return info, io.BytesIO(data)

    sym = tarfile.TarInfo(f"{HOSTILE}_7.JPEG")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo(f"{HOSTILE}_8.JPEG")
    hard.type, hard.linkname = tarfile.LNKTYPE, f"{HOSTILE}_1.JPEG"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(*reg(f"{HOSTILE}_1.JPEG", jpeg(1)))
        tf.addfile(*reg(f"sub/{HOSTILE}_2.JPEG", jpeg(2)))
        tf.addfile(*reg("../evil.JPEG", jpeg(3)))
        tf.addfile(*reg("/etc/evil.JPEG", jpeg(4)))
        tf.addfile(sym)
        tf.addfile(hard)
        tf.addfile(*reg(duplicate_of, jpeg(5)))


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


@pytest.fixture(scope="module")
def damaged(sample_release, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("damaged")
    raw = tmp / "raw"
    shutil.copytree(sample_release[0], raw)
    tars = sorted(raw.glob("n*.tar"))
    # Cut the first tar in the middle of its third-last member, the second in a header.
    mid_member = members(tars[0])[-3]
    with open(tars[0], "r+b") as f:
        f.truncate(mid_member.offset_data + mid_member.size // 2)
    mid_header = members(tars[1])[-2]
    with open(tars[1], "r+b") as f:
        f.truncate(mid_header.offset + 100)
    duplicate = members(tars[2])[-1].name
    hostile_tar(raw / f"{HOSTILE}.tar", duplicate)
    env = build_env(tmp, raw)
    built = imnet(["build"], env, cwd=tmp)
    facts = {"cut_member": (tars[0].name, mid_member), "cut_header": (tars[1].name, mid_header),
             "duplicate": (tars[2].name, duplicate)}
    return tmp, env, built, facts


def catalog(tmp: Path):
    return duckdb.connect(str(tmp / "catalog.duckdb"), read_only=True)


def test_build_records_damaged_tars_and_hostile_names(damaged):
    tmp, _env, built, facts = damaged
    assert "shard_audit      ok" in built.stdout
    with catalog(tmp) as con:
        rows = con.execute('SELECT key, tar, member, "offset", status, reason FROM images').fetchall()
    by_member = {(tar, member): (key, off, st, reason) for key, tar, member, off, st, reason in rows}

    tar, cut = facts["cut_member"]
    key, off, st, reason = by_member[(tar, cut.name)]
    assert st == "excluded" and off == cut.offset_data and f"truncated raw tar {tar}" in reason
    readable = [m for m in members_before(tmp / "raw" / tar, cut)]
    assert all((tar, m) in by_member for m in readable)

    tar, cut = facts["cut_header"]
    tails = [(k, o, r) for (t, m), (k, o, s, r) in by_member.items() if t == tar and s == "excluded" and not m]
    assert len(tails) == 1 and tails[0][1] == cut.offset and tar in tails[0][2] and "truncated" in tails[0][2]
    assert all((tar, m) in by_member for m in members_before(tmp / "raw" / tar, cut))

    hostile = f"{HOSTILE}.tar"
    assert by_member[(hostile, f"{HOSTILE}_1.JPEG")][2] == "kept"
    assert by_member[(hostile, f"sub/{HOSTILE}_2.JPEG")][::2] == (f"{HOSTILE}_2", "kept")
    assert "'..'" in by_member[(hostile, "../evil.JPEG")][3]
    assert "absolute" in by_member[(hostile, "/etc/evil.JPEG")][3]
    assert "symlink" in by_member[(hostile, f"{HOSTILE}_7.JPEG")][3]
    assert "hard link" in by_member[(hostile, f"{HOSTILE}_8.JPEG")][3]
    first_tar, dup_name = facts["duplicate"]
    assert by_member[(first_tar, dup_name)][2] == "kept"
    dup = by_member[(hostile, dup_name)]
    assert dup[2] == "excluded" and dup[3].startswith(f"duplicate key: also in {first_tar} at byte ")
    for key, _tar, _m, _o, st, reason in rows:
        assert re.fullmatch(r"[A-Za-z0-9_\-]+", key), key
        assert st == "kept" or reason, key

    # Nothing was ever extracted, and the shards hold exactly the kept images.
    assert not list(tmp.rglob("evil*")) and not Path("/etc/evil.JPEG").exists()
    with catalog(tmp) as con:
        kept = {k for (k,) in con.execute("SELECT key FROM images WHERE status = 'kept'").fetchall()}
    urls = [str(p) for p in sorted((tmp / "out").glob("imagenet12k-train-*.tar"))]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert sorted(keys) == sorted(kept) and f"{HOSTILE}_2" in kept


def test_tars_cut_on_disk_are_accounted_to_their_last_byte_by_a_damage_row(damaged):
    """Real damage (tars cut on disk): each tar's walk accounts for its whole size on disk, the
    bytes it could not read as a tar in damage rows that reach exactly to its end (the audit's
    conservation passed: the build said shard_audit ok)."""
    tmp, _env, built, facts = damaged
    assert "shard_audit      ok" in built.stdout
    with catalog(tmp) as con:
        scans = {t: (a, d, r) for t, a, d, r in con.execute(
            "SELECT s.tar, s.accounted_bytes, s.damaged_bytes, r.size FROM tar_scans s JOIN raw_tars r USING (tar)"
        ).fetchall()}
        damage = con.execute('SELECT tar, "offset", size FROM images WHERE sha256 IS NULL').fetchall()
    for tar, (accounted, damaged_bytes, listed) in scans.items():
        assert accounted + damaged_bytes == listed == (tmp / "raw" / tar).stat().st_size, tar
    for key in ("cut_member", "cut_header"):
        tar, _cut = facts[key]
        size = (tmp / "raw" / tar).stat().st_size
        accounted, damaged_bytes, _listed = scans[tar]
        ends = [(off, min(off + n, size)) for t, off, n in damage if t == tar]
        assert damaged_bytes > 0 and (accounted, size) in ends, (tar, accounted, damaged_bytes, ends)


def members_before(path: Path, cut: tarfile.TarInfo) -> list[str]:
    """Names of the members wholly before the cut member (read from the damaged tar itself)."""
    names = []
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
        for info in tf:
            if info.offset >= cut.offset:
                break
            names.append(info.name)
    assert names
    return names


LINE = {
    "source": re.compile(r"^source\s+(\S+) member (.+)$", re.M),
    "bytes": re.compile(r"^\s+offset (\d+)\s+size (\d+)\s+sha256 ([0-9a-f]{64})$", re.M),
    "shard": re.compile(r"^shard\s+(\d{4})\s+position (\d+)\s+file (\S+)$", re.M),
    "run": re.compile(r"^written by\s+run (\S+)\s+code version (\S+)", re.M),
    "webp": re.compile(r"^webp sha256\s+([0-9a-f]{64})", re.M),
}


def lineage(key: str, env, tmp) -> dict:
    out = imnet(["lineage", key], env, cwd=tmp).stdout
    found = {name: rx.search(out) for name, rx in LINE.items()}
    missing = [n for n, m in found.items() if m is None]
    assert not missing, f"lineage {key}: no {missing} line in\n{out}"
    return {name: m.groups() for name, m in found.items()}


@pytest.mark.parametrize("which", ["plain", "from a folder"])
def test_lineage_points_at_the_raw_bytes_and_the_run_that_wrote_the_shard(damaged, which):
    tmp, env, _built, facts = damaged
    with catalog(tmp) as con:
        key = f"{HOSTILE}_2" if which == "from a folder" else con.execute(
            "SELECT min(key) FROM images WHERE status = 'kept' AND tar = ?", [facts["duplicate"][0]]
        ).fetchone()[0]
        runs = dict(con.execute("SELECT shard, run_id FROM shards").fetchall())
        code_versions = dict(con.execute("SELECT shard, code_version FROM shards").fetchall())
    got = lineage(key, env, tmp)
    tar_path, member = got["source"]
    offset, size, sha = int(got["bytes"][0]), int(got["bytes"][1]), got["bytes"][2]
    with open(tar_path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    assert len(data) == size and hashlib.sha256(data).hexdigest() == sha
    with tarfile.open(tar_path) as tf:
        assert tf.extractfile(member).read() == data

    shard, position, shard_file = got["shard"][0], int(got["shard"][1]), got["shard"][2]
    run_id, code_version = got["run"]
    assert run_id == runs[shard] and code_version == code_versions[shard]
    samples = list(wds.WebDataset(shard_file, shardshuffle=False))
    assert samples[position]["__key__"] == key  # nothing excluded at encode time here
    assert hashlib.sha256(samples[position]["webp"]).hexdigest() == got["webp"][0]


def test_lineage_of_excluded_and_unknown_keys(damaged):
    tmp, env, _built, facts = damaged
    tar, cut = facts["cut_member"]
    key = cut.name.rsplit(".", 1)[0]
    out = imnet(["lineage", key], env, cwd=tmp).stdout
    assert re.search(rf"^status\s+excluded\s+\(truncated raw tar {tar}", out, re.M), out
    assert "shard " not in out
    missing = imnet(["lineage", "n00000000_0"], env, cwd=tmp, check=False)
    assert missing.returncode != 0 and "n00000000_0" in missing.stderr


@pytest.mark.parametrize("shards_set", [True, False])
def test_verify_passes_on_a_good_build(damaged, shards_set):
    """Also without IMNET_NUM_SHARDS in the environment (as after `imnet demo`, which picks its own
    shard count): the out root's plan says how many shards the release has."""
    tmp, env, _built, _facts = damaged
    if not shards_set:
        env = {k: v for k, v in env.items() if k != "IMNET_NUM_SHARDS"}
    result = imnet(["verify", "--decode"], env, cwd=tmp, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 of 4 shards ok" in result.stdout and "FAIL" not in result.stdout


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


@pytest.mark.parametrize("damage", ["webp payload", "json payload", "tar header", "cut tail", "missing shard"])
def test_verify_names_the_damaged_shard_and_sample(damaged, tmp_path, damage):
    tmp, env, _built, _facts = damaged
    shutil.copytree(tmp / "out", tmp_path / "out")
    shutil.copy(tmp / "catalog.duckdb", tmp_path / "catalog.duckdb")
    env = {**env, "IMNET_OUT_ROOT": str(tmp_path / "out"), "IMNET_CATALOG": str(tmp_path / "catalog.duckdb")}
    shard = tmp_path / "out" / "imagenet12k-train-0001.tar"
    infos = members(shard)
    sample = infos[3 * 5 + 2]  # the sixth sample's .webp
    key = sample.name.split(".")[0]
    if damage == "webp payload":
        flip(shard, sample.offset_data + sample.size // 2)
    elif damage == "json payload":
        js = infos[3 * 5 + 1]
        flip(shard, js.offset_data + js.size // 3)
    elif damage == "tar header":
        flip(shard, infos[3 * 5].offset + 3)  # inside the name of the sample's .cls header
    elif damage == "cut tail":
        with open(shard, "r+b") as f:
            f.truncate(infos[-1].offset_data + 10)
    else:
        shard.unlink()
    result = imnet(["verify"], env, cwd=tmp_path, check=False)
    out = result.stdout
    assert result.returncode != 0, out
    assert "FAIL shard 0001 (imagenet12k-train-0001.tar)" in out, out
    assert "3 of 4 shards ok, 1 FAILED" in out, out
    if damage != "missing shard":  # the whole file's sha256, taken during the same walk
        assert re.search(r"tar sha256 [0-9a-f]{16} != catalog [0-9a-f]{16}", out), out
    if damage in ("webp payload", "json payload"):
        assert f"sample {key}: {damage.split()[0]}" in out.replace(".json", "json"), out
    if damage == "tar header":
        assert re.search(r"tar structure damaged at byte \d+ \(after sample \w+\)", out), out
        assert f"sample {key}: members ['json', 'webp']" in out, out  # found again after the damage


def _tamper_info(path: Path, how: str) -> None:
    import json

    doc = json.loads(path.read_text())
    train = doc["splits"]["train"]
    if how == "num_samples":
        train["num_samples"] += 1
    elif how == "shard order":
        f, n = train["filenames"], train["shard_lengths"]
        f[0], f[1], n[0], n[1] = f[1], f[0], n[1], n[0]
    else:  # a second split listing every shard again
        doc["splits"]["validation"] = {**train, "name": "validation"}
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("damage", ["num_samples", "shard order", "extra split", "stray shard"])
def test_verify_fails_on_a_wrong_info_json_or_a_stray_shard(damaged, tmp_path, damage):
    """Each of these still lists every shard with its length, which is all an earlier verify looked at."""
    tmp, env, _built, _facts = damaged
    shutil.copytree(tmp / "out", tmp_path / "out")
    shutil.copy(tmp / "catalog.duckdb", tmp_path / "catalog.duckdb")
    env = {**env, "IMNET_OUT_ROOT": str(tmp_path / "out"), "IMNET_CATALOG": str(tmp_path / "catalog.duckdb")}
    if damage == "stray shard":  # as a build with more shards leaves it behind
        # (found by the out root's own layout: as after `imnet demo`, IMNET_NUM_SHARDS may be unset)
        env = {k: v for k, v in env.items() if k != "IMNET_NUM_SHARDS"}
        shutil.copy(tmp_path / "out" / "imagenet12k-train-0000.tar", tmp_path / "out" / "imagenet12k-train-0004.tar")
        shutil.copy(tmp_path / "out" / "_info.json", tmp_path / "out" / "imagenet12k-train-info.tar")  # not a shard name
    else:
        _tamper_info(tmp_path / "out" / "_info.json", damage)
    result = imnet(["verify"], env, cwd=tmp_path, check=False)
    out = result.stdout
    assert result.returncode != 0, out
    assert "4 of 4 shards ok" in out, out  # the shards themselves are fine
    expect = {
        "num_samples": r"FAIL _info.json: _info.json split 'train': num_samples is \d+, expected \d+",
        "shard order": r"FAIL _info.json: .*'train': filenames same entries in another order",
        "extra split": r"FAIL _info.json: _info.json split 'validation' is not one of this release's splits",
        "stray shard": r"FAIL 1 files named like shards are not shards of this release .*"
                       r"\['imagenet12k-train-0004.tar'\]",
    }[damage]
    assert re.search(expect, out), out


def test_verify_fails_naming_the_tar_whose_members_are_not_all_in_the_catalog(damaged, tmp_path):
    """Conservation: a tar that lost an images row (as a kill between a scan record and its rows
    once left it) fails `imnet verify`, naming the tar, though every shard file is fine."""
    tmp, env, _built, _facts = damaged
    shutil.copytree(tmp / "out", tmp_path / "out")
    shutil.copy(tmp / "catalog.duckdb", tmp_path / "catalog.duckdb")
    env = {**env, "IMNET_OUT_ROOT": str(tmp_path / "out"), "IMNET_CATALOG": str(tmp_path / "catalog.duckdb")}
    with duckdb.connect(str(tmp_path / "catalog.duckdb")) as con:
        tar = con.execute("SELECT min(tar) FROM images WHERE status = 'excluded'").fetchone()[0]
        con.execute("DELETE FROM images WHERE rowid = (SELECT min(rowid) FROM images WHERE tar = ? "
                    "AND status = 'excluded')", [tar])
    result = imnet(["verify"], env, cwd=tmp_path, check=False)
    assert result.returncode != 0, result.stdout
    assert "4 of 4 shards ok" in result.stdout, result.stdout
    assert re.search(rf"FAIL conservation: tar {re.escape(tar)}: (\d+) members counted from its headers, "
                     r"\d+ images rows", result.stdout), result.stdout


def test_verify_checks_the_selected_shards_in_parallel_with_progress(damaged, tmp_path):
    tmp, env, _built, _facts = damaged
    shutil.copytree(tmp / "out", tmp_path / "out")
    env = {**env, "IMNET_OUT_ROOT": str(tmp_path / "out")}
    flip(tmp_path / "out" / "imagenet12k-train-0000.tar", 5000)  # not selected: not looked at
    result = imnet(["verify", "--shards", "0001-0002,0003", "--jobs", "2"], env, cwd=tmp_path, check=False)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert out.splitlines()[0].startswith("verify: 3 shards under ") and out.splitlines()[0].endswith(", 2 processes")
    progress = re.findall(r"^verify: (\d)/3 shards done \(0 failed\), [\d.]+ shards/s, \d+ MB/s, eta \d+s$", out, re.M)
    assert progress == ["1", "2", "3"], out
    assert "3 of 3 shards ok; _info.json and stray files not checked (only some shards selected)" in out, out
    bad = imnet(["verify", "--shards", "0000,0003", "--jobs", "2"], env, cwd=tmp_path, check=False)
    assert bad.returncode == 1 and "1 of 2 shards ok, 1 FAILED (0000)" in bad.stdout, bad.stdout
    assert "verify: 2/2 shards done (1 failed)" in bad.stdout, bad.stdout
    nosuch = imnet(["verify", "--shards", "0009"], env, cwd=tmp_path, check=False)
    assert nosuch.returncode == 2 and "--shards: shard 0009 does not exist" in nosuch.stderr


class Writer:
    """A real process holding the catalog open read-write (as `imnet build` does through
    filtered_index or the audit) for `hold` seconds, then closing it and exiting."""

    def __init__(self, catalog: Path, hold: float):
        import subprocess
        import sys

        code = ("import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); print('held', flush=True); "
                "time.sleep(float(sys.argv[2])); con.close()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(catalog), str(hold)], stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


@pytest.mark.parametrize("command", ["lineage", "verify", "status"])
def test_readers_wait_for_a_writer_holding_the_catalog(damaged, tmp_path, command):
    tmp, env, _built, _facts = damaged
    shutil.copy(tmp / "catalog.duckdb", tmp_path / "catalog.duckdb")
    env = {**env, "IMNET_CATALOG": str(tmp_path / "catalog.duckdb")}
    with catalog(tmp) as con:
        key = con.execute("SELECT min(key) FROM shard_samples").fetchone()[0]
    args = {"lineage": ["lineage", key], "verify": ["verify"], "status": ["status"]}[command]
    with Writer(tmp_path / "catalog.duckdb", hold=4) as writer:
        result = imnet(args, env, cwd=tmp_path, check=False)
        released = writer.proc.poll() is not None  # the writer had finished when the reader did
    assert result.returncode == 0, result.stdout + result.stderr
    assert released
    note = f"catalog {tmp_path / 'catalog.duckdb'} is being written by another process (pid {writer.proc.pid}: "
    assert note in result.stderr and "; waiting..." in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    expect = {"lineage": f"key          {key}", "verify": "4 of 4 shards ok", "status": "filtered_index   fresh"}
    assert expect[command] in result.stdout, result.stdout


def test_status_reports_without_the_catalog_while_a_long_writer_holds_it(damaged, tmp_path):
    from imnet_assets.orchestrate.status import STATUS_WAIT_S

    tmp, env, _built, _facts = damaged
    shutil.copy(tmp / "catalog.duckdb", tmp_path / "catalog.duckdb")
    env = {**env, "IMNET_CATALOG": str(tmp_path / "catalog.duckdb")}
    with Writer(tmp_path / "catalog.duckdb", hold=STATUS_WAIT_S + 60) as writer:
        result = imnet(["status"], env, cwd=tmp_path, check=False)
        assert writer.proc.poll() is None  # still holding it: status did not wait it out
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"catalog stages   unknown now: catalog {tmp_path / 'catalog.duckdb'} is being "
                                    f"written by another process (pid {writer.proc.pid}: "), result.stdout
    assert "wds_shards       4 fresh" in result.stdout, result.stdout
