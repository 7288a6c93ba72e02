"""The benchmarks' printed tables: measure, value (median and range over rounds), goal, met."""

from __future__ import annotations

import statistics


def spread(values: list[float], digits: int = 2) -> str:
    """Median, and the range over rounds when there is more than one."""
    med = statistics.median(values)
    if len(values) < 2:
        return f"{med:,.{digits}f}"
    return f"{med:,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def met(ok: bool) -> str:
    return "yes" if ok else "NO"


def print_table(title: str, rows: list[list[str]], head: list[str] | None = None) -> None:
    head = head or ["measure", "value", "goal", "met"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print(f"\n{title}")
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
