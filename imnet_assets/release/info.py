"""`_info.json`, timm's view of the out root: the dataset's name and one entry per split (shard
basenames and their sample counts). The audit writes it; the card and `imnet verify` read the same
document from here.
"""

from __future__ import annotations

import json

from imnet_assets.release import altlabels
from imnet_assets.release.plan import release_splits
from imnet_assets.settings import Settings
from imnet_assets.storage import fs

DATASET_NAME = "imagenet-w21-webp-wds"


def dataset_name(settings: Settings) -> str:
    """`_info.json`'s name: the release's (issue 25), DATASET_NAME for the default release."""
    return settings.release or DATASET_NAME


def info_document(settings: Settings, lengths: dict[str, int], catalog=None) -> dict:
    """timm's `_info.json`: one entry per split (train, holdout splits, a release's validation),
    shard basenames and their sample counts. `catalog`: an open Catalog for the alt-label counts
    (the audit's own connection); else it is opened read-only when they are needed."""
    splits = {}
    for name, keys in release_splits(settings).items():
        counts = [lengths[k] for k in keys]
        splits[name] = {
            "name": name,
            "filenames": [settings.shard_name(k) for k in keys],
            "shard_lengths": counts,
            "num_samples": sum(counts),
        }
    alt = altlabels.info_splits_for(settings, splits["train"], catalog)  # issue 17: train_in1k
    if set(alt) & set(splits):  # refused by the settings (check_split_names): a split would hide another
        raise ValueError(f"_info.json splits {sorted(set(alt) & set(splits))} named twice")
    splits.update(alt)
    return {"name": dataset_name(settings), "splits": splits}


def info_url(settings: Settings) -> str:
    return fs.join(settings.out_root, "_info.json")


def render_info(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
