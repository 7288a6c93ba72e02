"""A raw release unlike imnet sample-raw's, for the SPEC conformance checks (tests/integration/
test_spec_conformance.py): real Pillow bytes of every odd kind SPEC names, hostile member names,
in the tar layout or the extracted-folder layout, with the expected outcome of each member."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageCms

IN1K_A, IN1K_B = "n01440764", "n01443537"  # ImageNet-1k synsets (label_in1k 0 and 1)
OTHER_C, OTHER_D = "n00005787", "n00006484"  # not in ImageNet-1k (label_in1k -1)
WNIDS = sorted([IN1K_A, IN1K_B, OTHER_C, OTHER_D])

SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:creator>secret</dc:creator>'
       b'</rdf:Description></rdf:RDF></x:xmpmeta>')


def noise(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = random.Random(seed)
    bands = {"RGB": 3, "CMYK": 4, "L": 1, "RGBA": 4}[mode]
    data = bytes(rng.randrange(256) for _ in range(size[0] * size[1] * bands))
    return Image.frombytes(mode, size, data)


def smooth(size: tuple[int, int], seed: int) -> Image.Image:
    """A cheap RGB picture (a gradient, tinted per seed): big images that encode fast."""
    w, h = size
    rng = random.Random(seed)
    base = Image.linear_gradient("L").resize((w, h))
    return Image.merge("RGB", [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                               Image.new("L", (w, h), rng.randrange(256))])


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def exif_bytes() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "SpyCam"  # Make
    exif[0x0112] = 6  # Orientation
    exif.get_ifd(0x8769)[0xA001] = 1  # ColorSpace: sRGB
    exif.get_ifd(0x8769)[0x9003] = "2020:01:01 00:00:00"  # DateTimeOriginal
    exif.get_ifd(0x8825)[0x0001] = "N"  # GPSLatitudeRef
    exif.get_ifd(0x8825)[0x0002] = (51.0, 30.0, 0.0)  # GPSLatitude
    return exif.tobytes()


def grey16() -> Image.Image:
    img = Image.new("I;16", (40, 36))
    img.putdata([(x * 1637 + y * 13) % 65536 for y in range(36) for x in range(40)])
    return img


def truncated(keep_fraction: float, seed: int) -> bytes:
    """A baseline JPEG of noise cut so that about `keep_fraction` of its scan data is left."""
    data = jpeg(noise("RGB", (96, 400), seed))
    sos = data.index(b"\xff\xda")
    return data[: sos + int((len(data) - sos) * keep_fraction)]


def members() -> list[tuple[str, str, bytes, str]]:
    """(wnid, member name, bytes, expectation) for every raw member, in tar order. Expectation:
    `kept`, `repaired`, `excluded`, `dup` (kept, duplicate_of set) or `first` (kept, a later
    repeated key excluded)."""
    a, b, c, d = IN1K_A, IN1K_B, OTHER_C, OTHER_D
    cmyk = noise("CMYK", (48, 40), 1)
    gif = Image.new("P", (50, 40))
    gif.putpalette([i % 256 for i in range(768)])
    gif.putdata([(x + y) % 16 for y in range(40) for x in range(50)])
    gif_buf = io.BytesIO()
    gif.save(gif_buf, "GIF", transparency=3)
    rgba = noise("RGBA", (60, 60), 2)
    meta = jpeg(noise("RGB", (64, 48), 3), exif=exif_bytes(), icc_profile=SRGB_ICC, xmp=XMP)
    twin = jpeg(noise("RGB", (40, 40), 4))
    long_name = f"{a}_" + "x" * 150 + ".JPEG"
    rows = [
        (a, f"{a}_1.JPEG", jpeg(cmyk, icc_profile=SRGB_ICC), "kept"),  # CMYK: its ICC is not carried
        (a, f"{a}_2.JPEG", png(grey16()), "kept"),  # 16-bit grey PNG named .JPEG
        (a, f"{a}_3.JPEG", gif_buf.getvalue(), "kept"),  # palette GIF with transparency
        (a, f"{a}_4.JPEG", png(rgba), "kept"),
        (a, f"{a}_5.JPEG", meta, "kept"),  # EXIF (GPS, Orientation, ColorSpace) + XMP + ICC
        (a, f"{a}_6.JPEG", jpeg(smooth((1000, 768), 6)), "kept"),  # short side exactly 768
        (a, f"{a}_7.JPEG", jpeg(smooth((769, 1200), 7)), "kept"),  # 769: resized to 768 x 1198
        (a, f"{a}_8.JPEG", jpeg(Image.new("RGB", (1, 1), "red")), "excluded"),
        (a, f"{a}_9.JPEG", truncated(0.5, 9), "repaired"),
        (a, f"{a}_10.JPEG", truncated(0.01, 10), "excluded"),
        (a, f"{a}_11.JPEG", b"", "excluded"),
        (a, f"{a}_14.JPEG", png(noise("RGB", (96, 400), 22))[:2500], "excluded"),  # a PNG cut at 2% of its rows
        (a, f"{a}_12.JPEG", b"this is not an image\n" * 20, "excluded"),
        (a, f"{a}_13.JPEG", twin, "kept"),
        (a, f"{a}_1.5.JPEG", jpeg(noise("RGB", (40, 40), 14)), "kept"),  # dot in the stem
        (a, f"../{a}_15.JPEG", jpeg(noise("RGB", (40, 40), 15)), "excluded"),
        (a, f"{a}_\udce9t\udcff.JPEG", jpeg(noise("RGB", (40, 40), 16)), "kept"),  # not UTF-8
        (a, f"{a}_17.JPEG", jpeg(noise("RGB", (40, 40), 17)), "first"),
        (a, f"{a}_17.JPEG", jpeg(noise("RGB", (40, 40), 18)), "excluded"),  # the repeated key
        (a, long_name, jpeg(noise("RGB", (40, 40), 19)), "kept"),
        (a, f"{a}_20.JPEG", jpeg(noise("L", (40, 40), 20), icc_profile=SRGB_ICC), "kept"),  # L + ICC
        (a, f"{a}_21.JPEG", png(noise("RGB", (48, 40), 21), icc_profile=SRGB_ICC), "kept"),  # RGB + ICC
        (a, f"sub/{a}_40.JPEG", jpeg(noise("RGB", (40, 40), 40)), "kept"),  # in a folder inside the tar
        (a, f"{a}_41.png", png(noise("RGB", (40, 40), 41)), "kept"),  # another extension
        (a, f"{a}_4\n2.JPEG", jpeg(noise("RGB", (40, 40), 42)), "kept"),  # a newline in the name
        (a, f"{b}_2.JPEG", jpeg(noise("RGB", (40, 40), 43)), "excluded"),  # another synset's key, in this tar
        (b, f"{b}_1.JPEG", twin, "dup"),  # the same bytes as n01440764_13 in another synset
    ]
    for wnid, count in ((b, 7), (c, 9), (d, 6)):
        for n in range(2, count + 2):
            rows.append((wnid, f"{wnid}_{n}.JPEG", jpeg(noise("RGB", (40 + n, 36 + n), WNIDS.index(wnid) * 100 + n)),
                         "kept"))
    # the same bytes twice in one tar, the later member first in sorted order (n00005787_10 < _3)
    third = next(i for i, r in enumerate(rows) if r[1] == f"{c}_3.JPEG")
    tenth = next(i for i, r in enumerate(rows) if r[1] == f"{c}_10.JPEG")
    rows[third] = (c, rows[third][1], rows[tenth][2], "dup")
    # n01443537_2 is also n01440764.tar's misplaced member's key: the one in its own synset's tar stays,
    # though n01440764.tar is first in sorted order
    second = next(i for i, r in enumerate(rows) if r[0] == b and r[1] == f"{b}_2.JPEG")
    rows[second] = (*rows[second][:3], "first")
    return rows


def write_spec_raw(root: Path, layout: str = "tars") -> list[tuple[str, str, bytes, str]]:
    """Write the release under `root` (`tars`: <wnid>.tar files; `folders`: <wnid>/ folders, the
    members a tar cannot hold as files (`..`, the repeated key) left out) and words.txt (without
    OTHER_D), gloss.txt."""
    root.mkdir(parents=True, exist_ok=True)
    rows = members()
    # words.txt lacks OTHER_D: its lemma comes from the shipped synset table ("cell")
    (root / "words.txt").write_text("".join(f"{w}\tlemma of {w}, other\n" for w in WNIDS if w != OTHER_D))
    (root / "gloss.txt").write_text("".join(f"{w}\tgloss of {w}\n" for w in WNIDS))
    for wnid in WNIDS:
        mine = [r for r in rows if r[0] == wnid]
        if layout == "tars":
            with tarfile.open(root / f"{wnid}.tar", "w", format=tarfile.GNU_FORMAT,
                              encoding="utf-8", errors="surrogateescape") as tar:
                for _, name, data, _ in mine:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 1_600_000_000, 0o644
                    tar.addfile(info, io.BytesIO(data))
        else:
            folder = root / wnid
            folder.mkdir()
            for _, name, data, _ in mine:
                if name.startswith("../") or (folder / name).exists():
                    continue
                (folder / name).parent.mkdir(exist_ok=True)
                (folder / name).write_bytes(data)
    return rows
