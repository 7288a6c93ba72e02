"""Client CPU per ranged read of a ~110 KB source over TLS against moto: obstore (what fs.read_range
uses, storage/s3read.py) against botocore (through s3fs, what every other request uses).

moto serves HTTPS, in a process of its own, with a certificate of a private CA
(tests/s3server.private_ca, given in AWS_CA_BUNDLE); each client reads the same random ranges of
one object, `--in-flight` at a time from threads, after a warm-up that opens its connections. The
figure is this (the client's) process's CPU time, user + system (signing, TLS, parsing, copying),
per read. One run, printed as ms per read and as the ratio.

    .venv/bin/python bench/s3_client_cpu.py            # ~1 minute: 400 reads per client
    .venv/bin/python bench/s3_client_cpu.py --reads 2000
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.s3server import ACCESS_KEY, REGION, private_ca  # noqa: E402

SERVER = """
import ssl, sys, time
sys.path.insert(0, sys.argv[2])
from tests.s3server import MotoS3
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1] + "/server.pem", sys.argv[1] + "/server.key")
with MotoS3(ssl_context=ctx) as s3:
    print(s3.port, flush=True)
    sys.stdin.read()
"""

SOURCE = 110_000  # bytes: a real ImageNet source's mean size


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(name: str, read, ranges, in_flight: int) -> tuple[float, float]:
    """(ms of this process's CPU per read, reads/s)."""
    with ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(read, ranges[:in_flight * 2]))  # warm-up: connections, TLS sessions, stores
        c0, t0 = cpu(), time.perf_counter()
        got = list(pool.map(read, ranges))
        c1, t1 = cpu(), time.perf_counter()
    assert all(len(g) == SOURCE for g in got), name
    return (c1 - c0) / len(ranges) * 1000, len(ranges) / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reads", type=int, default=400)
    ap.add_argument("--in-flight", type=int, default=16)
    a = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="s3cpu-"))
    ca, _ctx = private_ca(folder)
    root = str(Path(__file__).resolve().parents[1])
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(folder), root], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        os.environ.update(AWS_ENDPOINT_URL=f"https://127.0.0.1:{port}", AWS_ACCESS_KEY_ID=ACCESS_KEY,
                          AWS_SECRET_ACCESS_KEY="imnet-test-secret", AWS_DEFAULT_REGION=REGION, AWS_CA_BUNDLE=ca)
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        size = 16 << 20
        client.put_object(Bucket="bench", Key="winter21/n01440764.tar", Body=os.urandom(size))
        rng = random.Random(0)
        ranges = [rng.randrange(0, size - SOURCE) for _ in range(a.reads)]
        url = "s3://bench/winter21/n01440764.tar"

        from imnet_assets.storage import fs, s3read

        def by_obstore(offset: int) -> bytes:
            return s3read.get_range("bench", "winter21/n01440764.tar", offset, SOURCE)

        s3fs_fs, path = fs.filesystem(url)

        def by_botocore(offset: int) -> bytes:
            return s3fs_fs.cat_file(path, start=offset, end=offset + SOURCE)

        results = {}
        for name, read in (("obstore", by_obstore), ("botocore (s3fs)", by_botocore)):
            results[name] = measure(name, read, ranges, a.in_flight)
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    print(f"{a.reads} ranged reads of {SOURCE // 1000} KB over TLS, {a.in_flight} in flight, moto in another process")
    for name, (ms, rate) in results.items():
        print(f"  {name:16s} {ms:6.2f} ms CPU per read   {rate:7.0f} reads/s")
    o, b = results["obstore"][0], results["botocore (s3fs)"][0]
    print(f"  botocore / obstore CPU per read: {b / o:.2f}x")


if __name__ == "__main__":
    main()
