"""Issue 17's "done when", through `imnet build` (Dagster, in a subprocess as a user runs it): a
held-out release with exact duplicates and an eval folder of byte-identical, re-encoded, resized and
unrelated images, built with IMNET_EVAL_EXCLUDE and IMNET_ALT_LABELS=in1k."""

from __future__ import annotations

import json

import duckdb
import pytest
import webdataset as wds

from imnet_assets.release.altlabels import in1k_labels
from tests.conftest import build_env, dagster_home, imnet
from tests.core.test_features import WNIDS, write_release


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("features-build")
    rel = write_release(tmp)
    env = build_env(tmp, rel.raw, DAGSTER_HOME=str(dagster_home(tmp)), IMNET_NUM_SHARDS="3",
                    IMNET_HOLDOUT="validation:1", IMNET_EVAL_EXCLUDE=str(rel.eval), IMNET_ALT_LABELS="in1k")
    first = imnet(["build"], env)
    return tmp, env, rel, first


def test_the_release_builds_as_issue_17_asks(built):
    tmp, _env, rel, _first = built
    with duckdb.connect(str(tmp / "catalog.duckdb"), read_only=True) as con:
        excluded = dict(con.execute("SELECT key, reason FROM images WHERE status = 'excluded'").fetchall())
        dups = dict(con.execute("SELECT key, duplicate_of FROM images WHERE duplicate_of IS NOT NULL").fetchall())
    # exactly the overlapping raw images are excluded, each with its eval file
    assert excluded == {k: f"eval overlap: {f}" for k, f in rel.overlaps.items()}
    info = json.loads((tmp / "out" / "_info.json").read_text())
    assert sorted(info["splits"]) == ["train", "train_in1k", "validation"]
    labels = in1k_labels()
    metas = {}
    for split in ("train", "validation"):
        urls = [str(tmp / "out" / f) for f in info["splits"][split]["filenames"]]
        for s in wds.WebDataset(urls, shardshuffle=False):
            metas[s["__key__"]] = (split, json.loads(s["json"]))
    # duplicates recorded and kept
    assert len(dups) == 3 and set(dups) | set(dups.values()) <= set(metas)
    assert len(metas) == 4 * 6 + 3 - len(rel.overlaps)
    # every sample's JSON carries the right label_in1k
    assert all(m["label_in1k"] == labels.get(m["class_name"], -1) for _, m in metas.values())
    # train_in1k: the train shards, counting only IN-1k samples
    alt = info["splits"]["train_in1k"]
    assert alt["alt_label"] == "label_in1k" and alt["filenames"] == info["splits"]["train"]["filenames"]
    in_train = [m for split, m in metas.values() if split == "train"]
    assert alt["num_samples"] == sum(1 for m in in_train if m["label_in1k"] >= 0) == sum(alt["shard_lengths"])
    # the card states the sample count
    card = (tmp / "out" / "README.md").read_text()
    assert f"| samples | {len(metas):,} |" in card and "splits in `_info.json` | train, validation, train_in1k" in card
    assert WNIDS[0] in {m["class_name"] for _, m in metas.values()}


def test_a_second_build_redoes_nothing_and_verify_agrees(built):
    tmp, env, _rel, _first = built
    second = imnet(["build"], env)
    assert "0 to build" in second.stdout, second.stdout
    for stage in ("filtered_index", "shuffled_plan", "shard_audit"):
        assert stage in second.stdout
    verify = imnet(["verify"], env, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_turning_alt_labels_off_rebuilds_the_shards_without_the_field(built):
    tmp, env, _rel, _first = built
    off = dict(env)
    off.pop("IMNET_ALT_LABELS")
    rebuild = imnet(["build"], off).stdout
    assert "3 to build" in rebuild, rebuild  # the setting is part of every shard's fingerprint
    info = json.loads((tmp / "out" / "_info.json").read_text())
    assert sorted(info["splits"]) == ["train", "validation"]
    for s in wds.WebDataset([str(tmp / "out" / f) for f in info["splits"]["train"]["filenames"]], shardshuffle=False):
        assert "label_in1k" not in json.loads(s["json"])


def test_the_cards_upload_command_sends_the_dataset_and_none_of_the_working_state(built):
    """The card's `hf upload ... --exclude` pattern, applied by huggingface_hub's own filter to every
    file of the built out root: what goes to the Hub is the card, classes.tsv, _info.json and exactly
    the shard files the card's configs name; the build's working state stays behind."""
    import yaml
    from huggingface_hub.utils import filter_repo_objects

    from imnet_assets.release.card import HUB_EXCLUDE

    tmp, _env, _rel, _first = built
    out = tmp / "out"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    # what other builds leave there too (staged encodes, a shard's lease, an upload's lease): names only
    files += ["_staged/webp-q90-m4/n01440764.tar.bin", "_locks/shard-0000/holder.json", "_uploads/x.lease"]
    assert any(f.startswith("_manifests/") for f in files) and any(f.startswith("_plan/") for f in files)
    sent = set(filter_repo_objects(files, ignore_patterns=[HUB_EXCLUDE]))
    card = (out / "README.md").read_text()
    configs = yaml.safe_load(card.split("---")[1])["configs"]
    named = {path for c in configs for d in c["data_files"] for path in d["path"]}
    assert named and all(name.endswith(".tar") for name in named)
    assert sent == named | {"README.md", "classes.tsv", "_info.json"}
    assert f'--exclude "{HUB_EXCLUDE}"' in card and "--private" in card
