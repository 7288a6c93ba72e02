"""What every asset module shares: the group name and a logger adapter."""

from __future__ import annotations

from dagster import AssetExecutionContext

from ..core.fs import redact

GROUP = "imagenet_w21"


def logger(context: AssetExecutionContext):
    return lambda msg: context.log.info(redact(msg))


def plain(value):
    """Metadata-safe values (Dagster metadata wants str/int/float/bool)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value
