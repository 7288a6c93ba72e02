"""What every asset module shares: the group name and a logger adapter."""

from __future__ import annotations

from dagster import AssetExecutionContext, MetadataValue, TableRecord, TableSchema

from imnet_assets.defs.release_keys import SHARED_GROUP
from imnet_assets.storage.fs import redact

GROUP = SHARED_GROUP  # the shared stages' group


def logger(context: AssetExecutionContext):
    return lambda msg: context.log.info(redact(msg))


def plain(value):
    """Metadata-safe values (Dagster metadata wants str/int/float/bool)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


MAX_TABLE_ROWS = 1024


def table(rows: list[dict], schema: TableSchema) -> MetadataValue:
    """A metadata table with an explicit schema: the UI shows typed columns, and an empty table (a
    release with no exclusions) is still valid metadata (Dagster cannot infer a schema from no
    records, and refuses the table)."""
    names = [c.name for c in schema.columns]
    records = [
        TableRecord({n: ("" if row.get(n) is None else row[n]) for n in names}) for row in rows[:MAX_TABLE_ROWS]
    ]
    return MetadataValue.table(records, schema=schema)


def human_bytes(n: int | float | None) -> str:
    """1288490189 -> "1.2 GiB" (binary units, as `ls -h` and S3 consoles show sizes)."""
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def reason_counts(counts: dict[str, int]) -> str:
    """{"decode": 2, "too_small": 1} -> "decode: 2, too_small: 1" (most first)."""
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
