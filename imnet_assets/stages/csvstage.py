"""Rows handed to DuckDB as a temporary CSV file (fast bulk loads without pandas or Arrow)."""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from collections.abc import Iterable, Iterator

from imnet_assets.storage import atomic


@contextlib.contextmanager
def staged_csv(columns: list[str], rows: Iterable[tuple]) -> Iterator[str]:
    fd, path = tempfile.mkstemp(prefix="imnet-", suffix=".csv")
    try:
        f = os.fdopen(fd, "w", newline="")
        with atomic.removed_on_error(f, path, path), f:  # a full TMPDIR names the file
            w = csv.writer(f, lineterminator="\n")
            w.writerow(columns)
            w.writerows(rows)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
