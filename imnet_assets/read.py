"""Reading a built out root: one split as a webdataset pipeline.

    from imnet_assets.read import dataset
    ds = dataset("data/out", split="train")            # (PIL image, label)
    ds = dataset("s3://bucket/prefix", lemmas=True)    # (PIL image, label, lemma)

The split's shard files come from `_info.json` (timm's split list, the audit writes it); lemmas
from `classes.tsv` beside it. A local folder is read with plain files, an `s3://` prefix through
fsspec/s3fs with the standard AWS variables (`AWS_ENDPOINT_URL` for an S3-compatible store), as
the rest of the project reads it. In a torch DataLoader each worker reads its own shards.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from imnet_assets.storage import fs, prefetch


def info(out_root: str) -> dict:
    """The out root's `_info.json` (FileNotFoundError naming it when there is none: not built, or
    its audit has not passed)."""
    url = fs.join(out_root.rstrip("/"), "_info.json")
    if not fs.exists(url):
        raise FileNotFoundError(f"{url} not found: build the release first (`imnet build`; only a clean "
                                "audit writes it)")
    return json.loads(fs.read_bytes(url))


def shard_urls(out_root: str, split: str = "train") -> list[str]:
    """The split's shard files, in `_info.json`'s order."""
    splits = info(out_root)["splits"]
    if split not in splits:
        raise KeyError(f"no split {split!r} in {fs.join(out_root, '_info.json')}; it has {sorted(splits)}")
    return [fs.join(out_root.rstrip("/"), name) for name in splits[split]["filenames"]]


def classes(out_root: str) -> list[dict]:
    """`classes.tsv`'s rows (label, wnid, lemma, gloss, count), in label order."""
    text = fs.read_text(fs.join(out_root.rstrip("/"), "classes.tsv"))
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
    for row in rows:
        row["label"], row["count"] = int(row["label"]), int(row["count"])
    return rows


def _opened(urls: Iterator[dict]) -> Iterator[dict]:
    """webdataset's url_opener, through this project's storage layer (local or s3://)."""
    for sample in urls:
        url = sample["url"]
        stream = prefetch.open_read(url)
        try:
            yield {**sample, "stream": stream}
        finally:
            stream.close()


def _samples(urls: Iterator[dict]) -> Iterator[dict]:
    return group_by_keys(tar_file_expander(_opened(urls)))


def dataset(out_root: str | None = None, split: str = "train", lemmas: bool = False, shuffle: int = 0,
            seed: int = 0) -> wds.DataPipeline:
    """A webdataset pipeline over one split of a built out root (default: the project's
    IMNET_OUT_ROOT, from the environment or .env), yielding (PIL image, label), or
    (PIL image, label, lemma) with `lemmas`. `shuffle` > 0 shuffles the shard order and keeps a
    buffer of that many samples to shuffle from (seeded by `seed`); 0 reads in order.
    With IMNET_ALT_LABELS=in1k, `split="train_in1k"` yields the ImageNet-1k label and skips the
    samples of other synsets, as timm does. The project's `.env` applies under the environment, as for
    `imnet`: its AWS variables (credentials, endpoint, CA bundle) reach an `s3://` out root."""
    from imnet_assets.settings import Settings, apply_env_file

    apply_env_file()  # the project's .env under the environment, AWS_* too, as every `imnet` command reads it
    if out_root is None:
        out_root = Settings.from_env().out_root
    out_root = out_root.rstrip("/")
    doc = info(out_root)
    urls = shard_urls(out_root, split)
    alt = doc["splits"][split].get("alt_label")
    names = {row["label"]: row["lemma"] for row in classes(out_root)} if lemmas else {}

    def label_of(sample: dict) -> int:
        return int(json.loads(sample["json"])[alt]) if alt else int(sample["cls"])

    def as_tuple(sample: dict) -> tuple:
        label = label_of(sample)
        image = sample["jpg"] if "jpg" in sample else sample["webp"]  # a JPEG release's, or WebP
        if lemmas:
            base = int(sample["cls"])  # the lemma is the synset's: the release label names it
            return image, label, names.get(base, "")
        return image, label

    stages: list = [wds.SimpleShardList(urls)]
    if shuffle:
        stages.append(wds.shuffle(len(urls), seed=seed))
    stages += [wds.split_by_worker, _samples]
    if shuffle:
        stages.append(wds.shuffle(shuffle, seed=seed))
    if alt:
        stages.append(wds.select(lambda s: label_of(s) >= 0))
    stages += [wds.decode("pil"), wds.map(as_tuple)]
    return wds.DataPipeline(*stages)
