"""Adding a release reads no raw byte but its own sources: with the raw release on moto's S3 server
(real HTTP on 127.0.0.1, every request recorded), a build that adds a release after two were built
sends the raw bucket only the listing and ranged GETs, each exactly one member the new release
planned, each once; no tar is read whole or walked again (SPEC: Releases).

Needs both halves of issue 25 (this branch and relcore's per-release catalog)."""

from __future__ import annotations

import re
from collections import Counter

from tests.checks import catalog
from tests.conftest import build_env, dagster_home, imnet
from tests.s3server import MotoS3

RAW_BUCKET = "raw-releases"
RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")


def toml(tmp, third: bool) -> str:
    text = (f'[release.all]\nout_root = "{tmp / "out" / "all"}"\nnum_shards = 2\n'
            f'[release.q80]\nout_root = "{tmp / "out" / "q80"}"\nnum_shards = 2\nquality = 80\n')
    if third:
        text += f'[release.extra]\nout_root = "{tmp / "out" / "extra"}"\nnum_shards = 3\nseed = 9\n'
    return text


def test_adding_a_release_reads_only_its_own_sources_from_the_raw_bucket(tmp_path):
    from imnet_assets.sample.sample_raw import write_sample_raw

    write_sample_raw(tmp_path / "raw-local", synsets=3, images=8, seed=2)
    releases = tmp_path / "releases.toml"
    releases.write_text(toml(tmp_path, third=False))
    with MotoS3() as s3:
        client = s3.client()
        client.create_bucket(Bucket=RAW_BUCKET)
        s3.put_tree(client, tmp_path / "raw-local", RAW_BUCKET, "w21")
        env = build_env(tmp_path, f"s3://{RAW_BUCKET}/w21", DAGSTER_HOME=str(dagster_home(tmp_path)),
                        IMNET_RELEASES=str(releases))
        for k in [k for k in env if k.startswith("AWS_")]:
            del env[k]
        env.update(s3.env())
        imnet(["build"], env)
        releases.write_text(toml(tmp_path, third=True))
        mark = s3.mark()
        out = imnet(["build"], env).stdout
        raw = [r for r in s3.since(mark) if r.bucket == RAW_BUCKET]
    assert re.search(r"^  filtered_index\s+fresh, skipped", out, re.M), out
    gets = [r for r in raw if r.method == "GET" and r.key]
    assert all(r.range and r.status == 206 for r in gets), [(r.key, r.range) for r in gets if not r.range]
    read = Counter()
    for r in gets:
        start, end = map(int, RANGE.match(r.range).groups())
        read[(r.key.removeprefix("w21/"), start, end - start + 1)] += 1
    with catalog(tmp_path / "catalog.duckdb") as con:
        planned = Counter(con.execute(
            """SELECT p.tar, p."offset", p.size FROM plan p WHERE p.release = 'extra'""").fetchall())
    assert sum(planned.values()) >= 10 and "extra: wds_shards: 0 of 3 selected shards fresh, 3 to build" in out, out
    assert read == planned, (f"{sum(read.values())} ranged reads, {sum(planned.values())} members planned by extra; "
                             f"unplanned {list((read - planned).items())[:3]}, unread {list((planned - read).items())[:3]}")
    others = [r.method for r in raw if not (r.method == "GET" and r.key)]
    assert set(others) <= {"GET"}, others  # listings (GET on the bucket) only
