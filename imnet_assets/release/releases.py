"""IMNET_RELEASES: many releases from one raw index (SPEC: Releases).

A release is a Settings: the base Settings (the IMNET_* variables) with the keys of its
`[release.<name>]` table put over them, and `release` set to its name. IMNET_RELEASES unset: one
release, the base Settings itself, named "" (today's release: same outputs, same Dagster keys).

    [release.w21_webp]
    out_root = "data/out/w21-webp"

    [release.in12k]
    out_root = "s3://bucket/in12k"
    synsets = "in12k"
    val_per_class = 10
    num_shards = 512

Every problem is one SettingsError line naming the file, the release and the key: a missing
out_root, an unknown key (with the closest known one), a bad value, two releases whose out roots
are the same or one inside the other, an out root overlapping the raw root, a release name that
cannot be a Dagster asset key prefix and group name.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path

from imnet_assets.settings import (
    Settings,
    SettingsError,
    check_roots_apart,
    check_shard_pattern,
    check_split_names,
    environment,
    parse_holdout,
    project_root,
    resolve_path,
    roots_overlap,
)

VARIABLE = "IMNET_RELEASES"
TABLE = "release"
# A Dagster name (asset key part, group, schedule and sensor names: [A-Za-z0-9_]+), not starting
# with a digit, short enough to prefix the schedule's and sensors' names.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
SYNSET_LISTS = ("all", "in1k", "in12k")
CODECS = ("webp", "jpeg")
# key -> (type, low, high) for integers; str for text
KEYS: dict[str, tuple] = {
    "out_root": (str,),
    "synsets": (str,),
    "codec": (str,),
    "quality": (int, 0, 100),
    "method": (int, 0, 6),
    "max_short_edge": (int, 32, 65535),
    "num_shards": (int, 1, 9999),
    "shard_pattern": (str,),
    "holdout": (str,),
    "val_per_class": (int, 0, 1_000_000),
    "seed": (int, 0, 2**63 - 1),
}


def releases_file(env: dict | None = None) -> str | None:
    """The releases file IMNET_RELEASES names (relative: against the project root), or None."""
    env = environment() if env is None else env
    value = (env.get(VARIABLE) or "").strip()
    return resolve_path(value, project_root(env)) if value else None


def from_env(env: dict | None = None) -> list[Settings]:
    """Every release, in the file's order (one, the base Settings, when IMNET_RELEASES is unset)."""
    base = Settings.from_env(env)
    path = releases_file(env)
    if path is None:
        return [base]
    return read_releases(path, base, project_root(env))


def read_releases(path: str, base: Settings, root: Path | None = None) -> list[Settings]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    where = f"{VARIABLE}={path}"
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"{where}: no such file") from None
    except OSError as e:
        raise SettingsError(f"{where}: cannot be read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{where} is not TOML: {e}") from None
    return parse_releases(doc, base, where, project_root() if root is None else root)


def parse_releases(doc: dict, base: Settings, where: str, root: Path) -> list[Settings]:
    """The releases a parsed releases file defines, each validated, then checked against each other."""
    for key in doc:
        if key != TABLE:
            raise SettingsError(f"{where}: {key!r} at the top: every table is [release.<name>]{_closest(key, [TABLE])}")
    tables = doc.get(TABLE)
    if not isinstance(tables, dict) or not tables:
        raise SettingsError(f"{where} defines no release: add a [release.<name>] table with an out_root")
    out = [_release(name, table, base, where, root) for name, table in tables.items()]
    for i, a in enumerate(out):
        for b in out[:i]:
            how = roots_overlap(b.out_root, a.out_root)
            if how is not None:
                what = "is the out root of" if how == "is" else f"{how} the out root of"
                raise SettingsError(f"{where}: [release.{a.release}] out_root={a.out_root!r} {what} "
                                    f"[release.{b.release}] ({b.out_root!r}): each release needs an out root of its own")
    return out


def _closest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def _release(name: str, table, base: Settings, where: str, root: Path) -> Settings:
    if not NAME.fullmatch(name):
        raise SettingsError(
            f"{where}: [release.{name}]: a release name is letters, digits and '_', not starting with a digit, "
            "at most 40 characters (it names the release's Dagster group and asset keys)")
    at = f"{where}: [release.{name}]"
    if not isinstance(table, dict):
        raise SettingsError(f"{at} is not a table")
    for key in table:
        if key not in KEYS:
            raise SettingsError(f"{at}: unknown key {key!r}{_closest(key, KEYS)}; known: {', '.join(KEYS)}")
    values = {key: _typed(at, key, value) for key, value in table.items()}
    if "out_root" not in values or not values["out_root"].strip():
        raise SettingsError(f"{at}: out_root is missing (every release needs an out root of its own)")
    out_root = resolve_path(values["out_root"].strip().rstrip("/") or "/", root)
    check_roots_apart(base.raw_root, out_root, out_name=f"{at} out_root")
    codec = values.get("codec", "webp")
    if codec not in CODECS:
        raise SettingsError(f"{at}: codec={codec!r} must be one of {', '.join(CODECS)}")
    if codec == "jpeg" and "method" in values:
        raise SettingsError(f"{at}: method is a WebP setting; this release's codec is jpeg")
    if codec == "jpeg" and not 1 <= values.get("quality", 90) <= 95:
        raise SettingsError(f"{at}: quality={values['quality']} must be between 1 and 95 for jpeg "
                            "(Pillow's own advice: above 95 the file grows and the image does not improve)")
    synsets = values.get("synsets", "all").strip()
    if synsets not in SYNSET_LISTS:
        synsets = resolve_path(synsets, root)
        if "://" not in synsets and not os.path.isfile(synsets):
            raise SettingsError(f"{at}: synsets={values['synsets']!r} is not {', '.join(SYNSET_LISTS)} "
                                f"nor a file of wnids ({synsets} does not exist)")
    changes: dict = {"release": name, "out_root": out_root, "synsets": synsets, "codec": codec}
    if "quality" in values:
        changes["jpeg_quality" if codec == "jpeg" else "webp_quality"] = values["quality"]
    for key in ("method", "max_short_edge", "num_shards", "val_per_class", "seed"):
        if key in values:
            changes["webp_method" if key == "method" else key] = values[key]
    if "shard_pattern" in values:
        changes["shard_pattern"] = check_shard_pattern(values["shard_pattern"], f"{at} shard_pattern")
    if "holdout" in values:
        changes["holdout"] = parse_holdout(values["holdout"], f"{at} holdout")
    release = dataclasses.replace(base, **changes)
    taken = sum(n for _, n in release.holdout)
    if taken >= release.num_shards:
        raise SettingsError(f"{at}: holdout takes {taken} shards of {release.num_shards}; train needs at least one")
    if release.val_per_class and "validation" in dict(release.holdout):
        raise SettingsError(f"{at}: val_per_class makes a 'validation' split of its own; holdout may not name one too")
    check_split_names(release.holdout, release.alt_labels, f"{at} holdout")
    return release


def _typed(at: str, key: str, value):
    kind = KEYS[key]
    if kind[0] is str:
        if not isinstance(value, str):
            raise SettingsError(f"{at}: {key} must be a string, e.g. {key} = \"...\" (got {value!r})")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"{at}: {key} must be a whole number (got {value!r})")
    low, high = kind[1], kind[2]
    if not low <= value <= high:
        raise SettingsError(f"{at}: {key}={value} must be between {low} and {high}")
    return value


def by_name(releases: list[Settings], name: str) -> Settings:
    """The release named `name` (`imnet build --release NAME`), or SettingsError naming the known ones."""
    for r in releases:
        if r.release == name:
            return r
    known = [r.release for r in releases if r.release]
    if not known:
        raise SettingsError(f"--release {name}: {VARIABLE} is not set, so there is one release, the default "
                            "(drop --release, or set IMNET_RELEASES to a releases file)")
    raise SettingsError(f"--release {name}: no such release{_closest(name, known)}; the releases file has "
                        + ", ".join(known))
