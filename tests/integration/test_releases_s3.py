"""The raw release is read once for every release (SPEC: Releases; issue 25), with the raw release on
moto's S3 server (real HTTP on 127.0.0.1, every request recorded):

1. three releases built at once, a full WebP one, a class subset with a per-class validation split
   (same codec) and a JPEG variant: the raw bucket serves each tar's bytes exactly once, in all:
   the ranged GETs of each tar cover it whole, none overlapping (the index's single pass); the
   shard runs read no raw byte (the index's pass encoded each kept image for both codecs);
2. a fourth release with the full release's codec added: the raw bucket serves listings only.
"""

from __future__ import annotations

import re
from collections import defaultdict

from imnet_assets.storage import s3read
from tests.checks import catalog
from tests.conftest import build_env, dagster_home, imnet
from tests.s3server import MotoS3

RAW_BUCKET = "raw-releases"
RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")


def toml(tmp, sub, fourth: bool) -> str:
    text = (f'[release.all]\nout_root = "{tmp / "out" / "all"}"\nnum_shards = 2\n'
            f'[release.sub]\nout_root = "{tmp / "out" / "sub"}"\nnum_shards = 2\nsynsets = "{sub}"\n'
            f'val_per_class = 2\n'
            f'[release.jpg]\nout_root = "{tmp / "out" / "jpg"}"\nnum_shards = 2\ncodec = "jpeg"\n')
    if fourth:
        text += f'[release.extra]\nout_root = "{tmp / "out" / "extra"}"\nnum_shards = 3\nseed = 9\n'
    return text


def raw_reads(requests) -> dict[str, list[tuple[int, int]]]:
    """Raw object -> the byte ranges its GETs asked for, in order (a GET with no range, or one from
    byte 0 past any object's end (fs.read_bytes): (0, None), the whole object: the synset metadata
    files)."""
    out = defaultdict(list)
    for r in requests:
        if r.bucket == RAW_BUCKET and r.method == "GET" and r.key:
            start, end = map(int, RANGE.match(r.range).groups()) if r.range else (0, None)
            whole = end is None or end + 1 >= s3read.WHOLE
            out[r.key.removeprefix("w21/")].append((start, None if whole else end + 1))
    return out


def test_the_raw_release_is_read_once_for_all_releases(tmp_path):
    from imnet_assets.sample.sample_raw import write_sample_raw

    summary = write_sample_raw(tmp_path / "raw-local", synsets=3, images=8, seed=2)
    (tmp_path / "sub.txt").write_text("\n".join(sorted(summary.wnids)[:2]) + "\n")
    releases = tmp_path / "releases.toml"
    releases.write_text(toml(tmp_path, tmp_path / "sub.txt", fourth=False))
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "raw-local").glob("*.tar")}
    with MotoS3() as s3:
        client = s3.client()
        client.create_bucket(Bucket=RAW_BUCKET)
        s3.put_tree(client, tmp_path / "raw-local", RAW_BUCKET, "w21")
        env = build_env(tmp_path, f"s3://{RAW_BUCKET}/w21", DAGSTER_HOME=str(dagster_home(tmp_path)),
                        IMNET_RELEASES=str(releases))
        for k in [k for k in env if k.startswith("AWS_")]:
            del env[k]
        env.update(s3.env())
        mark = s3.mark()
        first = imnet(["build"], env).stdout
        read_first = raw_reads(s3.since(mark))
        releases.write_text(toml(tmp_path, tmp_path / "sub.txt", fourth=True))
        mark = s3.mark()
        second = imnet(["build"], env).stdout
        raw_second = [r for r in s3.since(mark) if r.bucket == RAW_BUCKET]
    # 1. every tar read whole, each byte once: the index's single pass and nothing more
    tars = {k: v for k, v in read_first.items() if k.endswith(".tar")}
    assert set(tars) == set(sizes), (sorted(read_first), sorted(sizes))
    assert all(v == [(0, None)] for k, v in read_first.items() if k not in tars), read_first  # metadata: once
    for tar, ranges in tars.items():
        covered = sorted(ranges)
        assert covered[0][0] == 0 and covered[-1][1] == sizes[tar], (tar, covered, sizes[tar])
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), (tar, covered)  # no gap, no overlap
    for name in ("all", "sub", "jpg"):
        assert re.search(rf"^  {name}/shard_audit\s+ok: ", first, re.M), first
    with catalog(tmp_path / "catalog.duckdb") as con:
        planned = dict(con.execute("SELECT release, count(*) FROM plan GROUP BY release").fetchall())
        staged = dict(con.execute("SELECT codec, count(*) FROM staged_images GROUP BY codec").fetchall())
        validation = con.execute("SELECT count(*) FROM plan WHERE release = 'sub' AND shard >= '0002'").fetchone()[0]
    assert planned["all"] >= 15 and planned["jpg"] == planned["all"] and validation == 2 * 2, (planned, validation)
    assert sorted(c.split("-")[0] for c in staged) == ["jpeg", "webp"], staged
    assert all(n >= planned["all"] for n in staged.values()), (staged, planned)
    # 2. a further release with a codec the index staged: listings only
    assert re.search(r"^  filtered_index\s+fresh, skipped", second, re.M), second
    assert "extra: wds_shards: 0 of 3 selected shards fresh, 3 to build" in second, second
    assert re.search(r"^  extra/shard_audit\s+ok: ", second, re.M), second
    assert [(r.method, r.key) for r in raw_second if r.key or r.method != "GET"] == [], raw_second[:5]
