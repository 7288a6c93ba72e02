"""The dataset card's Hub front matter, rendered from a dict of facts (release.card.render)."""

from __future__ import annotations

import yaml

from imnet_assets.release.card import front_matter, render, size_category


def facts(**extra) -> dict:
    train = [f"w-{i:04d}.tar" for i in range(6)]
    f = {
        "name": "imagenet-w21-webp-wds", "samples": 13_151_276, "classes": 19_167, "synsets": 19_167,
        "shards": 8, "first_shard": "w-0000.tar", "last_shard": "w-0007.tar", "bytes": 10**12,
        "raw_images": 13_200_000, "excluded": 48_724, "repaired": 12, "reasons": [],
        "duplicate_groups": 0, "duplicate_copies": 0, "dedup_excluded": 0, "eval_images": None,
        "eval_overlaps_exact": 0, "eval_overlaps_near": 0, "code_versions": ["enc-1"], "package_version": "0.1.0",
        "shard_pattern": "w-{shard}.tar", "settings": {"IMNET_DEDUP": "off"}, "alt_labels": "in1k",
        "splits": ["train", "validation", "train_in1k"],
        "split_files": {"train": train, "validation": ["w-0006.tar", "w-0007.tar"], "train_in1k": train},
    }
    f.update(extra)
    return f


def test_size_categories_follow_the_hubs_buckets():
    assert [size_category(n) for n in (0, 999, 1000, 232, 13_151_276, 10**7, 10**9)] == [
        "n<1K", "n<1K", "1K<n<10K", "n<1K", "10M<n<100M", "10M<n<100M", "n>1B"]


def test_front_matter_maps_every_split_to_its_files_and_parses_back():
    text = render(facts())
    assert text.startswith("---\n")
    meta = yaml.safe_load(text[4:].partition("\n---\n")[0])
    assert meta == front_matter(facts())
    assert meta["license"] == "other" and meta["size_categories"] == ["10M<n<100M"]
    default, in1k = meta["configs"]
    assert default == {"config_name": "default", "data_files": [
        {"split": "train", "path": [f"w-{i:04d}.tar" for i in range(6)]},
        {"split": "validation", "path": ["w-0006.tar", "w-0007.tar"]}]}
    assert in1k["config_name"] == "train_in1k" and in1k["data_files"][0]["split"] == "train_in1k"
    assert "| `label_in1k` |" in text and "| `source_sha256` |" in text


def test_the_decontamination_section_says_how_many_eval_images_have_no_phash_and_why():
    counts = {"no_phash": 3, "undecodable": 2, "crashed": 1, "too_large": 0, "unrecorded": 0}
    text = render(facts(eval_images=50_000, eval_no_phash=counts, settings={"IMNET_DEDUP": "off"}))
    assert ("- 3 of 50,000 eval images have no pHash (2 do not decode, 1 crashed the pHash's process twice): they "
            "are matched byte for byte only, not as near copies (catalog `eval_images.no_phash` says why, per "
            "file).") in text
    every = render(facts(eval_images=50_000, eval_no_phash=dict.fromkeys(counts, 0)))
    assert "Evaluation set: 50,000 images" in every and "no pHash" not in every
