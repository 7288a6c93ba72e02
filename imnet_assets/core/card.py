"""The dataset card: `<out root>/README.md`, written by a clean audit beside `_info.json`.

`facts(settings, report)` gathers what the card states (from the audit's report and the catalog);
`render(facts)` turns that dict into Markdown and nothing else, so the text is tested from a dict.
"""

from __future__ import annotations

from importlib import metadata

from . import fs

CARD_NAME = "README.md"
TERMS_URL = "https://image-net.org/download.php"


def card_url(settings) -> str:
    return fs.join(settings.out_root, CARD_NAME)


def _package_version() -> str:
    try:
        return metadata.version("imnet-assets")
    except metadata.PackageNotFoundError:
        return "unknown"


def facts(settings, report) -> dict:
    """Everything the card states, as plain values."""
    from ..catalog import Catalog
    from .audit import DATASET_NAME

    with Catalog(settings.catalog, read_only=True) as cat:
        overlaps = cat.one("overlaps_summary")
        eval_images = cat.one("eval_summary")
        classes = cat.one("card_classes")
    totals = report.totals
    return {
        "name": DATASET_NAME,
        "samples": int(totals.get("samples") or 0),
        "classes": int(classes.get("classes") or 0),
        "synsets": int(totals.get("synsets") or 0),
        "shards": int(totals.get("shards") or 0),
        "bytes": int(totals.get("shard_bytes") or 0),
        "raw_images": int(totals.get("raw_images") or 0),
        "excluded": int(totals.get("excluded") or 0),
        "repaired": int(totals.get("repaired") or 0),
        "reasons": [(r["stage"], r["reason"], int(r["images"])) for r in report.reasons],
        "duplicate_groups": int(overlaps.get("duplicate_groups") or 0),
        "duplicate_copies": int(overlaps.get("duplicate_copies") or 0),
        "dedup_excluded": int(overlaps.get("dedup_excluded") or 0),
        "eval_images": int(eval_images.get("images") or 0) if settings.eval_exclude else None,
        "eval_overlaps_exact": int(overlaps.get("eval_overlaps_exact") or 0),
        "eval_overlaps_near": int(overlaps.get("eval_overlaps_near") or 0),
        "code_versions": sorted({r["code_version"] for r in report.per_shard if r.get("code_version")}),
        "package_version": _package_version(),
        "shard_pattern": settings.shard_pattern,
        "first_shard": settings.shard_name(settings.partition_keys[0]),
        "last_shard": settings.shard_name(settings.partition_keys[-1]),
        "settings": {
            "IMNET_NUM_SHARDS": settings.num_shards,
            "IMNET_SEED": settings.seed,
            "IMNET_SHARD_PATTERN": settings.shard_pattern,
            "IMNET_WEBP_QUALITY": settings.webp_quality,
            "IMNET_WEBP_METHOD": settings.webp_method,
            "IMNET_HOLDOUT": ",".join(f"{n}:{c}" for n, c in settings.holdout) or "none",
            "IMNET_EVAL_EXCLUDE": "set" if settings.eval_exclude else "none",
            "IMNET_DEDUP": settings.dedup,
            "IMNET_ALT_LABELS": settings.alt_labels or "none",
        },
        "alt_labels": settings.alt_labels,
        "splits": ["train", *(n for n, _ in settings.holdout), *([f"train_{settings.alt_labels}"]
                                                                 if settings.alt_labels else [])],
    }


def _n(value: int) -> str:
    return f"{value:,}"


def _size(value: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} B"


def render(f: dict) -> str:
    """The card's Markdown for a dict of facts (see `facts`)."""
    lines = [
        f"# {f['name']}",
        "",
        "The ImageNet Winter21 release as WebDataset shards of WebP images, built by imnet-assets. Images under",
        "32 px are removed, images whose short side is over 768 px are resized to 768, EXIF other than colour",
        "space is removed, truncated images are repaired, and samples are shuffled across the shards.",
        "",
        "## Contents",
        "",
        "| | |",
        "|---|---|",
        f"| samples | {_n(f['samples'])} |",
        f"| classes (synsets with samples) | {_n(f['classes'])} of {_n(f['synsets'])} |",
        f"| shards | {_n(f['shards'])} (`{f['first_shard']}` ... `{f['last_shard']}`) |",
        f"| bytes | {_n(f['bytes'])} ({_size(f['bytes'])}) |",
        f"| raw images | {_n(f['raw_images'])} |",
        f"| excluded | {_n(f['excluded'])} |",
        f"| repaired (truncated, decoded as far as the data goes) | {_n(f['repaired'])} |",
        f"| splits in `_info.json` | {', '.join(f['splits'])} |",
        "",
        "Each sample is `<key>.cls` (the label: index of the synset in the sorted list of synsets), "
        "`<key>.json` (filename, label, class_name, width, height, orig_width, orig_height"
        + (", label_in1k" if f.get("alt_labels") == "in1k" else "") + ") and `<key>.webp`.",
        "",
        "## Settings",
        "",
        "| variable | value |",
        "|---|---|",
        *(f"| `{k}` | `{v}` |" for k, v in f["settings"].items()),
        "",
        "## Exclusions",
        "",
    ]
    if f["reasons"]:
        lines += ["| stage | reason | images |", "|---|---|---|"]
        lines += [f"| {stage} | {reason.replace('|', '/')} | {_n(n)} |" for stage, reason, n in f["reasons"]]
    else:
        lines.append("No raw image was excluded.")
    lines += [
        "",
        "## Duplicates and evaluation overlap",
        "",
        f"- Identical raw images (same sha256): {_n(f['duplicate_groups'])} groups, {_n(f['duplicate_copies'])} "
        "later copies (catalog: `images.duplicate_of`, view `duplicate_groups`); "
        + (f"{_n(f['dedup_excluded'])} excluded (`IMNET_DEDUP=exact`)." if f["settings"]["IMNET_DEDUP"] == "exact"
           else "kept, as in the original release (`IMNET_DEDUP=off`)."),
    ]
    if f.get("eval_images") is None:
        lines.append("- No evaluation set was given (`IMNET_EVAL_EXCLUDE`): no overlap removed.")
    else:
        lines.append(
            f"- Evaluation set: {_n(f['eval_images'])} images. Excluded as copies of one: "
            f"{_n(f['eval_overlaps_exact'])} byte-identical and {_n(f['eval_overlaps_near'])} near duplicates "
            "(64-bit pHash; catalog table `eval_overlaps`; each exclusion reason names the eval file).")
    versions = ", ".join(f"`{v}`" for v in f["code_versions"]) or "none"
    lines += [
        "",
        "## Code version",
        "",
        f"imnet-assets {f['package_version']}; shard encoder {versions}.",
        "",
        "## Terms of access",
        "",
        "The images belong to their owners, not to ImageNet or to this project. ImageNet grants access for",
        "non-commercial research and educational use only, under its terms of access: you accept",
        "responsibility for your use, may not redistribute the images, and indemnify ImageNet, Princeton",
        "and Stanford. Read and accept the full terms at",
        f"[{TERMS_URL}]({TERMS_URL}) before using these shards.",
        "",
        "## Reading the shards",
        "",
        "With webdataset:",
        "",
        "```python",
        "import webdataset as wds",
        "",
        f'urls = "{f["shard_pattern"].replace("{shard}", "{" + f["first_shard"][-8:-4] + ".." + f["last_shard"][-8:-4] + "}")}"'
        if f["shard_pattern"].endswith("{shard}.tar") else f"urls = [...]  # the shard files, {f['shard_pattern']}",
        'ds = wds.WebDataset(urls).decode("pil").to_tuple("webp", "cls", "json")',
        "```",
        "",
        "With timm (its WebDataset reader reads `_info.json` beside the shards):",
        "",
        "```python",
        "from timm.data import create_dataset",
        "",
        'ds = create_dataset("wds/imagenet", root="<this folder>", split="train", is_training=True,',
        "                    batch_size=256, input_key=\"webp\")",
        "```",
    ]
    if f.get("alt_labels"):
        split = f"train_{f['alt_labels']}"
        lines += [
            "",
            f"`split=\"{split}\"` trains on the ImageNet-1k subset of the same shards: timm reads the label from",
            "each sample's `label_in1k` and skips samples whose value is -1 (synsets not in ImageNet-1k).",
        ]
    return "\n".join(lines) + "\n"


def write_card(settings, report) -> str:
    """Render and commit the card atomically; returns its URL."""
    url = card_url(settings)
    fs.write_atomic(url, render(facts(settings, report)).encode("utf-8"))
    return url
