"""Remote tars read with many ranged requests in flight (prefetch.PrefetchedFile), on moto's S3
server: the same bytes and the same index records as a local read, each byte fetched once."""

from __future__ import annotations

import os
import random

from imnet_assets.sample.sample_raw import write_sample_raw
from imnet_assets.stages.index import scan_tar
from imnet_assets.stages.scan_pool import scan_tars
from imnet_assets.storage.prefetch import PrefetchedFile, depth_for
from tests.integration.test_s3 import s3  # noqa: F401 - moto on 127.0.0.1, a bucket per test


def test_depth_keeps_the_index_at_64_requests_in_flight_together():
    for workers in (1, 2, 4, 16, 32, 64):
        assert depth_for(workers) * workers >= 64 or depth_for(workers) == 32
    assert depth_for(1) == 32 and depth_for(2) == 32 and depth_for(128) == 2


def test_prefetched_reads_and_seeks_give_the_object_bytes_each_chunk_fetched_once(s3):  # noqa: F811
    data = os.urandom(3 * 100_000 + 123)
    s3.client().put_object(Bucket=s3.bucket, Key="blob", Body=data)
    url = f"s3://{s3.bucket}/blob"
    mark = s3.mark()
    with PrefetchedFile(url, len(data), chunk=10_000, depth=8) as f:
        assert f.read(5) == data[:5]
        got = bytearray(data[:5])
        while chunk := f.read(7_777):
            got += chunk
        assert bytes(got) == data and f.read(10) == b""
        requests = f.requests
        assert f.max_in_flight >= 2  # requests really overlapped
        f.seek(0)  # far back: fetched again, still right
        assert f.read(100) == data[:100]
        rng = random.Random(0)
        for _ in range(30):
            at = rng.randrange(len(data))
            f.seek(at)
            assert f.read(3000) == data[at : at + 3000]
    gets = [r for r in s3.since(mark) if r.method == "GET" and r.key == "blob"]
    assert requests == -(-len(data) // 10_000)  # the forward pass fetched every chunk once
    assert all(r.range for r in gets)  # ranged reads, never the whole object


def test_a_remote_tar_indexes_exactly_like_the_local_copy(s3, tmp_path):  # noqa: F811
    summary = write_sample_raw(tmp_path, synsets=2, images=20, seed=5)
    client = s3.client()
    for tar in summary.tars:
        client.upload_file(str(tar), s3.bucket, f"raw/{tar.name}")
        local = scan_tar(str(tar))
        remote = scan_tar(f"s3://{s3.bucket}/raw/{tar.name}", depth=4)
        assert remote == local


def test_small_remote_tars_are_fetched_whole_many_in_flight_one_get_each(s3, tmp_path):  # noqa: F811
    """Tars up to one prefetch chunk (most tiny synsets) are fetched whole, `depth` of them at once,
    with their listed sizes: one GET per tar, no request asking for a size, the index unchanged."""
    from tests.conftest import environ
    from tests.latency_proxy import LatencyProxy

    summary = write_sample_raw(tmp_path, synsets=40, images=2, seed=9)
    client = s3.client()
    urls, sizes = [], {}
    for tar in summary.tars:
        client.upload_file(str(tar), s3.bucket, f"raw/{tar.name}")
        url = f"s3://{s3.bucket}/raw/{tar.name}"
        urls.append(url)
        sizes[url] = tar.stat().st_size
    local = {f"s3://{s3.bucket}/raw/{tar.name}": scan_tar(str(tar)) for tar in summary.tars}
    with LatencyProxy(s3.endpoint, latency_ms=200) as proxy, environ(AWS_ENDPOINT_URL=proxy.endpoint):
        scanned = list(scan_tars(urls, workers=1, sizes=sizes))
    assert [url for url, _ in scanned] == urls
    assert {url: records for url, records in scanned} == local
    counts = proxy.counts()
    assert counts.by_method == {"GET": len(urls)}, counts.by_method
    assert counts.max_in_flight == depth_for(1) == 32


def test_a_remote_shard_is_read_back_many_requests_ahead_sample_for_sample_as_the_local_copy(s3, tmp_path):  # noqa: F811
    """`imnet verify` reads a shard on S3 READ_AHEAD ranged requests ahead (not one 8 MB block at a
    time): the same samples and the same file sha256 as the local copy, requests overlapping."""
    import io
    import tarfile

    from imnet_assets.release import verify
    from tests.conftest import environ
    from tests.latency_proxy import LatencyProxy

    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(40):  # 40 samples of ~0.6 MB: 6 prefetch chunks
            for ext, payload in (("cls", b"%d" % i), ("webp", os.urandom(600_000 + i))):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    s3.client().upload_file(str(shard), s3.bucket, "wds/shard.tar")
    local_digest, remote_digest = [], []
    local = list(verify.iter_samples(str(shard), local_digest))
    with LatencyProxy(s3.endpoint, latency_ms=50) as proxy, environ(AWS_ENDPOINT_URL=proxy.endpoint):
        remote = list(verify.iter_samples(f"s3://{s3.bucket}/wds/shard.tar", remote_digest))
        used = proxy.counts()
    assert remote == local and remote_digest == local_digest and len(local) == 40
    assert used.max_in_flight >= 4, used
