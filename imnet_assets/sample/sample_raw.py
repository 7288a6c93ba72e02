"""A small synthetic raw ImageNet Winter21 release, with the quirks the real one has.

`write_sample_raw(root)` writes `root/<wnid>.tar` per synset, each holding `<wnid>_<n>.JPEG`
members (plain POSIX ustar, no folders), plus `root/words.txt` and `root/gloss.txt`; with
`layout="folders"` the same files extracted, `root/<wnid>/<wnid>_<n>.JPEG`. Most members
are ordinary RGB JPEG photos; the first slots of the synsets hold the quirks (CMYK, greyscale,
PNG/GIF bytes named .JPEG, truncated, tiny, large and huge, EXIF with GPS, XMP, ICC, EXIF
orientation, undecodable, empty, 1-bit, 16-bit grey), spread round-robin over the synsets, so any
call with `synsets >= 2` and `images >= 20` carries every one of them (`QUIRK_NAMES`).

Everything is deterministic: the same arguments give byte-identical files. Each image is drawn
from its own random stream (seed, synset index, slot), so it does not depend on the others.

Like the real `words.txt`/`gloss.txt` (which cover all of WordNet), the two text files also list
a couple of wnids that have no tar; the synsets of the release are the tars.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

from imnet_assets.sample.photos import imagenet_size_mix, make_photo

__all__ = ["QUIRK_NAMES", "SampleSummary", "write_sample_raw"]

# Fixed tar header fields (2011-10-14, around when the fall11 release was cut).
TAR_MTIME = 1318550400
TAR_MODE = 0o644
# Range of real wnids (n01440764 ... n15102894).
_WNID_LO, _WNID_HI = 1_440_764, 15_102_894
# Image numbers inside a synset, like n01440764_10026.
_MEMBER_N_MAX = 60_000
# Extra wnids listed in words.txt / gloss.txt with no tar (as in the real files).
_EXTRA_WORDS = 2


@dataclass
class SampleSummary:
    """What `write_sample_raw` wrote."""

    root: Path
    wnids: list[str]
    num_members: int
    quirks: dict[str, list[str]]
    # wnid -> member names, in tar order.
    members: dict[str, list[str]] = field(default_factory=dict)
    total_bytes: int = 0
    # kind -> the hostile member name given to an ordinary photo (see HOSTILE_NAMES)
    hostile: dict[str, str] = field(default_factory=dict)
    layout: str = "tars"  # or "folders": root/<wnid>/<name> (members: the file paths in each folder)

    @property
    def total_members(self) -> int:
        return self.num_members

    @property
    def tars(self) -> list[Path]:
        return [self.root / f"{w}.tar" for w in self.wnids]

    @property
    def sources(self) -> list[Path]:
        """Each synset's tar, or its folder in the folders layout."""
        return [self.root / w for w in self.wnids] if self.layout == "folders" else self.tars


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    kw.setdefault("quality", 90)
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _srgb_icc() -> bytes:
    """An sRGB ICC profile with a fixed creation date (LittleCMS stamps the current time)."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    # Header bytes 24..36: dateTimeNumber (year, month, day, hours, minutes, seconds; uint16 BE).
    data[24:36] = b"".join(v.to_bytes(2, "big") for v in (2011, 10, 14, 0, 0, 0))
    return bytes(data)


def _normal(g: np.random.Generator) -> bytes:
    """An ordinary member: an RGB photo of an ImageNet-like size, as a typical Flickr JPEG."""
    w, h = imagenet_size_mix(g)
    img = make_photo(w, h, g)
    quality = int(g.choice([85, 88, 90, 90, 90, 92, 95]))
    subsampling = 0 if g.random() < 0.3 else 2  # 4:4:4 or 4:2:0
    progressive = bool(g.random() < 0.15)
    return _jpeg(img, quality=quality, subsampling=subsampling, progressive=progressive)


def _photo(g: np.random.Generator, w: int = 500, h: int = 375) -> Image.Image:
    return make_photo(w, h, g)


def _q_cmyk(g):
    return _jpeg(_photo(g).convert("CMYK"))


def _q_grey(g):
    return _jpeg(_photo(g, 500, 333).convert("L"))


def _q_rgba_png(g):
    img = _photo(g, 320, 240)
    yy, xx = np.mgrid[0:240, 0:320]
    d = ((xx - 160) / 150.0) ** 2 + ((yy - 120) / 110.0) ** 2
    alpha = np.clip((1.2 - d) * 255, 0, 255).astype(np.uint8)
    img.putalpha(Image.fromarray(alpha, mode="L"))
    return _png(img)


def _q_palette_png(g):
    img = _photo(g, 300, 225).quantize(colors=64, method=Image.Quantize.FASTOCTREE)
    arr = np.asarray(img).copy()
    arr[:40, :60] = 0  # a transparent corner
    out = Image.fromarray(arr, mode="P")
    out.putpalette(img.getpalette())
    return _png(out, transparency=0)


def _q_gif(g):
    img = _photo(g, 320, 240).quantize(colors=128, method=Image.Quantize.FASTOCTREE)
    buf = io.BytesIO()
    img.save(buf, "GIF")
    return buf.getvalue()


def _q_truncated(g):
    data = _jpeg(_photo(g))
    return data[: int(len(data) * 0.6)]


def _q_tiny_thin(g):
    return _jpeg(_photo(g, 20, 300))


def _q_tiny_square(g):
    return _jpeg(_photo(g, 24, 24))


def _q_large(g):
    return _jpeg(_photo(g, 1280, 960))


def _q_huge(g):
    # Drawn at a quarter of the size and upscaled: fast, and soft like many huge uploads.
    img = _photo(g, 800, 1000).resize((3200, 4000), Image.BILINEAR)
    return _jpeg(img, quality=85)


def _exif_camera() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "Canon"  # Make
    exif[0x0110] = "Canon EOS 5D Mark II"  # Model
    exif[0x0131] = "Adobe Photoshop Lightroom 3.5"  # Software
    exif[0x0132] = "2011:06:12 14:03:21"  # DateTime
    exif_ifd = exif.get_ifd(0x8769)
    exif_ifd[0xA001] = 1  # ColorSpace = sRGB
    exif_ifd[0x9003] = "2011:06:12 14:03:21"  # DateTimeOriginal
    exif_ifd[0x829A] = 1 / 250  # ExposureTime
    exif_ifd[0x8827] = 200  # ISOSpeedRatings
    return exif


def _q_exif_gps(g):
    exif = _exif_camera()
    gps = exif.get_ifd(0x8825)
    gps[0x0000] = b"\x02\x02\x00\x00"  # GPSVersionID
    gps[0x0001] = "N"  # GPSLatitudeRef
    gps[0x0002] = (52.0, 31.0, 12.34)  # GPSLatitude
    gps[0x0003] = "E"  # GPSLongitudeRef
    gps[0x0004] = (13.0, 24.0, 5.67)  # GPSLongitude
    gps[0x0006] = 34.5  # GPSAltitude
    return _jpeg(_photo(g), exif=exif.tobytes())


_XMP = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0">\n'
    ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
    '  <rdf:Description rdf:about=""\n'
    '    xmlns:dc="http://purl.org/dc/elements/1.1/"\n'
    '    xmlns:xmp="http://ns.adobe.com/xap/1.0/"\n'
    '    xmlns:exif="http://ns.adobe.com/exif/1.0/"\n'
    '   xmp:CreatorTool="Adobe Photoshop Lightroom 3.5"\n'
    '   exif:GPSLatitude="52,31.2057N" exif:GPSLongitude="13,24.0945E">\n'
    "   <dc:creator><rdf:Seq><rdf:li>A. Photographer</rdf:li></rdf:Seq></dc:creator>\n"
    '   <dc:rights><rdf:Alt><rdf:li xml:lang="x-default">All rights reserved</rdf:li></rdf:Alt></dc:rights>\n'
    "  </rdf:Description>\n"
    " </rdf:RDF>\n"
    "</x:xmpmeta>\n"
    '<?xpacket end="w"?>'
).encode("utf-8")


def _q_xmp(g):
    return _jpeg(_photo(g), xmp=_XMP)


def _q_icc(g):
    return _jpeg(_photo(g), icc_profile=_srgb_icc())


def _q_orientation(value: int) -> Callable[[np.random.Generator], bytes]:
    def make(g):
        exif = _exif_camera()
        exif[0x0112] = value
        return _jpeg(_photo(g), exif=exif.tobytes())

    return make


def _q_undecodable_jpeg(g):
    # A JFIF header (SOI + APP0), then garbage with no 0xFF byte, so no further marker is found.
    head = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return head + g.integers(0, 255, 4096, dtype=np.uint8).tobytes()


def _q_undecodable_text(g):
    return (
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
        b"<body><h1>Not Found</h1><p>The requested photo is no longer available.</p></body></html>\n"
    )


def _q_empty(g):
    return b""


def _q_one_bit(g):
    return _png(_photo(g, 400, 300).convert("1"))


def _q_grey16(g):
    grey = np.asarray(_photo(g, 400, 300).convert("L"), dtype=np.uint16)
    arr = grey * 257 + g.integers(0, 256, grey.shape, dtype=np.uint16)
    return _png(Image.fromarray(arr.astype(np.uint16)))


# Quirk slots in priority order: (quirk names the member is listed under, maker).
QUIRK_SLOTS: list[tuple[tuple[str, ...], Callable[[np.random.Generator], bytes]]] = [
    (("cmyk",), _q_cmyk),
    (("grey",), _q_grey),
    (("png_as_jpeg",), _q_rgba_png),
    (("palette_png",), _q_palette_png),
    (("gif_as_jpeg",), _q_gif),
    (("truncated",), _q_truncated),
    (("tiny",), _q_tiny_thin),
    (("tiny",), _q_tiny_square),
    (("large",), _q_large),
    (("large", "huge"), _q_huge),
    (("exif_gps",), _q_exif_gps),
    (("xmp",), _q_xmp),
    (("icc",), _q_icc),
    (("orientation",), _q_orientation(6)),
    (("orientation_8",), _q_orientation(8)),
    (("undecodable",), _q_undecodable_jpeg),
    (("undecodable",), _q_undecodable_text),
    (("empty",), _q_empty),
    (("one_bit",), _q_one_bit),
    (("grey16",), _q_grey16),
]
QUIRK_NAMES: tuple[str, ...] = tuple(dict.fromkeys(n for names, _ in QUIRK_SLOTS for n in names))


# Member names no stage may crash on (SPEC: Output), each given to one ordinary photo, taken from
# the last slots of the synsets round-robin. `{n}` is the member's usual name, `{wnid}` its synset.
# A name that is not UTF-8 is written as its raw bytes (surrogate escapes); a long one with a GNU
# long-name header, the way GNU tar stores it.
HOSTILE_NAMES: list[tuple[str, str]] = [
    ("not_utf8", "{wnid}_caf\udce9-\udcff.JPEG"),
    ("long", "{wnid}_" + "very_long_name_" * 8 + "{num}.JPEG"),
    ("folder", "images/train/{n}"),
    ("dotdot", "../{n}"),
    ("absolute", "/tmp/{n}"),
    ("newline", "{wnid}_{num}\nsecond line.JPEG"),
    ("dot_in_stem", "{wnid}_{num}.v2.JPEG"),
    ("repeated_key", "again/{first}"),
    ("lower_case_ext", "{wnid}_{num}.jpeg"),
]


def _hostile_name(kind_index: int, name: str, wnid: str, num: int, first: str) -> str:
    return HOSTILE_NAMES[kind_index][1].format(n=name, wnid=wnid, num=num, first=first)


# --------------------------------------------------------------------------------------------
# Release
# --------------------------------------------------------------------------------------------


def _rng(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, *path]))


def _make_wnids(n: int, seed: int) -> list[str]:
    g = _rng(seed, 0)
    picks = g.choice(_WNID_HI - _WNID_LO + 1, size=n, replace=False) + _WNID_LO
    return [f"n{int(v):08d}" for v in sorted(picks.tolist())]


_SYLLABLES = (
    "ka", "lo", "mi", "ren", "to", "sa", "vel", "no", "ri", "an", "pel", "ur", "os", "ti", "ba",
    "mar", "quo", "de", "fin", "la", "zor", "ek", "hu", "ne",
)  # fmt: skip


def _word(g: np.random.Generator) -> str:
    return "".join(g.choice(_SYLLABLES, size=int(g.integers(2, 4))).tolist())


def _lemma_and_gloss(g: np.random.Generator) -> tuple[str, str]:
    words = [_word(g) for _ in range(int(g.integers(1, 4)))]
    if g.random() < 0.3:
        words.append(f"{words[0].capitalize()} {_word(g)}")  # a Latin-style binomial
    lemma = ", ".join(words)
    gloss = f'a synthetic {_word(g)} of the {_word(g)} family; often "{words[0]}" in the field'
    return lemma, gloss


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.type = tarfile.REGTYPE
    return info


LAYOUTS = ("tars", "folders")


def _fits_a_folder(name: str) -> bool:
    """Whether a member name can be a file inside a synset folder (not absolute, no `..`)."""
    parts = name.split("/")
    return not name.startswith("/") and ".." not in parts and "" not in parts and "." not in parts


def _write_folder(root: Path, wnid: str, members: list[tuple[str, bytes]]) -> int:
    """`root/<wnid>/<name>` per member (subfolders as the names say), written beside it under a
    hidden name and moved into place whole. Returns the bytes written."""
    final = root / wnid
    tmp = root / f".{wnid}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    for name, data in members:
        path = tmp.joinpath(*name.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (TAR_MTIME, TAR_MTIME))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return sum(len(d) for _, d in members)


def write_sample_raw(root: str | Path, synsets: int = 6, images: int = 40, seed: int = 0,
                     hostile_names: bool = True, layout: str = "tars") -> SampleSummary:
    """Write a synthetic raw release of `synsets` tars with `images` members each under `root`.

    `layout="folders"`: the extracted layout instead, `root/<wnid>/<name>` per member, with the
    same files as the tars hold, except that a hostile name no file inside a folder can have (an
    absolute name, `..`) is not given: that photo keeps its ordinary name.

    Quirk slot i goes to synset `i % synsets`, slot `i // synsets` (the first slots), so the
    quirks are spread over the synsets and all present whenever `synsets * images` leaves room
    (always for `synsets >= 2, images >= 20`); the other slots are ordinary JPEG photos.
    With `hostile_names`, ordinary photos in the last slots get the names of HOSTILE_NAMES (one
    each, round-robin over the synsets, when there is room after the quirk slots).
    Existing files with the same names are replaced; other files in `root` are left alone.
    """
    if synsets < 1 or images < 1:
        raise ValueError(f"synsets and images must be positive, got {synsets} and {images}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    all_ids = _make_wnids(synsets + _EXTRA_WORDS, seed)
    g_extra = _rng(seed, 1)
    extra = set(g_extra.choice(all_ids, size=_EXTRA_WORDS, replace=False).tolist())
    wnids = [w for w in all_ids if w not in extra]

    quirks: dict[str, list[str]] = {}
    members: dict[str, list[str]] = {}
    hostile: dict[str, str] = {}
    quirk_rows = -(-len(QUIRK_SLOTS) // synsets)  # slots per synset that quirks may take
    total_bytes = 0
    for si, wnid in enumerate(wnids):
        g_names = _rng(seed, 2, si)
        pool = max(_MEMBER_N_MAX, 2 * images)
        numbers = np.sort(g_names.choice(pool, size=images, replace=False) + 1).tolist()
        names_in_tar: list[str] = []
        written: list[tuple[str, bytes]] = []
        for slot, n in enumerate(numbers):
            name = f"{wnid}_{n}.JPEG"
            g = _rng(seed, 3, si, slot)
            qi = slot * synsets + si
            hi = (images - 1 - slot) * synsets + si  # hostile names from the last slot back
            if hostile_names and hi < len(HOSTILE_NAMES) and slot >= max(quirk_rows, 1):
                odd = _hostile_name(hi, name, wnid, n, names_in_tar[0])
                if layout == "tars" or _fits_a_folder(odd):
                    name = odd
                    hostile[HOSTILE_NAMES[hi][0]] = name
            if qi < len(QUIRK_SLOTS):
                quirk_names, maker = QUIRK_SLOTS[qi]
                data = maker(g)
                for q in quirk_names:
                    quirks.setdefault(q, []).append(name)
            else:
                data = _normal(g)
            written.append((name, data))
            names_in_tar.append(name)
        if layout == "folders":
            total_bytes += _write_folder(root, wnid, written)
        else:
            final = root / f"{wnid}.tar"
            tmp = final.with_name(final.name + ".tmp")
            with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for name, data in written:
                    # A name too long for ustar gets a GNU long-name header (as GNU tar writes it);
                    # every other member stays plain ustar.
                    tf.format = tarfile.GNU_FORMAT if len(name.encode("utf-8", "surrogateescape")) > 100 \
                        else tarfile.USTAR_FORMAT
                    tf.addfile(_tar_info(name, len(data)), io.BytesIO(data))
            os.replace(tmp, final)
            total_bytes += final.stat().st_size
        members[wnid] = names_in_tar

    g_words = _rng(seed, 4)
    words, glosses = [], []
    for wnid in all_ids:
        lemma, gloss = _lemma_and_gloss(g_words)
        words.append(f"{wnid}\t{lemma}\n")
        glosses.append(f"{wnid}\t{gloss}\n")
    _write_atomic(root / "words.txt", "".join(words).encode("utf-8"))
    _write_atomic(root / "gloss.txt", "".join(glosses).encode("utf-8"))

    return SampleSummary(
        root=root,
        wnids=wnids,
        num_members=synsets * images,
        quirks=quirks,
        members=members,
        total_bytes=total_bytes,
        hostile=hostile,
        layout=layout,
    )
