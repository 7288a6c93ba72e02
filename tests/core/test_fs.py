"""storage.fs on local folders (and the pure URL helpers for s3:// roots)."""

from __future__ import annotations

import os

import pytest

from imnet_assets.storage import atomic, fs, prefetch


def test_join_basename_dirname_local(tmp_path):
    root = str(tmp_path / "out")
    assert fs.join(root, "_plan", "0001.csv") == os.path.join(root, "_plan", "0001.csv")
    assert fs.basename(fs.join(root, "a.tar")) == "a.tar"
    assert fs.dirname(fs.join(root, "a.tar")) == root
    assert not fs.is_remote(root)
    assert not fs.is_remote("file:///tmp/x")


def test_join_basename_dirname_s3():
    assert fs.is_remote("s3://bucket/prefix")
    assert fs.join("s3://bucket/prefix", "_plan", "0001.csv") == "s3://bucket/prefix/_plan/0001.csv"
    assert fs.join("s3://bucket/prefix/", "x.tar") == "s3://bucket/prefix/x.tar"  # no double slash
    assert fs.basename("s3://bucket/prefix/x.tar") == "x.tar"
    assert fs.basename("s3://bucket/prefix/") == "prefix"
    assert fs.dirname("s3://bucket/prefix/x.tar") == "s3://bucket/prefix"


def test_file_urls_are_local(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"abc")
    url = "file://" + str(tmp_path / "f.bin")
    assert fs.exists(url)
    assert fs.read_bytes(url) == b"abc"
    assert fs.size(url) == 3


def test_listdir_lists_files_only_sorted(tmp_path):
    (tmp_path / "b.tar").write_bytes(b"12345")
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.tar").write_bytes(b"x")
    entries = fs.listdir(str(tmp_path))
    assert [e["name"] for e in entries] == ["a.txt", "b.tar"]
    assert entries[1]["size"] == 5
    assert entries[1]["url"] == os.path.join(str(tmp_path), "b.tar")
    assert all(isinstance(e["mtime"], str) and e["mtime"] for e in entries)
    assert fs.listdir(str(tmp_path / "nope")) == []


def test_atomic_open_commits_only_on_success(tmp_path):
    target = tmp_path / "deep" / "folder" / "shard.tar"
    with atomic.atomic_open(str(target)) as f:
        f.write(b"part one ")
        # Not visible at the final path until the block ends.
        assert not target.exists()
        f.write(b"part two")
    assert target.read_bytes() == b"part one part two"
    assert sorted(os.listdir(target.parent)) == ["shard.tar"]  # no temporary left behind


def test_atomic_open_leaves_nothing_on_exception(tmp_path):
    target = tmp_path / "shard.tar"
    with pytest.raises(RuntimeError, match="boom"), atomic.atomic_open(str(target)) as f:
        f.write(b"half a shard")
        raise RuntimeError("boom")
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_open_keeps_the_old_file_when_a_rewrite_fails(tmp_path):
    target = tmp_path / "shard.tar"
    atomic.write_atomic(str(target), b"old complete shard")
    with pytest.raises(KeyboardInterrupt), atomic.atomic_open(str(target)) as f:
        f.write(b"new but incomplete")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old complete shard"
    assert os.listdir(tmp_path) == ["shard.tar"]


def test_write_atomic_replaces(tmp_path):
    target = str(tmp_path / "m.json")
    atomic.write_atomic(target, b"1")
    atomic.write_atomic(target, b"22")
    assert fs.read_bytes(target) == b"22"
    assert fs.read_text(target) == "22"
    assert os.listdir(tmp_path) == ["m.json"]


def exited_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_remove_partials_removes_only_this_targets_temporaries(tmp_path):
    target = str(tmp_path / "shard-0001.tar")
    mine = [tmp_path / f".shard-0001.tar{atomic.TMP_MARK}{pid}-{tag}"
            for pid, tag in ((exited_pid(), "0123abcd"), (os.getpid(), "ffffffff"))]
    others = [
        tmp_path / f".shard-0002.tar{atomic.TMP_MARK}12-0123abcd",  # another shard's temporary
        tmp_path / f".shard-0001.tar{atomic.TMP_MARK}12-0123abcd.keep",  # not the temporary pattern
        tmp_path / f".shard-0001.tar{atomic.TMP_MARK}x-0123abcd",
        tmp_path / "shard-0001.tar",  # the committed file itself
        tmp_path / "shard-0001.tar.bak",
    ]
    for p in mine + others:
        p.write_bytes(b"x")
    removed = atomic.remove_partials(target)
    assert sorted(removed) == sorted(str(p) for p in mine)
    assert all(not p.exists() for p in mine)
    assert all(p.exists() for p in others)
    assert atomic.remove_partials(target) == []
    assert atomic.remove_partials(str(tmp_path / "missing-folder" / "x.tar")) == []


def test_remove_partials_spares_a_live_writers_temporary(tmp_path):
    """Two runs of one shard at once: the second must not delete what the first is writing."""
    import subprocess

    target = str(tmp_path / "shard-0001.tar")
    writer = subprocess.Popen(["sleep", "60"])
    try:
        live = tmp_path / f".shard-0001.tar{atomic.TMP_MARK}{writer.pid}-0123abcd"
        live.write_bytes(b"being written")
        assert atomic.remove_partials(target) == [] and live.exists()
    finally:
        writer.kill()
        writer.wait()
    assert atomic.remove_partials(target) == [str(live)]


def test_remove_partials_matches_what_atomic_open_leaves(tmp_path):
    """A writer killed mid-way leaves its temporary; remove_partials finds exactly that file."""
    target = str(tmp_path / "shard.tar")
    cm = atomic.atomic_open(target)
    f = cm.__enter__()  # simulate a writer that dies before the context ends
    f.write(b"partial")
    f.flush()
    leftovers = [n for n in os.listdir(tmp_path) if n != "shard.tar"]
    assert len(leftovers) == 1
    f.close()
    assert atomic.remove_partials(target) == [str(tmp_path / leftovers[0])]
    assert os.listdir(tmp_path) == []


def test_range_reader_reads_exact_ranges(tmp_path):
    data = bytes(range(256)) * 40
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(data[i:])
        paths.append(str(p))
    with fs.RangeReader(max_open=2) as reader:  # more files than may stay open
        for _ in range(2):
            for i, p in enumerate(paths):
                for offset, length in ((0, 1), (1, 511), (512, 1000), (len(data) - i - 10, 10), (100, 0)):
                    assert reader.read(p, offset, length) == data[i:][offset:offset + length]
        # Past the end: short, never padded.
        assert reader.read(paths[0], len(data) - 3, 10) == data[-3:]
        assert reader.read(paths[0], len(data) + 5, 10) == b""
    with pytest.raises(FileNotFoundError):
        fs.RangeReader().read(str(tmp_path / "missing.bin"), 0, 1)


def test_open_read_is_seekable(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"0123456789")
    with prefetch.open_read(str(p)) as f:
        f.seek(4)
        assert f.read(3) == b"456"


def test_remove_and_makedirs(tmp_path):
    d = str(tmp_path / "a" / "b")
    fs.makedirs(d)
    assert os.path.isdir(d)
    f = fs.join(d, "x")
    atomic.write_atomic(f, b"1")
    fs.remove(f)
    assert not fs.exists(f)
    fs.remove(f)  # removing what is gone is fine


def test_redact_hides_aws_secrets(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY12345")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t/Value+With=Chars")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tokentokentoken")
    msg = ("cannot read s3://b/x.tar: key AKIAEXAMPLEKEY12345 secret s3cr3t/Value+With=Chars "
           "token tokentokentoken again s3cr3t/Value+With=Chars")
    out = fs.redact(msg)
    for secret in ("AKIAEXAMPLEKEY12345", "s3cr3t/Value+With=Chars", "tokentokentoken"):
        assert secret not in out
    assert "cannot read s3://b/x.tar" in out
    assert out.count("***") == 4


def test_redact_leaves_text_alone_without_secrets(monkeypatch):
    for var in fs.SECRET_VARS:
        monkeypatch.delenv(var, raising=False)
    assert fs.redact("nothing to hide") == "nothing to hide"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "")
    assert fs.redact("nothing to hide") == "nothing to hide"


def test_sweep_partials_removes_only_temporaries_of_dead_writers(tmp_path):
    import os
    import subprocess

    from imnet_assets.storage import atomic

    proc = subprocess.Popen(["true"])
    proc.wait()
    (tmp_path / f"._info.json.tmp-{proc.pid}-abcdef12").write_bytes(b"partial")
    (tmp_path / f".0001.csv.tmp-{os.getpid()}-abcdef12").write_bytes(b"being written")
    (tmp_path / "_info.json").write_bytes(b"{}")
    removed = atomic.sweep_partials(str(tmp_path))
    assert [os.path.basename(r) for r in removed] == [f"._info.json.tmp-{proc.pid}-abcdef12"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".0001.csv.tmp-{os.getpid()}-abcdef12", "_info.json"]


def test_hashing_reader_gives_the_file_sha256_however_it_is_read(tmp_path):
    import hashlib

    data = os.urandom(3 << 20) + b"tail"
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()

    def reads(steps) -> str:
        with open(path, "rb") as raw:
            f = fs.HashingReader(raw)
            for op, arg in steps:
                if op == "read":
                    f.read(arg)
                elif op == "readinto":
                    f.readinto(memoryview(bytearray(arg)))
                else:
                    f.seek(arg)
                    assert f.tell() == arg
            return f.hexdigest()

    assert reads([]) == want  # nothing read: all of it read at the end
    assert reads([("read", -1)]) == want
    assert reads([("readinto", 1 << 20)] * 4) == want  # past the end
    assert reads([("read", 1000), ("seek", 10), ("read", 5000), ("read", 100)]) == want  # back a little
    assert reads([("read", 1000), ("seek", 2 << 20), ("read", 1000)]) == want  # a gap: read at the end


def test_a_tar_walk_with_its_digest_reads_the_file_once(tmp_path, monkeypatch):
    import hashlib
    import io
    import tarfile

    from imnet_assets.storage import rawtar

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(20):
            payload = os.urandom(50_000 + i)
            info = tarfile.TarInfo(f"s{i:03d}.webp")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    data = buf.getvalue()
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    read = []
    real_open = prefetch.open_read

    class Counting:
        def __init__(self, f):
            self._f = f

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def read(self, n=-1):
            out = self._f.read(n)
            read.append(len(out))
            return out

        def readinto(self, b):
            k = self._f.readinto(b)
            read.append(k)
            return k

    monkeypatch.setattr(prefetch, "open_read", lambda url, *a, **k: Counting(real_open(url, *a, **k)))
    digest: list[str] = []
    members = [m for m in rawtar.iter_tar(str(path), what="shard", digest=digest)]
    assert len(members) == 20
    assert digest == [hashlib.sha256(data).hexdigest()]
    assert sum(read) <= len(data) + 10240  # the end-of-archive padding is looked at twice at most


def test_range_reader_shared_by_threads_reads_the_right_file(tmp_path):
    """Reader threads each keep their own open files: with one shared table, a descriptor closed by
    one thread (to make room) and reused for another file gave a second thread the wrong bytes."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    paths = []
    for i in range(64):
        p = tmp_path / f"{i:02d}.tar"
        p.write_bytes(bytes([i]) * 4096)
        paths.append(str(p))
    rng = random.Random(0)
    asks = [(rng.randrange(64), rng.randrange(4000)) for _ in range(20000)]
    with fs.RangeReader(max_open=2) as reader, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda a: reader.read(paths[a[0]], a[1], 96), asks))
    wrong = [(a, g[:1]) for a, g in zip(asks, got) if g != bytes([a[0]]) * 96]
    assert wrong == []


def test_a_storage_error_is_not_taken_for_a_missing_file(monkeypatch):
    """read_json (commit records, manifests, the plan index) says None for no file, but storage
    that does not answer is an error: else every shard would look missing and be rebuilt."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNREACHABLE0002")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unreachable")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(fs.StorageError, match=rf"cannot read s3://b/_manifests/0000.state.json: .*127.0.0.1:{port}"):
        fs.read_json("s3://b/_manifests/0000.state.json")


def test_read_json_is_none_for_no_file_or_a_torn_one(tmp_path):
    assert fs.read_json(str(tmp_path / "none.json")) is None
    (tmp_path / "torn.json").write_text('{"a": ')
    assert fs.read_json(str(tmp_path / "torn.json")) is None
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert fs.read_json(str(tmp_path / "ok.json")) == {"a": 1}


def test_read_many_local_gives_each_files_bytes_and_none_for_absent_ones(tmp_path):
    (tmp_path / "a.json").write_bytes(b'{"a": 1}')
    (tmp_path / "b.bin").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "torn.json").write_text('{"a": ')
    urls = [str(tmp_path / n) for n in ("a.json", "b.bin", "none.json", "torn.json")]
    got = fs.read_many(urls)
    assert got == {urls[0]: b'{"a": 1}', urls[1]: bytes(range(256)) * 10, urls[2]: None, urls[3]: b'{"a": '}
    docs = fs.read_json_many([urls[0], urls[2], urls[3]])
    assert docs == {urls[0]: {"a": 1}, urls[2]: None, urls[3]: None}
    assert fs.read_many([]) == {}


def test_read_many_on_another_remote_store_gives_none_for_an_object_gone_before_its_read_again():
    """A store other than S3 (read through fsspec's cat_ranges): an object whose read failed (a
    connection reset) is read again on its own; removed meanwhile, it is absent (None), as the
    contract says, not a FileNotFoundError out of read_many. The store is fsspec's in-memory one,
    whose read of that object meets the reset once, the object removed by then."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class ResetOnce(MemoryFileSystem):
        protocol = "resetonce"
        store: dict = {}
        pseudo_dirs = [""]
        reset: set[str] = set()

        def cat_file(self, path, *args, **kwargs):
            path = self._strip_protocol(path)
            if path in self.reset:
                self.reset.discard(path)
                self.rm(path)  # removed by its writer while the read was cut
                raise ConnectionResetError(104, "Connection reset by peer")
            return super().cat_file(path, *args, **kwargs)

    fsspec.register_implementation("resetonce", ResetOnce, clobber=True)
    store = ResetOnce()
    store.pipe("/b/kept.json", b'{"n": 1}')
    store.pipe("/b/gone.json", b'{"n": 2}')
    ResetOnce.reset.add("/b/gone.json")
    urls = ["resetonce://b/kept.json", "resetonce://b/gone.json", "resetonce://b/none.json"]
    assert fs.read_many(urls) == {urls[0]: b'{"n": 1}', urls[1]: None, urls[2]: None}
    assert not ResetOnce.reset  # the reset did happen


def test_listdir_of_an_absent_folder_is_empty(tmp_path):
    assert fs.listdir(str(tmp_path / "nothing-here")) == []


def test_range_reader_closes_the_files_of_reader_threads_that_ended(tmp_path):
    """A process that runs shard after shard starts reader threads for each: the files of threads
    that ended are closed, so descriptors do not pile up until the process runs out of them."""
    import threading

    paths = []
    for i in range(60):
        p = tmp_path / f"t{i}.tar"
        p.write_bytes(bytes([i]) * 1024)
        paths.append(str(p))
    reader = fs.RangeReader(max_open=4)
    before = len(os.listdir("/proc/self/fd"))
    for i in range(0, 60, 3):  # 20 "shard runs", each a reader thread over 3 tars of its own
        got = []
        t = threading.Thread(target=lambda i=i, got=got: got.extend(reader.read(paths[i + j], 10, 5) for j in range(3)))
        t.start()
        t.join()
        assert got == [bytes([i + j]) * 5 for j in range(3)]
    assert len(os.listdir("/proc/self/fd")) - before <= 3  # the last thread's files only (was 60)
    reader.close()
    assert len(os.listdir("/proc/self/fd")) <= before
