"""The dataset card: `<out root>/README.md`, written by a clean audit beside `_info.json`.

`facts(settings, report)` gathers what the card states (from the audit's report and the catalog);
`render(facts)` turns that dict into the card and nothing else, so the text is tested from a dict.
The card begins with the YAML front matter the Hugging Face Hub reads (`front_matter`).
"""

from __future__ import annotations

from importlib import metadata

from imnet_assets.release.info import dataset_name, info_document
from imnet_assets.release.plan import VALIDATION
from imnet_assets.storage import atomic, fs

CARD_NAME = "README.md"
TERMS_URL = "https://image-net.org/download.php"
LICENSE_NAME = "imagenet-terms-of-access"
PRETTY_NAME = "ImageNet Winter21 (WebP, WebDataset)"
# What a copy of the out root to the Hub leaves out (huggingface_hub's ignore patterns, fnmatch: `*`
# matches `/` too): the build's working state, every folder whose name begins with `_` (_manifests/,
# _plan/, _staged/, _locks/, _uploads/; the manifests alone are ~2.6 GB and _staged/ as large as the
# images at the real size). `_info.json`, beside the shards, is kept: timm reads it.
HUB_EXCLUDE = "_*/*"
# issue 25: a release's codec -> (its name in the card, the sample's image member, what that member holds)
CODECS = {"webp": ("WebP", "webp", "lossy WebP"), "jpeg": ("JPEG", "jpg", "baseline JPEG")}
# The Hub's size_categories buckets, by sample count (upper bound exclusive).
SIZE_CATEGORIES = [(10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"),
                   (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B")]
CITATION = """@inproceedings{deng2009imagenet,
  title     = {ImageNet: A Large-Scale Hierarchical Image Database},
  author    = {Deng, Jia and Dong, Wei and Socher, Richard and Li, Li-Jia and Li, Kai and Fei-Fei, Li},
  booktitle = {IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {248--255},
  year      = {2009}
}

@article{russakovsky2015imagenet,
  title   = {ImageNet Large Scale Visual Recognition Challenge},
  author  = {Russakovsky, Olga and Deng, Jia and Su, Hao and Krause, Jonathan and Satheesh, Sanjeev and
             Ma, Sean and Huang, Zhiheng and Karpathy, Andrej and Khosla, Aditya and Bernstein, Michael and
             Berg, Alexander C. and Fei-Fei, Li},
  journal = {International Journal of Computer Vision (IJCV)},
  volume  = {115},
  number  = {3},
  pages   = {211--252},
  year    = {2015}
}"""
# Each sample's `<key>.json` fields, in the order the encoder writes them.
JSON_FIELDS = [
    ("filename", "`<wnid>/<key>.JPEG`: the raw file's name in the release"),
    ("label", "the class: index of the synset in the sorted list of synsets (as `<key>.cls`)"),
    ("class_name", "the synset's WordNet id (wnid); `classes.tsv` gives its lemma and gloss"),
    ("width", "width of the stored WebP, px"),
    ("height", "height of the stored WebP, px"),
    ("orig_width", "width of the source image, px"),
    ("orig_height", "height of the source image, px"),
    ("source_sha256", "hex sha256 of the source file's bytes in the raw release"),
]
LABEL_IN1K_FIELD = ("label_in1k", "index in the sorted list of the 1,000 ImageNet-1k wnids, -1 for a synset "
                                  "not among them (`IMNET_ALT_LABELS=in1k`)")


def card_url(settings) -> str:
    return fs.join(settings.out_root, CARD_NAME)


def _package_version() -> str:
    try:
        return metadata.version("imnet-assets")
    except metadata.PackageNotFoundError:
        return "unknown"


def size_category(samples: int) -> str:
    for bound, name in SIZE_CATEGORIES:
        if samples < bound:
            return name
    return "n>1B"


# sql/eval_summary.sql's counts of eval images without a pHash: all, then per reason, with the words for each
_NO_PHASH_COUNTS = ("no_phash", "undecodable", "crashed", "too_large", "unrecorded")
_NO_PHASH_WORDS = {"undecodable": "do not decode", "crashed": "crashed the pHash's process twice",
                   "too_large": "are too large to decode in full", "unrecorded": "hashed before reasons were recorded"}


def no_phash_said(counts: dict) -> str:
    """How many eval images have no pHash, and why (sql/eval_summary.sql's counts), in words: the
    dataset card's and the filtered index's log line."""
    why = ", ".join(f"{_n(counts[k])} {words}" for k, words in _NO_PHASH_WORDS.items() if counts.get(k))
    return f"{_n(counts['no_phash'])} of {_n(counts['images'])} eval images have no pHash ({why})"


EVAL_DAMAGE_SAID = 5  # damaged parts of eval tars the card names (the catalog's eval_damage holds them all)


def eval_damage_said(ranges: list[dict]) -> str:
    """The dataset card's line on the parts of eval tars that could not be hashed (sql/eval_damage_top.sql's
    rows: the first EVAL_DAMAGE_SAID, each with the count of all)."""
    count = int(ranges[0]["ranges"])
    named = "; ".join(f"`{r['file']}` at byte {r['at_byte']}: {r['reason']}" for r in ranges)
    more = f"; and {_n(count - len(ranges))} more" if count > len(ranges) else ""
    return (f"{_n(count)} damaged {'range' if count == 1 else 'ranges'} in eval files could not be hashed, so the "
            f"eval images there (if any) were not matched: {named}{more} (catalog table `eval_damage`).")


def facts(settings, report, catalog=None, info: dict | None = None) -> dict:
    """Everything the card states, as plain values. `catalog`: an open Catalog to read (the
    audit's own connection); else the catalog is opened read-only for this. `info`: the release's
    `_info.json` document when the caller made it already (the audit: its alt-label split counts
    are a query over every shard sample); else it is made here."""
    from imnet_assets.storage.catalog import reading

    with reading(settings.catalog, catalog) as cat:
        overlaps = cat.one("overlaps_summary")
        eval_images = cat.one("eval_summary")
        eval_damage = cat.dicts("eval_damage_top", {"top": EVAL_DAMAGE_SAID})
        classes = cat.one("card_classes", {"release": settings.release})
        named = cat.one("card_release", {"release": settings.release}) if settings.release else {}
        if settings.val_per_class:  # classes that gave validation fewer than val_per_class images
            named["short"] = len(cat.rows("plan_validation_short", {
                "release": settings.release, "val_per_class": settings.val_per_class,
                "first_validation": settings.partition_keys[settings.num_shards]}))
    totals = report.totals
    train_keys = settings.partition_keys[:settings.num_shards]
    return {
        "name": dataset_name(settings),
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
        "eval_no_phash": {k: int(eval_images.get(k) or 0) for k in _NO_PHASH_COUNTS},
        "eval_overlaps_exact": int(overlaps.get("eval_overlaps_exact") or 0),
        "eval_overlaps_near": int(overlaps.get("eval_overlaps_near") or 0),
        "eval_damage": [{k: r[k] for k in ("file", "at_byte", "reason", "ranges")} for r in eval_damage],
        "code_versions": sorted({r["code_version"] for r in report.per_shard if r.get("code_version")}),
        "package_version": _package_version(),
        "shard_pattern": settings.shard_pattern,
        "first_shard": settings.shard_name(train_keys[0]),
        "last_shard": settings.shard_name(train_keys[-1]),
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
            # issue 25: a release's codec settings, where they are not the default release's
            **({"codec": settings.codec, "jpeg_quality": settings.jpeg_quality} if settings.codec != "webp" else {}),
            **({"max_short_edge": settings.max_short_edge} if settings.max_short_edge != 768 else {}),
        },
        "release": release_facts(settings, named),
        "alt_labels": settings.alt_labels,
        "codec": settings.codec,
        "max_short_edge": settings.max_short_edge,
        "splits": ["train", *(n for n, _ in settings.holdout), *([VALIDATION] if settings.val_per_class else []),
                   *([f"train_{settings.alt_labels}"] if settings.alt_labels else [])],
        # split -> its shard files, as _info.json lists them
        "split_files": {name: list(split["filenames"])
                        for name, split in (info or info_document(settings, report.lengths, catalog))["splits"].items()},
    }


def release_facts(settings, named: dict) -> dict | None:
    """A named release's own settings (the releases file, issue 25); None for the default release, whose
    card is as before releases."""
    if not settings.release:
        return None
    return {"name": settings.release, "synsets": settings.synsets, "classes": int(named.get("synsets") or 0),
            "absent": int(named.get("absent") or 0), "codec": settings.codec,
            "max_short_edge": settings.max_short_edge, "val_per_class": settings.val_per_class,
            "validation_shards": settings.validation_shards, "short": int(named.get("short") or 0)}


def _release_lines(r: dict | None) -> list[str]:
    """The card's section on a named release: what it selects, its labels, its validation split."""
    if not r:
        return []
    lines = ["## Release", "", "| key | value |", "|---|---|",
             *(f"| `{k}` | `{r[k]}` |" for k in ("name", "synsets", "codec", "max_short_edge", "val_per_class")), "",
             f"Labels are the index in the sorted list of the release's {_n(r['classes'])} synsets (`classes.tsv`)."]
    if r["absent"]:
        lines.append(f"{_n(r['absent'])} of them are not in the raw release: they keep their labels and hold no "
                     "sample (count 0 in `classes.tsv`).")
    if r["val_per_class"]:
        lines.append(f"The `validation` split ({_n(r['validation_shards'])} shards of its own, disjoint from train) "
                     f"holds a seeded choice of {r['val_per_class']} images of each class; a class with "
                     f"{r['val_per_class']} or fewer kept images gives all but one of them"
                     + (f" ({_n(r['short'])} classes here)." if r["short"] else " (none here)."))
    return [*lines, ""]


def _n(value: int) -> str:
    return f"{value:,}"


def _size(value: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} B"


def front_matter(f: dict) -> dict:
    """The Hub's metadata: name, licence (ImageNet's terms), task, size, and one config whose
    splits are _info.json's, each with its shard files (a split with another label, such as
    `train_in1k`, gets a config of its own: it reads the same files)."""
    default = [name for name in f["split_files"] if not name.startswith("train_")]
    configs = [{"config_name": "default",
                "data_files": [{"split": name, "path": f["split_files"][name]} for name in default]}]
    configs += [{"config_name": name, "data_files": [{"split": name, "path": files}]}
                for name, files in f["split_files"].items() if name not in default]
    codec, _, _ = CODECS[f.get("codec", "webp")]
    return {
        "pretty_name": f"{PRETTY_NAME.replace('WebP', codec)}: {f['name']}",
        "license": "other",
        "license_name": LICENSE_NAME,
        "license_link": TERMS_URL,
        "task_categories": ["image-classification"],
        "size_categories": [size_category(f["samples"])],
        "tags": ["imagenet", "webdataset", codec.lower()],
        "configs": configs,
    }


def render(f: dict) -> str:
    """The card (YAML front matter, then Markdown) for a dict of facts (see `facts`)."""
    import yaml  # Dagster's dependency

    codec, ext, holds = CODECS[f.get("codec", "webp")]
    edge = f.get("max_short_edge", 768)
    lines = [
        "---",
        yaml.safe_dump(front_matter(f), sort_keys=False, allow_unicode=True, width=1000).rstrip("\n"),
        "---",
        "",
        f"# {f['name']}",
        "",
        f"The ImageNet Winter21 release as WebDataset shards of {codec} images, built by imnet-assets. Images under",
        f"32 px are removed, images whose short side is over {edge} px are resized to {edge}, EXIF other than colour",
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
        f"Each sample is three files: `<key>.cls` (the label as ASCII decimal), `<key>.json` and `<key>.{ext}`"
        f" (the image, {holds}, RGB). `<key>` is the raw file's stem (`n01440764_10026`).",
        "",
        "### `<key>.json`",
        "",
        "| field | meaning |",
        "|---|---|",
        *(f"| `{name}` | {meaning.replace('WebP', codec)} |" for name, meaning in
          [*JSON_FIELDS, *([LABEL_IN1K_FIELD] if f.get("alt_labels") == "in1k" else [])]),
        "",
        "`classes.tsv` beside the shards maps each label to its synset: `label`, `wnid`, `lemma`, `gloss`, "
        "`count` (the samples of that class), a header line, one row per label.",
        "",
        *_release_lines(f.get("release")),
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
        if f.get("eval_no_phash", {}).get("no_phash"):
            lines.append(f"- {no_phash_said({**f['eval_no_phash'], 'images': f['eval_images']})}: they are matched "
                         "byte for byte only, not as near copies (catalog `eval_images.no_phash` says why, per file).")
        if f.get("eval_damage"):
            lines.append(f"- {eval_damage_said(f['eval_damage'])}")
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
        f'ds = wds.WebDataset(urls).decode("pil").to_tuple("{ext}", "cls", "json")',
        "```",
        "",
        "With timm (its WebDataset reader reads `_info.json` beside the shards):",
        "",
        "```python",
        "from timm.data import create_dataset",
        "",
        f'ds = create_dataset("wds/{f["name"]}", root="<this folder>", split="train", is_training=True,',
        f"                    batch_size=256, input_key=\"{ext}\")",
        "```",
        "",
        "With imnet-assets (each split's shards from `_info.json`, lemmas from `classes.tsv`; a folder or s3://):",
        "",
        "```python",
        "from imnet_assets.read import dataset",
        "",
        'ds = dataset("<this folder>", split="train", lemmas=True)  # (PIL image, label, lemma)',
        "```",
    ]
    if f.get("alt_labels"):
        split = f"train_{f['alt_labels']}"
        lines += [
            "",
            f"`split=\"{split}\"` trains on the ImageNet-1k subset of the same shards: timm reads the label from",
            "each sample's `label_in1k` and skips samples whose value is -1 (synsets not in ImageNet-1k).",
        ]
    lines += [
        "",
        "## Hosting on the Hugging Face Hub",
        "",
        "This folder is laid out as the Hub reads it (the front matter's `configs`). The build's working state",
        "sits beside it in folders whose names begin with `_`: leave them out of the copy. ImageNet's terms allow no",
        "redistribution of the images: use a private repository, or a gated one whose access conditions carry them.",
        "",
        "```bash",
        f'hf upload <user>/<repo> "<this folder>" . --repo-type dataset --private --exclude "{HUB_EXCLUDE}"',
        "```",
        "",
        "(`pip install huggingface_hub`; run again, it resumes an interrupted upload. From Python:",
        f'`HfApi().upload_folder(..., ignore_patterns=["{HUB_EXCLUDE}"])`.)',
    ]
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```"]
    return "\n".join(lines) + "\n"


def write_card(settings, report, catalog=None, info: dict | None = None) -> str:
    """Render and commit the card atomically; returns its URL. `catalog`, `info`: as for `facts`."""
    url = card_url(settings)
    atomic.write_atomic(url, render(facts(settings, report, catalog, info)).encode("utf-8"))
    return url
