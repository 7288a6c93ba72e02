"""What the walks of a tar (storage/rawtar.py; storage/compressed_tar.py, a compressed one read
forward) say of what in it is no readable regular file: `Damage`, and its wording, once for both."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Damage:
    """Something in a tar that is not a readable regular file: recorded, never dropped silently."""

    name: str  # the member name, or "" when the damage is not a member (a broken tail)
    offset: int
    size: int
    reason: str


def unreadable_tail(expected: int, end: int, label: str, what: str) -> Damage:
    """The bytes [expected, end) after a tar's last member are not zero padding."""
    cause = "not a tar" if expected == 0 else "a header cut short or damaged"
    return Damage("", expected, end - expected, f"truncated or damaged {what} {label}: {end - expected} unreadable "
                                                f"bytes from byte {expected} ({cause})")


def no_end_blocks(end: int, label: str, what: str) -> Damage:
    """A tar that ends at byte `end`, right after a member, without its end-of-archive blocks."""
    return Damage("", end, 0, f"truncated {what} {label}: ends at byte {end} without the end-of-archive blocks "
                              "(cut at a member boundary: members after it, if any, are lost)")


def damaged_header(expected: int, at: int, label: str, what: str) -> Damage:
    """The stretch [expected, at) a walk stepped over to the next header holds more than zeros."""
    return Damage("", expected, at - expected, f"damaged {what} {label}: {at - expected} unreadable bytes skipped at "
                                               f"byte {expected} (a damaged header; the member there is lost)")


def non_regular(info: tarfile.TarInfo) -> str | None:
    """What a member that holds no regular file's data is (a symlink, a sparse file ...); None for a
    regular file."""
    if info.isreg() and not info.isdir() and not info.issparse():
        return None
    return ("symlink" if info.issym() else "hard link" if info.islnk() else "sparse file" if info.issparse() else
            "directory with data" if info.isdir() else "special file")
