"""An eval set's memory is bounded whatever its files' sizes (stages/eval_pool.py, storage/compressed_tar.py):
a 1.5 GiB file left in the eval folder (a video, a .zip), and a 600 MiB member of a gzip eval tar or of a
plain one, are more bytes than any image the pHash decodes (perceptual.MAX_DECODED_BYTES): their sha256
is streamed, never the whole file held by a worker or by the stage's process, and the catalog records
them without a pHash, "too large", while the real JPEGs beside them are hashed. Real sparse files, real
tars, real pool workers in a real process whose peak RSS (VmHWM of it and every process under it) is read
from /proc while it runs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from imnet_assets.image.perceptual import MAX_DECODED_BYTES, too_many_bytes
from tests.core.test_eval_tars import members

BIG_FILE = 3 << 29  # 1.5 GiB, sparse
BIG_MEMBER = 600 << 20  # 600 MiB of zeros in a tar
PEAK_LIMIT = 300 << 20  # bytes any one process may peak at (a worker at rest: ~100 MB)

# Hashes the eval set of argv[1] into the catalog argv[2] with two pool workers; prints its rows
HASH = """
import json, sys, types
from imnet_assets.stages.decontam import refresh_eval_images
from imnet_assets.storage.catalog import Catalog
settings = types.SimpleNamespace(eval_exclude=sys.argv[1], workers=2, image_timeout=60.0)
with Catalog(sys.argv[2]) as cat:
    refresh_eval_images(cat, settings, "run", lambda m: None)
    images = cat.con.execute("SELECT file, sha256, phash, no_phash FROM eval_images ORDER BY file").fetchall()
    damage = cat.con.execute("SELECT file FROM eval_damage").fetchall()
print(json.dumps({"images": images, "damage": damage}))
"""


def zeros_sha256(n: int) -> str:
    digest, piece = hashlib.sha256(), bytes(16 << 20)
    while n:
        digest.update(piece[: min(n, len(piece))])
        n -= min(n, len(piece))
    return digest.hexdigest()


def _tree(root: int) -> list[int]:
    """`root` and every process under it."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def _hwm(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) << 10 for line in status.splitlines() if line.startswith("VmHWM:")), 0)


def hashed_with_peaks(folder: Path, catalog: Path) -> tuple[dict, dict[int, int]]:
    """The catalog's rows once `folder` is hashed as the eval set in a real process, and the peak RSS
    (bytes) of it and of each process under it (pool workers, the forkserver) while they lived."""
    proc = subprocess.Popen([sys.executable, "-c", HASH, str(folder), str(catalog)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/tmp")
    return finished_with_peaks(proc)


def finished_with_peaks(proc: subprocess.Popen) -> tuple[object, dict[int, int]]:
    """The JSON `proc` prints once it exits 0, and the peak RSS (bytes) of it and of each process under
    it (pool workers, the forkserver) while they lived, polled every 50 ms."""
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        for pid in _tree(proc.pid):
            peaks[pid] = max(peaks.get(pid, 0), _hwm(pid))
        time.sleep(0.05)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    return json.loads(out), peaks


def test_files_too_large_to_be_images_are_hashed_streaming_and_recorded_too_large(tmp_path):
    assert BIG_MEMBER > MAX_DECODED_BYTES
    ev = tmp_path / "ev"
    ev.mkdir()
    for name, data in members(3):
        (ev / Path(name).name).write_bytes(data)
    with open(ev / "left-behind.mp4", "wb") as f:
        f.truncate(BIG_FILE)  # a sparse file: no disk, but every byte is read
    zeros = tmp_path / "zeros"
    with open(zeros, "wb") as f:
        f.truncate(BIG_MEMBER)
    for name, mode in (("val.tar.gz", "w:gz"), ("val.tar", "w")):
        with tarfile.open(ev / name, mode, **({"compresslevel": 1} if mode == "w:gz" else {})) as tf:
            tf.add(zeros, arcname="val/huge.bin")
            for member, data in members(2):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    rows, peaks = hashed_with_peaks(ev, tmp_path / "catalog.duckdb")
    assert len(peaks) >= 3, peaks  # the process, the forkserver, the workers
    assert max(peaks.values()) < PEAK_LIMIT, {pid: peak >> 20 for pid, peak in peaks.items()}
    images = {file: (sha, phash, why) for file, sha, phash, why in rows["images"]}
    big_member = (zeros_sha256(BIG_MEMBER), None, too_many_bytes(BIG_MEMBER))
    assert images.pop("left-behind.mp4") == (zeros_sha256(BIG_FILE), None, too_many_bytes(BIG_FILE))
    assert images.pop("val.tar.gz/val/huge.bin") == big_member
    assert images.pop("val.tar/val/huge.bin") == big_member
    assert too_many_bytes(BIG_FILE).startswith("too large: 1,610,612,736 bytes, over the 512,000,000 ")
    # the images beside them: hashed as ever
    assert sorted(images) == sorted([Path(n).name for n, _d in members(3)]
                                    + [f"{t}/{n}" for t in ("val.tar", "val.tar.gz") for n, _d in members(2)])
    assert all(phash is not None and why is None for _sha, phash, why in images.values()), images
    assert rows["damage"] == []


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def test_a_plain_eval_tars_member_over_the_limit_is_read_once_its_sha256_taken_by_the_walk(tmp_path):
    """A pax eval tar (tarfile's walk, which reads a member over the limit to see it is all there) and a
    ustar one (the fast walk): the member's bytes are read once in all, by the walk that lists the tar's
    members (TarMembersJob, hashing them as it goes), never once more by the job that hashes the items."""
    from imnet_assets.stages.eval_pool import TarMembersJob, _streamed_sha256, _too_large

    for fmt in (tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        tar = tmp_path / f"val-{fmt}.tar"
        with open(tar, "wb") as f:
            for i, (name, data) in enumerate(members(3)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.pax_headers = {"comment": "pax"} if fmt == tarfile.PAX_FORMAT else {}
                f.write(info.tobuf(fmt) + data + bytes(-len(data) % 512))
                if i == 1:  # then a sparse member of zeros
                    big = tarfile.TarInfo("val/big.JPEG")
                    big.size = BIG_MEMBER
                    f.write(big.tobuf(fmt))
                    f.seek(BIG_MEMBER, os.SEEK_CUR)
            f.write(bytes(1024))
        for mapped in (False, True) if fmt == tarfile.PAX_FORMAT else (True,):
            before = _bytes_read()
            items, damage, _ = TarMembersJob("val.tar", str(tar), os.path.getsize(tar), mapped=mapped).run(
                None, lambda *_a, **_k: None)
            shas = [_streamed_sha256(item) for item in items if _too_large(item)]
            read = _bytes_read() - before
            assert damage == [] and len(items) == 4 and shas == [zeros_sha256(BIG_MEMBER)], (fmt, items, damage)
            assert BIG_MEMBER <= read < 1.2 * BIG_MEMBER, (fmt, mapped, read)  # (a map's pieces: os.pread)
