"""Every IMNET_* variable, declared and read in one place (SPEC: Configuration).

Where settings come from: the process environment, over a `.env` file at the project root (the
file Dagster's `dagster dev` and `dg` load). The project root is IMNET_PROJECT_ROOT when set; else
the first folder holding a `pyproject.toml` of imnet-assets, looking up from the current folder,
then up from this package's own folder (an editable install, or a virtual environment inside the
project); else the current folder. Relative local paths resolve against it, so every command
sees the same files from whatever folder it runs.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SHARD_PATTERN = "imagenet12k-train-{shard}.tar"
# Chosen by measurement (bench/encode.py and the README's "WebP settings" section).
DEFAULT_WEBP_QUALITY = 90
DEFAULT_WEBP_METHOD = 4


CRASH_EVERY = "*"  # IMNET_TEST_CRASH_SHA256=* : every encode crashes (a codec broken for every input)


def test_crash_sha256(env: dict | None = None) -> str | None:
    """Test hook IMNET_TEST_CRASH_SHA256: a source sha256 whose encoding makes the encode worker
    process segfault (stages/crash_control.crash_hook), so tests can give a shard an image that
    always kills its encoder; `*` (CRASH_EVERY): every encode in a pool worker segfaults, the
    known-good control image's included (a codec library broken for every input, which must fail
    the shard run, never exclude every image). Never set it in production."""
    return (os.environ if env is None else env).get("IMNET_TEST_CRASH_SHA256") or None


def crash_hook_hits(hook: str | None, sha256: str) -> bool:
    """Whether the test hook's value `hook` (test_crash_sha256) crashes the encode of `sha256`."""
    return hook is not None and hook in (sha256, CRASH_EVERY)


# IMNET_TEST_INDEX_FAULT's faults (image/faults.py); the `-phash` ones are met in the pHash (raw and eval images),
# crash-repair in the repair decode (image/decode.py)
INDEX_FAULTS = ("crash", "memory-probe", "memory-phash", "hang", "slow", "crash-phash", "hang-phash", "slow-phash",
                "crash-repair")


def test_index_fault(env: dict | None = None) -> str | None:
    """Test hook IMNET_TEST_INDEX_FAULT=<fault>:<sha256> (or `<fault>:*`: every image, the known-good
    control images included): the index's scan worker, or the eval set's hashing worker, meets that
    fault on the raw or eval image of that sha256 (image/faults.py: a real SIGSEGV, a MemoryError
    raised inside the probe or the pHash, a hang, a pause). Only ever in a pool worker process.
    Never set it in production."""
    value = (os.environ if env is None else env).get("IMNET_TEST_INDEX_FAULT") or None
    if value is not None and value.partition(":")[0] not in INDEX_FAULTS:
        raise SettingsError(f"IMNET_TEST_INDEX_FAULT={value!r}: expected <fault>:<sha256 or *>, the fault one of "
                            f"{', '.join(INDEX_FAULTS)}")
    return value


class SettingsError(ValueError):
    """An IMNET_* variable holds a value the project cannot use."""


# Every IMNET_* name the project reads: an IMNET_* name in the environment or `.env` that is not
# here is a mistake (SettingsError naming the closest of these). A new variable is declared here.
VARIABLES: dict[str, str] = {
    "IMNET_RAW_ROOT": "folder or s3:// prefix holding the raw release",
    "IMNET_OUT_ROOT": "folder or s3:// prefix for shards, _info.json, the card and classes.tsv",
    "IMNET_CATALOG": "the DuckDB catalog file",
    "IMNET_NUM_SHARDS": "number of shards = partitions",
    "IMNET_SEED": "shuffle seed",
    "IMNET_SHARD_PATTERN": "shard file name; {shard} is the partition key",
    "IMNET_WEBP_QUALITY": "WebP quality",
    "IMNET_WEBP_METHOD": "WebP method",
    "IMNET_WORKERS": "encode processes inside one shard run",
    "IMNET_HOLDOUT": "shard-level splits taken from the last shards",
    "IMNET_SCHEDULE_CRON": "the top-up schedule's cron",
    "IMNET_SCHEDULE_MAX_RUNS": "runs the top-up schedule requests per tick",
    "IMNET_AUDIT_SENSOR": "whether the audit sensor starts running",
    "IMNET_CHECK_DECODE_EVERY": "the shard check decodes every n-th sample",
    "IMNET_INDEX_BATCH_ROWS": "index rows per catalog transaction",
    "IMNET_EVAL_EXCLUDE": "folder or s3:// prefix of evaluation images to exclude",
    "IMNET_DEDUP": "off or exact",
    "IMNET_ALT_LABELS": "alternative labels (in1k)",
    "IMNET_PARALLEL_SHARDS": "shard runs `imnet build` runs at once",
    "IMNET_STORAGE_RETRY_SECONDS": "how long throttled or broken storage requests are retried before a run fails",
    "IMNET_IMAGE_TIMEOUT": "seconds one image may take its encode worker before the worker is killed",
    "IMNET_PROJECT_ROOT": "the folder holding .env, against which relative paths resolve",
    "IMNET_TEST_CRASH_SHA256": "test hook: a source sha256 whose encoding crashes its worker (`*`: every encode)",
    "IMNET_TEST_INDEX_FAULT": "test hook: `<fault>:<sha256>`, a fault the index's scan worker meets on that image",
    "IMNET_RELEASES": "a TOML file of [release.<name>] tables: many releases from one index",
    "IMNET_STAGE_ENCODES": "auto, on or off: the index encodes each image for the releases as it reads it",
}
ENV_FILE = ".env"
PROJECT_NAME = "imnet-assets"  # [project] name in the pyproject.toml that marks the project root


def _is_project_root(folder: Path) -> bool:
    pyproject = folder / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return False
    try:
        import tomllib
    except ImportError:  # Python 3.10: Dagster's dependency
        import tomli as tomllib
    try:
        return tomllib.loads(text).get("project", {}).get("name") == PROJECT_NAME
    except (tomllib.TOMLDecodeError, AttributeError):
        return False


def project_root(environ: dict | None = None) -> Path:
    """The project root (see the module's docstring)."""
    given = (os.environ if environ is None else environ).get("IMNET_PROJECT_ROOT", "").strip()
    if given:
        return Path(given).expanduser().resolve()
    cwd = Path.cwd()
    for start in (cwd, Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            if _is_project_root(folder):
                return folder
    return cwd


def env_file(root: Path | None = None) -> Path:
    return (project_root() if root is None else root) / ENV_FILE


def read_env_file(path: Path) -> dict[str, str]:
    """The variables a `.env` file sets (python-dotenv's parser, as Dagster's tools use)."""
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def environment(root: Path | None = None) -> dict[str, str]:
    """The process environment over the project's `.env`: the environment wins."""
    root = project_root() if root is None else root
    return {**read_env_file(env_file(root)), **os.environ}


def apply_env_file(root: Path | None = None) -> Path:
    """Put the `.env` values the environment does not set into this process's environment (for
    what reads os.environ itself: Dagster's DAGSTER_HOME, the AWS variables); returns the root."""
    root = project_root() if root is None else root
    for name, value in read_env_file(env_file(root)).items():
        os.environ.setdefault(name, value)
    return root


def check_names(env: dict, source: str = "the environment") -> None:
    """SettingsError for the first IMNET_* name that is not a setting, naming the closest one."""
    for name in sorted(env):
        if name.startswith("IMNET_") and name not in VARIABLES:
            close = difflib.get_close_matches(name, list(VARIABLES), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "see the README's table of variables"
            raise SettingsError(f"{name} (in {source}) is not an imnet setting: {hint}")


def resolve_path(value: str, root: Path) -> str:
    """A local path relative to the project root made absolute; s3:// URLs and absolute paths as given."""
    if "://" in value or not value:
        return value
    return os.path.normpath(os.path.join(root, os.path.expanduser(value)))


def dagster_home(root: Path | None = None) -> Path:
    """DAGSTER_HOME (environment, then `.env`; relative: against the project root), else
    `data/dagster_home` under the project root: the instance `imnet` records its runs in."""
    root = project_root() if root is None else root
    value = environment(root).get("DAGSTER_HOME", "").strip()
    return Path(resolve_path(value or os.path.join("data", "dagster_home"), root))


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


DEFAULT_IMAGE_TIMEOUT = 600  # seconds: far beyond any real image (the slowest take a few seconds)


def image_timeout(env: dict | None = None) -> int:
    """IMNET_IMAGE_TIMEOUT: seconds one image may take its encode worker before the worker is
    killed and the image retried in a fresh one (then the run fails naming it; never an exclusion)."""
    return _int(os.environ if env is None else env, "IMNET_IMAGE_TIMEOUT", DEFAULT_IMAGE_TIMEOUT, 1)


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
STAGE_ENCODES_MODES = ("auto", "on", "off")  # auto: on with more than one release (stages/staged_encodes.py)
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
    (s3a:// is S3 too), else the local folder with symbolic links followed (relative paths were
    resolved against the project root before: resolve_path)."""
    if "://" in url and not url.startswith("file://"):
        scheme, _, rest = url.partition("://")
        scheme = "s3" if scheme in ("s3", "s3a") else scheme
        return (scheme, *[p for p in rest.split("/") if p])
    path = url[len("file://"):] if url.startswith("file://") else url
    return ("file", *[p for p in os.path.realpath(os.path.abspath(path)).split(os.sep) if p])


def roots_overlap(a: str, b: str) -> str | None:
    """How root `b` overlaps root `a` ("is", "is inside", "contains"), or None when apart."""
    pa, pb = _root_parts(a), _root_parts(b)
    if pa == pb:
        return "is"
    if pb[:len(pa)] == pa:
        return "is inside"
    if pa[:len(pb)] == pb:
        return "contains"
    return None


def check_roots_apart(raw_root: str, out_root: str, out_name: str = "IMNET_OUT_ROOT") -> None:
    """SPEC (Configuration): the out root may not be the raw root, nor inside it, nor contain it
    (shards would be written into the raw release, or the raw release's listing would hold them)."""
    how = roots_overlap(raw_root, out_root)
    if how is None:
        return
    how = f"{how} the raw root" if how != "is" else "is the raw root"
    raise SettingsError(f"{out_name}={out_root!r} {how} IMNET_RAW_ROOT={raw_root!r}: shards would be written "
                        "into the raw release; choose an out root outside it")


_SPLIT_NAME = re.compile(r"\w+(\.\w+)*")  # Hugging Face datasets' split names (datasets.splits._split_re)


def parse_holdout(text: str, variable: str = "IMNET_HOLDOUT") -> tuple[tuple[str, int], ...]:
    """`validation:2,test:2` -> (("validation", 2), ("test", 2)); the splits take the last shards."""
    splits: list[tuple[str, int]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.partition(":")
        if not sep or not name.strip() or not count.strip().isdecimal() or int(count) < 1:
            raise SettingsError(f"{variable} entry {part!r} must look like name:count, e.g. validation:2")
        if name.strip() == "train":
            raise SettingsError(f"{variable} cannot name the 'train' split")
        if not _SPLIT_NAME.fullmatch(name.strip()):
            # the card's configs name each split: Hugging Face datasets refuses any other name
            raise SettingsError(f"{variable} split name {name.strip()!r} must be letters, digits and '_' "
                                "(dots between them), as Hugging Face datasets requires")
        splits.append((name.strip(), int(count)))
    names = [n for n, _ in splits]
    if len(set(names)) != len(names):
        raise SettingsError(f"{variable} names a split twice: {text!r}")
    return tuple(splits)


def check_split_names(holdout: tuple[tuple[str, int], ...], alt_labels: str, variable: str = "IMNET_HOLDOUT") -> None:
    """A holdout split may not take the name of the split IMNET_ALT_LABELS makes of the train shards
    (`train_in1k`): `_info.json` would hold one of the two, and the other's shards no split."""
    alt = f"train_{alt_labels}" if alt_labels else ""
    if alt and alt in dict(holdout):
        raise SettingsError(f"{variable} names the {alt!r} split, which IMNET_ALT_LABELS={alt_labels} makes "
                            "of the train shards: choose another name")


def check_shard_pattern(pattern: str, name: str = "IMNET_SHARD_PATTERN") -> str:
    """A shard file name pattern as given, or SettingsError: one `{shard}` and no other
    placeholder, no '/', a distinct name per shard."""
    if "{shard}" not in pattern or "/" in pattern:
        raise SettingsError(
            f"{name}={pattern!r} must contain '{{shard}}' and no '/' (it is a file name)"
        )
    try:
        distinct = pattern.format(shard=shard_key(0)) != pattern.format(shard=shard_key(1))
    except (KeyError, IndexError, ValueError) as e:
        raise SettingsError(
            f"{name}={pattern!r}: {{shard}} must be its only placeholder "
            f"(write other braces as '{{{{' and '}}}}'): {type(e).__name__}: {e}"
        ) from None
    if not distinct:
        raise SettingsError(f"{name}={pattern!r} gives every shard the same file name")
    return pattern


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
    # seconds a throttled or broken storage request is retried (IMNET_STORAGE_RETRY_SECONDS; read
    # where the requests are made, core/s3read.retry_seconds, in every process: validated here)
    storage_retry_seconds: int = 300
    image_timeout: int = DEFAULT_IMAGE_TIMEOUT  # seconds per image in an encode worker (IMNET_IMAGE_TIMEOUT)
    stage_encodes: str = "auto"  # IMNET_STAGE_ENCODES (stages/staged_encodes.py)
    # Releases (issue 25; release/releases.py reads IMNET_RELEASES into one Settings per release)
    release: str = ""  # the release's name; "" = the one default release (IMNET_RELEASES unset)
    synsets: str = "all"  # "all" | "in1k" | "in12k" | path to a file of wnids, one a line
    codec: str = "webp"  # "webp" | "jpeg"
    jpeg_quality: int = 95  # chosen by measurement (README "JPEG settings"; the brief's line said 90)
    max_short_edge: int = 768
    val_per_class: int = 0

    @classmethod
    def from_env(cls, env: dict | None = None) -> Settings:
        """Settings from `env` (default: the process environment over the project's `.env`);
        relative local paths resolved against the project root."""
        if env is None:
            root = project_root()
            dotenv = read_env_file(env_file(root))
            check_names(dotenv, str(env_file(root)))
            check_names(os.environ)
            env = {**dotenv, **os.environ}
        else:
            env = dict(env)
            check_names(env)
            root = project_root(env)
        pattern = check_shard_pattern(env.get("IMNET_SHARD_PATTERN") or DEFAULT_SHARD_PATTERN)
        num_shards = _int(env, "IMNET_NUM_SHARDS", 1024, 1, 9999)
        holdout = parse_holdout(env.get("IMNET_HOLDOUT", ""))
        if sum(n for _, n in holdout) >= num_shards:
            raise SettingsError(
                f"IMNET_HOLDOUT takes {sum(n for _, n in holdout)} shards of {num_shards}; train needs at least one"
            )
        alt_labels = _choice(env, "IMNET_ALT_LABELS", "", ALT_LABEL_MODES)
        check_split_names(holdout, alt_labels)
        raw_root = resolve_path((env.get("IMNET_RAW_ROOT") or "data/raw").rstrip("/") or "/", root)
        out_root = resolve_path((env.get("IMNET_OUT_ROOT") or "data/out").rstrip("/") or "/", root)
        check_roots_apart(raw_root, out_root)
        return cls(
            raw_root=raw_root,
            out_root=out_root,
            catalog=resolve_path(env.get("IMNET_CATALOG") or "data/catalog.duckdb", root),
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
            eval_exclude=resolve_path((env.get("IMNET_EVAL_EXCLUDE") or "").strip().rstrip("/"), root) or None,
            dedup=_choice(env, "IMNET_DEDUP", "off", DEDUP_MODES),
            alt_labels=alt_labels,
            parallel_shards=_int(env, "IMNET_PARALLEL_SHARDS", 0, 0),
            storage_retry_seconds=_int(env, "IMNET_STORAGE_RETRY_SECONDS", 300, 1),
            image_timeout=image_timeout(env),
            stage_encodes=_choice(env, "IMNET_STAGE_ENCODES", "auto", STAGE_ENCODES_MODES),
        )

    # issue 25 (helper relcore): a release with val_per_class has validation shards after its
    # num_shards train (and holdout) shards: partition keys continue (0000 .. num_shards-1, then the
    # validation shards), and their files are numbered from 0000 with the pattern's "train" made
    # "validation" (else a "validation-" prefix). Their count comes from the settings alone, as the
    # partitions must be known before any catalog exists: an eighth of num_shards, at least one.
    @property
    def validation_shards(self) -> int:
        return max(1, -(-self.num_shards // 8)) if self.val_per_class > 0 else 0

    @property
    def partition_keys(self) -> list[str]:
        return [shard_key(i) for i in range(self.num_shards + self.validation_shards)]

    def shard_name(self, key: str) -> str:
        if not self.validation_shards or not key.isdecimal() or int(key) < self.num_shards:
            return self.shard_pattern.format(shard=key)
        return validation_pattern(self.shard_pattern).format(shard=shard_key(int(key) - self.num_shards))


def shard_key(index: int) -> str:
    return f"{index:04d}"


def validation_pattern(pattern: str) -> str:
    """The validation shards' file name: the shard pattern with its first "train" made
    "validation", or with a "validation-" prefix when it has none."""
    return pattern.replace("train", "validation", 1) if "train" in pattern else f"validation-{pattern}"
