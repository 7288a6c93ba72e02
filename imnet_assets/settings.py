"""Every IMNET_* environment variable, read in one place (SPEC: Configuration)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_SHARD_PATTERN = "imagenet12k-train-{shard}.tar"
# Chosen by measurement (bench/encode.py and the README's "WebP settings" section).
DEFAULT_WEBP_QUALITY = 90
DEFAULT_WEBP_METHOD = 4


def test_crash_sha256(env: dict | None = None) -> str | None:
    """Test hook IMNET_TEST_CRASH_SHA256: a source sha256 whose encoding makes the encode worker
    process segfault (core.shard._crash_hook), so tests can give a shard an image that always
    kills its encoder. Never set it in production."""
    return (os.environ if env is None else env).get("IMNET_TEST_CRASH_SHA256") or None


class SettingsError(ValueError):
    """An IMNET_* variable holds a value the project cannot use."""


def _cron(env: dict, name: str, default: str) -> str:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:  # the schedule's own parser, so what passes here is what the schedule accepts
        from dagster._utils.schedules import is_valid_cron_string
    except ImportError:  # moved in another Dagster version: the schedule's definition will say
        return raw
    if not is_valid_cron_string(raw):
        raise SettingsError(f"{name}={raw!r} is not a cron schedule (five fields, e.g. '*/30 * * * *', or @daily)")
    return raw


def _int(env: dict, name: str, default: int, low: int, high: int | None = None) -> int:
    raw = env.get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise SettingsError(f"{name}={value} must be {bound}")
    return value


def _switch(env: dict, name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("on", "1", "true", "yes", "running"):
        return True
    if raw in ("off", "0", "false", "no", "stopped"):
        return False
    raise SettingsError(f"{name}={raw!r} must be on or off")


DEDUP_MODES = ("off", "exact")
ALT_LABEL_MODES = ("", "in1k")


def _choice(env: dict, name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "none") and "" in allowed:
        return ""
    if raw == "":
        return default
    if raw not in allowed:
        raise SettingsError(f"{name}={raw!r} must be one of {', '.join(a for a in allowed if a) or '(none)'}"
                            + (" (or unset)" if "" in allowed else ""))
    return raw


def _root_parts(url: str) -> tuple[str, ...]:
    """A root as comparable path components: ("s3", bucket, *prefix parts) for object storage
    (s3a:// is S3 too), else the local folder after resolving it (relative to the working folder,
    symbolic links followed)."""
    if "://" in url and not url.startswith("file://"):
        scheme, _, rest = url.partition("://")
        scheme = "s3" if scheme in ("s3", "s3a") else scheme
        return (scheme, *[p for p in rest.split("/") if p])
    path = url[len("file://"):] if url.startswith("file://") else url
    return ("file", *[p for p in os.path.realpath(os.path.abspath(path)).split(os.sep) if p])


def check_roots_apart(raw_root: str, out_root: str) -> None:
    """SPEC (Configuration): the out root may not be the raw root, nor inside it, nor contain it
    (shards would be written into the raw release, or the raw release's listing would hold them)."""
    raw, out = _root_parts(raw_root), _root_parts(out_root)
    if raw == out:
        how = "is the raw root"
    elif out[:len(raw)] == raw:
        how = "is inside the raw root"
    elif raw[:len(out)] == out:
        how = "contains the raw root"
    else:
        return
    raise SettingsError(f"IMNET_OUT_ROOT={out_root!r} {how} IMNET_RAW_ROOT={raw_root!r}: shards would be written "
                        "into the raw release; choose an out root outside it")


def parse_holdout(text: str) -> tuple[tuple[str, int], ...]:
    """`validation:2,test:2` -> (("validation", 2), ("test", 2)); the splits take the last shards."""
    splits: list[tuple[str, int]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.partition(":")
        if not sep or not name.strip() or not count.strip().isdecimal() or int(count) < 1:
            raise SettingsError(f"IMNET_HOLDOUT entry {part!r} must look like name:count, e.g. validation:2")
        if name.strip() == "train":
            raise SettingsError("IMNET_HOLDOUT cannot name the 'train' split")
        splits.append((name.strip(), int(count)))
    names = [n for n, _ in splits]
    if len(set(names)) != len(names):
        raise SettingsError(f"IMNET_HOLDOUT names a split twice: {text!r}")
    return tuple(splits)


@dataclass(frozen=True)
class Settings:
    raw_root: str = "data/raw"
    out_root: str = "data/out"
    catalog: str = "data/catalog.duckdb"
    num_shards: int = 1024
    seed: int = 0
    shard_pattern: str = DEFAULT_SHARD_PATTERN
    webp_quality: int = DEFAULT_WEBP_QUALITY
    webp_method: int = DEFAULT_WEBP_METHOD
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    holdout: tuple[tuple[str, int], ...] = ()
    schedule_cron: str = "*/30 * * * *"
    schedule_max_runs: int = 64
    audit_sensor: bool = True
    check_decode_every: int = 16
    index_batch_rows: int = 200_000
    # Beyond the release (issue 17): eval-set decontamination, deduplication, alternative labels.
    eval_exclude: str | None = None  # folder or s3:// prefix of eval images (IMNET_EVAL_EXCLUDE)
    dedup: str = "off"  # off | exact (IMNET_DEDUP)
    alt_labels: str = ""  # "" | in1k (IMNET_ALT_LABELS)
    parallel_shards: int = 0  # shard runs `imnet build` runs at once; 0: chosen from cores and workers

    @classmethod
    def from_env(cls, env: dict | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        pattern = env.get("IMNET_SHARD_PATTERN") or DEFAULT_SHARD_PATTERN
        if "{shard}" not in pattern or "/" in pattern:
            raise SettingsError(
                f"IMNET_SHARD_PATTERN={pattern!r} must contain '{{shard}}' and no '/' (it is a file name)"
            )
        try:
            distinct = pattern.format(shard=shard_key(0)) != pattern.format(shard=shard_key(1))
        except (KeyError, IndexError, ValueError) as e:
            raise SettingsError(
                f"IMNET_SHARD_PATTERN={pattern!r}: {{shard}} must be its only placeholder "
                f"(write other braces as '{{{{' and '}}}}'): {type(e).__name__}: {e}"
            ) from None
        if not distinct:
            raise SettingsError(f"IMNET_SHARD_PATTERN={pattern!r} gives every shard the same file name")
        num_shards = _int(env, "IMNET_NUM_SHARDS", 1024, 1, 9999)
        holdout = parse_holdout(env.get("IMNET_HOLDOUT", ""))
        if sum(n for _, n in holdout) >= num_shards:
            raise SettingsError(
                f"IMNET_HOLDOUT takes {sum(n for _, n in holdout)} shards of {num_shards}; train needs at least one"
            )
        raw_root = (env.get("IMNET_RAW_ROOT") or "data/raw").rstrip("/") or "/"
        out_root = (env.get("IMNET_OUT_ROOT") or "data/out").rstrip("/") or "/"
        check_roots_apart(raw_root, out_root)
        return cls(
            raw_root=raw_root,
            out_root=out_root,
            catalog=env.get("IMNET_CATALOG") or "data/catalog.duckdb",
            num_shards=num_shards,
            seed=_int(env, "IMNET_SEED", 0, 0),
            shard_pattern=pattern,
            webp_quality=_int(env, "IMNET_WEBP_QUALITY", DEFAULT_WEBP_QUALITY, 0, 100),
            webp_method=_int(env, "IMNET_WEBP_METHOD", DEFAULT_WEBP_METHOD, 0, 6),
            workers=_int(env, "IMNET_WORKERS", os.cpu_count() or 1, 1),
            holdout=holdout,
            schedule_cron=_cron(env, "IMNET_SCHEDULE_CRON", "*/30 * * * *"),
            schedule_max_runs=_int(env, "IMNET_SCHEDULE_MAX_RUNS", 64, 1),
            audit_sensor=_switch(env, "IMNET_AUDIT_SENSOR", True),
            check_decode_every=_int(env, "IMNET_CHECK_DECODE_EVERY", 16, 0),
            index_batch_rows=_int(env, "IMNET_INDEX_BATCH_ROWS", 200_000, 1),
            eval_exclude=(env.get("IMNET_EVAL_EXCLUDE") or "").strip().rstrip("/") or None,
            dedup=_choice(env, "IMNET_DEDUP", "off", DEDUP_MODES),
            alt_labels=_choice(env, "IMNET_ALT_LABELS", "", ALT_LABEL_MODES),
            parallel_shards=_int(env, "IMNET_PARALLEL_SHARDS", 0, 0),
        )

    @property
    def partition_keys(self) -> list[str]:
        return [shard_key(i) for i in range(self.num_shards)]

    def shard_name(self, key: str) -> str:
        return self.shard_pattern.format(shard=key)


def shard_key(index: int) -> str:
    return f"{index:04d}"
