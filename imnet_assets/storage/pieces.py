"""Data never held whole (a file or member too large to be an image, a tar's damage): read PIECE bytes
at a time, each piece let go once counted and hashed. The one size of such a read, and the one reader
that counts and hashes them (the raw folders' files, local and remote, and the eval images over
MAX_DECODED_BYTES); the raw tar walk's pieces are tar_window.pieces, PIECE bytes too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

PIECE = 16 << 20  # bytes per read of data not held whole


def sha256_in_pieces(read: Callable[[int, int], bytes], listed: int | None = None,
                     past_end: bool = True) -> tuple[int, str]:
    """(how many bytes were read, their sha256), read from byte 0 by `read(at, want)` in pieces of at
    most PIECE bytes. `listed` None: to the end (an empty piece). Else to the `listed` size, and with
    `past_end` one byte further (to see that none is there); a piece short of what was asked, or the
    size past `listed`, ends it (the caller compares the size with `listed`)."""
    digest, size = hashlib.sha256(), 0
    while True:
        want = PIECE if listed is None else min(PIECE, listed - size) or int(past_end)
        if not want:
            break
        piece = read(size, want)
        digest.update(piece)
        size += len(piece)
        if not piece or (listed is not None and (len(piece) < want or size > listed)):
            break
    return size, digest.hexdigest()
