"""A sample as shard members: `<key>.cls`, `<key>.json`, then the stored image (`<key>.webp`, or
`<key>.jpg` for a release with codec "jpeg"), in pax format (plain ustar headers for ordinary names,
from a template: byte for byte tarfile's), with fixed member metadata, so that the same input gives
the same bytes in every worker."""

from __future__ import annotations

import json
import tarfile

from imnet_assets.release.altlabels import sample_fields
from imnet_assets.release.plan import SliceRow

TAR_FORMAT = tarfile.PAX_FORMAT  # ustar headers for ordinary names; a pax record for long / non-ASCII keys


TAR_ENCODING = "utf-8"


def _tar_member(name: str, payload: bytes) -> list[bytes]:
    header = _ustar_header(name, len(payload)) or _tarinfo(name, len(payload)).tobuf(
        TAR_FORMAT, TAR_ENCODING, "surrogateescape")
    pad = -len(payload) % tarfile.BLOCKSIZE
    return [header, payload, tarfile.NUL * pad] if pad else [header, payload]


def _ustar_header(name: str, size: int) -> bytes | None:
    """The header tarfile writes for a member `_tarinfo(name, size)` when it needs no pax record
    (an ASCII name of at most 100 characters, a size below 8 GiB), byte for byte, built from a
    template (tarfile's TarInfo.tobuf costs 60 us a member: 0.6% of the encode); None otherwise."""
    if len(name) > 100 or not name.isascii() or "\0" in name or size >= 8 ** 11:
        return None
    head = b"".join((name.encode("ascii").ljust(100, b"\0"), _USTAR_TEMPLATE[100:124], b"%011o\0" % size,
                     _USTAR_TEMPLATE[136:]))
    # tarfile's checksum: the sum of the header's bytes with the checksum field as 8 spaces (the
    # template's), written as 6 octal digits and a NUL, the field's last space kept
    return b"".join((head[:148], b"%06o\0" % sum(head), head[155:]))


def sample_bytes(row: SliceRow, enc, alt_labels: str = "", ext: str = "webp") -> bytes:
    """One sample's three tar members, headers and padding included: what tarfile writes for them."""
    return b"".join(part for name, payload in sample_members(row, enc, alt_labels, ext)
                    for part in _tar_member(name, payload))


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


_USTAR_TEMPLATE = b"".join((  # _tarinfo("", 0)'s header with its checksum field as 8 spaces
    _tarinfo("", 0).tobuf(TAR_FORMAT, TAR_ENCODING, "surrogateescape")[:148], b" " * 8,
    _tarinfo("", 0).tobuf(TAR_FORMAT, TAR_ENCODING, "surrogateescape")[156:]))


def sample_members(row: SliceRow, enc, alt_labels: str = "", ext: str = "webp") -> list[tuple[str, bytes]]:
    """The three members of one sample, in the order they are written (`ext`: the stored image's,
    EncodeSettings.extension)."""
    meta = {
        "filename": f"{row.wnid}/{row.key}.JPEG",
        "label": row.label,
        "class_name": row.wnid,
        "width": enc.width,
        "height": enc.height,
        "orig_width": enc.orig_width,
        "orig_height": enc.orig_height,
        "source_sha256": row.sha256,
        **sample_fields(row.wnid, alt_labels),  # issue 17: label_in1k under IMNET_ALT_LABELS=in1k
    }
    return [
        (f"{row.key}.cls", str(row.label).encode("ascii")),
        (f"{row.key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")),
        (f"{row.key}.{ext}", enc.webp),
    ]
