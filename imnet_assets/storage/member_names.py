"""A raw member's name as a sample key (hostile names get safe, distinct keys) and as printable text
for the catalog and logs, with its exact inverse."""

from __future__ import annotations

import hashlib
import re

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
MAX_KEY_CHARS = 64  # a key's ".webp" member name always fits a plain ustar name field (100 bytes)


def member_key(name: str) -> tuple[str | None, str | None]:
    """The sample key for a member name, or (None, reason) when the name is unsafe.

    `n01440764_10026.JPEG` (or `.jpeg`, or `folder/n01440764_10026.JPEG`) -> `n01440764_10026`:
    the stem of the last path part. Absolute names and names with `..` are refused. A stem that is
    not plain ASCII letters, digits, `_` and `-` (a dot inside it, spaces, newlines, bytes that are
    not UTF-8, which tar readers hand over as surrogate escapes), or is longer than MAX_KEY_CHARS,
    is sanitized: each other character becomes `_`, it is cut to length, and a digest of the whole
    raw name is appended, so that two names sanitized alike still get two keys. Keys hold no dot,
    so webdataset splits `<key>.<ext>` where the shard writer put it.
    """
    if not name or name.startswith("/") or "\\" in name:
        return None, f"unsafe member name: absolute or not POSIX ({printable_name(name)!r})"
    parts = name.split("/")
    if ".." in parts:
        return None, f"unsafe member name: contains '..' ({printable_name(name)!r})"
    base = parts[-1]
    stem = base.rsplit(".", 1)[0] if "." in base else base
    key = _KEY_UNSAFE.sub("_", stem)
    if not key.strip("_"):
        return None, f"unusable member name: gives no key ({printable_name(name)!r})"
    if key != stem or len(key) > MAX_KEY_CHARS:
        digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        key = f"{key[: MAX_KEY_CHARS - 14]}_h{digest}"
    return key, None


def stem_keys(stem: str) -> tuple[str, str] | None:
    """The keys `member_key` gives a member whose last path part's stem is `stem`, whatever its folder
    and extension, as a range (lowest, highest; both included): the stem alone when it is a key as it
    stands; else every key that begins with its sanitized, cut form and "_h" (a digest of the whole
    name follows, in hex). None: such a member gets no key (its row is keyed by where it is). A
    name the stem does not show may be refused all the same (absolute, `..` or a backslash in it)."""
    key = _KEY_UNSAFE.sub("_", stem)
    if not key.strip("_"):
        return None
    if key == stem and len(key) <= MAX_KEY_CHARS:
        return key, key
    prefix = f"{key[: MAX_KEY_CHARS - 14]}_h"
    return prefix, prefix + "\x7f"  # keys are ASCII: all that follows the prefix sorts below DEL


def printable_name(name: str) -> str:
    """A member name as valid, printable UTF-8 (for the catalog, CSV staging and logs): bytes that
    are not UTF-8 and control characters (a newline in a name) become backslash escapes."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ESCAPE = re.compile(r"\\x([0-9a-f]{2})")


def raw_name(printable: str) -> str:
    """The name `printable_name` made `printable` from (surrogate escapes for bytes that are not
    UTF-8). Exact for every name that gives a key: `member_key` refuses names holding a backslash,
    so each `\\xNN` in theirs is one of printable_name's escapes (the folder layout reads a file
    by the name its images row holds, storage/rawfolders.py)."""
    def one(m: re.Match) -> str:
        n = int(m.group(1), 16)
        return chr(n) if n < 0x80 else chr(0xDC00 + n)

    return _ESCAPE.sub(one, printable)
