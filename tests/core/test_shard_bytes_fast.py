"""The shard run's fast paths give exactly what the slow ones gave (issue 26): tar headers from a
template are tarfile's, byte for byte; `rawtar.plain_members` reads a chunk as tarfile reads it
whenever it reads it at all; `verify.sample_digest` changes with any byte of a sample."""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
import types

from imnet_assets.release import sample_tar as sample_tar_mod
from imnet_assets.release.outroot import sample_digest
from imnet_assets.release.plan import SliceRow
from imnet_assets.release.verify import _intact_images
from imnet_assets.storage.rawtar import plain_members


def sample(i: int, webp_size: int, key: str | None = None) -> bytes:
    key = key or f"n01440764_{i}"
    row = SliceRow(i, key, "n01440764", i % 7, "n01440764.tar", f"{key}.JPEG", 512 * i, 999, "ab" * 32, 640, 480,
                   False)
    webp = random.Random(i).randbytes(webp_size)
    enc = types.SimpleNamespace(webp=webp, width=640, height=480, orig_width=640, orig_height=480, repaired=False)
    return sample_tar_mod.sample_bytes(row, enc)


def tarfile_members(data: bytes):
    """What the check read before: tarfile, or its error."""
    out = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                out.append((info.name, tar.extractfile(info).read() if info.isreg() else b""))
    except (tarfile.TarError, EOFError) as e:
        return ("error", str(e))
    return out


def test_headers_from_the_template_are_tarfiles_byte_for_byte():
    names = ["n01440764_10026.webp", "n0_1.cls", "x" * 95 + ".json", "y" * 100, "a b~!@#$%^&*()[]{}.json", "k.cls"]
    for name in names:
        for size in (0, 1, 511, 512, 513, 104_396, 8**11 - 1):
            fast = sample_tar_mod._ustar_header(name, size)
            assert fast == sample_tar_mod._tarinfo(name, size).tobuf(sample_tar_mod.TAR_FORMAT, sample_tar_mod.TAR_ENCODING,
                                                                 "surrogateescape"), (name, size)
    # what needs a pax record is left to tarfile
    assert sample_tar_mod._ustar_header("y" * 101, 1) is None
    assert sample_tar_mod._ustar_header("n01440764_ünïcødé.webp", 1) is None
    assert sample_tar_mod._ustar_header("big.webp", 8**11) is None
    pax = sample_tar_mod._tar_member("n01440764_ünïcødé.webp", b"x")[0]
    assert pax == sample_tar_mod._tarinfo("n01440764_ünïcødé.webp", 1).tobuf(sample_tar_mod.TAR_FORMAT, sample_tar_mod.TAR_ENCODING,
                                                                          "surrogateescape")


def test_plain_members_reads_a_chunk_as_tarfile_does_or_leaves_it_to_tarfile():
    samples = [sample(i, 3000 + 517 * i) for i in range(12)]
    data = b"".join(samples) + bytes(1024)
    assert plain_members(data) == tarfile_members(data)
    starts = [sum(len(s) for s in samples[:i]) for i in range(len(samples) + 1)]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        heads = [info.offset for info in tar]  # where each member's header is
    rng = random.Random(26)
    read, left = 0, 0
    for _ in range(600):
        cut = rng.choice(starts[1:])
        chunk = bytearray(data[:cut] if rng.random() < 0.8 else data[:cut + rng.randrange(0, 3000)])
        for _ in range(rng.randrange(0, 3)):  # a damaged byte in some header
            at = rng.choice([h for h in heads if h < len(chunk) - 512] or [0]) + rng.randrange(512)
            if at < len(chunk):
                chunk[at] = rng.randrange(256)
        got = plain_members(bytes(chunk))
        if got is None:
            left += 1
        else:
            assert got == tarfile_members(bytes(chunk))
            read += 1
    assert read > 100 and left > 100  # both ways were taken
    assert plain_members(b"") is None and plain_members(bytes(1024)) is None
    assert plain_members(b"".join(sample_tar_mod._tar_member("n01440764_ünïcødé.cls", b"1"))) is None


def test_sample_digest_changes_with_any_byte_and_the_read_back_sees_it():
    one = sample(3, 20_000)
    webp_bytes = 20_000
    at = len(one) - webp_bytes - (-webp_bytes % 512)
    digest = sample_digest(one, hashlib.sha256(one[at:at + webp_bytes]).digest(), webp_bytes)
    record = {"offset": 0, "sample_size": len(one), "sample_digest": digest, "webp_bytes": webp_bytes}
    assert _intact_images(one, 0, False, [record]) == [at]  # where the image lies, its hash checked
    for pos in (0, 100, 148, 600, 1030, at - 1, at, at + 7_000, at + webp_bytes - 1, len(one) - 1):
        bad = bytearray(one)
        bad[pos] ^= 0x01
        assert _intact_images(bytes(bad), 0, False, [record]) is None, pos
