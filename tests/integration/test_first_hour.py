"""A newcomer's first hour, in a project folder of its own (a copy of the project's files, never
the repository itself): `imnet demo` writes its settings to the project's .env and builds on
the persistent instance; afterwards `imnet status` with no variables says everything is fresh,
the instance holds all six assets, and the out root is a dataset: a card the Hub reads,
classes.tsv, and `imnet_assets.read.dataset` yielding every sample."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import duckdb
import pytest
import yaml

from imnet_assets.release.info import DATASET_NAME

from ..conftest import REPO, environ, imnet

ASSETS = ["raw_tars", "synset_manifest", "filtered_index", "shuffled_plan", "wds_shards", "shard_audit"]
USER_ENV = "# my own settings\nIMNET_WORKERS=2\nEXTRA_NOTE=kept as it was\n"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("IMNET_", "DAGSTER_HOME"))}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("clone").resolve()
    for name in ("pyproject.toml", "dagster.yaml", "workspace.yaml"):
        shutil.copy(REPO / name, root / name)
    (root / ".env").write_text(USER_ENV)  # a line the user already has stays
    proc = imnet(["demo"], clean_env(), cwd=root, timeout=600)
    return root, proc


def test_demo_writes_its_settings_to_env_keeping_the_users_lines(demo):
    root, proc = demo
    text = (root / ".env").read_text()
    assert text.startswith(USER_ENV)
    assert "IMNET_NUM_SHARDS=8\n" in text and "IMNET_RAW_ROOT=data/raw\n" in text
    assert "IMNET_OUT_ROOT=data/out\n" in text and "IMNET_CATALOG=data/catalog.duckdb\n" in text
    assert f"DAGSTER_HOME={root / 'data' / 'dagster_home'}\n" in text
    assert "IMNET_WORKERS" not in text[len(USER_ENV):]  # not written twice
    assert (root / "data" / "dagster_home" / "dagster.yaml").read_bytes() == (REPO / "dagster.yaml").read_bytes()
    assert "instance (ephemeral)" not in proc.stdout and "Telemetry" not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "EOFError" not in proc.stderr
    assert "members=0" not in proc.stdout and "images=0" not in proc.stdout


def test_after_the_demo_status_with_no_variables_says_everything_is_fresh(demo):
    root, _ = demo
    out = imnet(["status"], clean_env(), cwd=root / "data").stdout  # from a subfolder
    for stage in ["raw_tars", "synset_manifest", "filtered_index", "shuffled_plan"]:
        assert f"{stage:16s} fresh\n" in out, out
    assert "wds_shards       8 fresh\n" in out and "shard_audit      fresh\n" in out, out
    assert f"  DAGSTER_HOME   {root / 'data' / 'dagster_home'}\n" in out
    assert f"  out root       {root / 'data' / 'out'}\n" in out


def test_the_instance_at_dagster_home_holds_every_asset_and_partition(demo):
    from dagster import AssetKey, DagsterInstance

    root, _ = demo
    with environ(DAGSTER_HOME=str(root / "data" / "dagster_home")), DagsterInstance.get() as inst:
        for asset in ASSETS:
            assert inst.get_latest_materialization_event(AssetKey(asset)) is not None, asset
        assert inst.get_materialized_partitions(AssetKey("wds_shards")) == {f"{i:04d}" for i in range(8)}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, sep, _ = card[4:].partition("\n---\n")
    assert sep
    return yaml.safe_load(head)


def test_the_card_front_matter_parses_with_the_hubs_keys(demo):
    root, _ = demo
    out = root / "data" / "out"
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    info = json.loads((out / "_info.json").read_text())
    assert meta["pretty_name"] and meta["license"] == "other"
    assert meta["license_name"] and meta["license_link"].startswith("https://image-net.org")
    assert meta["task_categories"] == ["image-classification"] and meta["size_categories"] == ["n<1K"]
    files = {d["split"]: d["path"] for c in meta["configs"] for d in c["data_files"]}
    assert files == {name: split["filenames"] for name, split in info["splits"].items()}
    assert all((out / f).is_file() for paths in files.values() for f in paths)
    for field in ("filename", "label", "class_name", "width", "height", "orig_width", "orig_height",
                  "source_sha256"):
        assert f"| `{field}` |" in card
    assert "Deng" in card and "CVPR" in card and "Russakovsky" in card and "IJCV" in card
    # the timm snippet names the dataset as the project's README does
    snippet = f'create_dataset("wds/{DATASET_NAME}"'
    assert snippet in card and snippet in (REPO / "README.md").read_text()


def catalog_rows(root: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(root / "data" / "catalog.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_classes_tsv_matches_the_catalogs_synsets(demo):
    root, _ = demo
    lines = (root / "data" / "out" / "classes.tsv").read_text().splitlines()
    assert lines[0] == "label\twnid\tlemma\tgloss\tcount"
    rows = [tuple(line.split("\t")) for line in lines[1:]]
    want = catalog_rows(root, "SELECT label, wnid, lemma, gloss, num_kept FROM synsets ORDER BY label")
    assert rows == [tuple(str(v) for v in r) for r in want] and len(rows) == 6
    assert Counter({int(r[0]): int(r[4]) for r in rows}) == expected_labels(root)  # count: samples in the shards


def expected_labels(root: Path) -> Counter:
    """Label -> samples written to the shards, by the catalog."""
    return Counter(dict(catalog_rows(root, "SELECT y.label, count(*) FROM shard_samples s JOIN images i ON "
                                           "i.key = s.key AND i.status = 'kept' JOIN synsets y ON y.wnid = i.wnid GROUP BY y.label")))


def test_read_dataset_yields_every_sample_with_its_label_and_lemma(demo):
    from PIL import Image

    from imnet_assets.read import dataset

    root, _ = demo
    lemmas = dict(catalog_rows(root, "SELECT label, lemma FROM synsets"))
    got = list(dataset(str(root / "data" / "out"), split="train", lemmas=True))
    assert all(isinstance(img, Image.Image) and img.mode == "RGB" for img, _, _ in got)
    assert Counter(label for _, label, _ in got) == expected_labels(root)
    assert all(lemma == lemmas[label] for _, label, lemma in got)
    # shuffled: the same samples
    assert Counter(label for _, label in dataset(str(root / "data" / "out"), shuffle=50)) == expected_labels(root)


def test_read_dataset_reads_an_out_root_on_s3(demo, monkeypatch):
    from imnet_assets.read import dataset

    from ..s3server import MotoS3

    root, _ = demo
    with MotoS3(secret="readerSecret") as s3:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(k)
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        client = s3.client()
        client.create_bucket(Bucket="wds-read")
        out = root / "data" / "out"
        for name in ["_info.json", "classes.tsv", *json.loads((out / "_info.json").read_text())["splits"]["train"]
                     ["filenames"]]:
            client.upload_file(str(out / name), "wds-read", f"release/{name}")
        got = list(dataset("s3://wds-read/release/", lemmas=True))
    assert Counter(label for _, label, _ in got) == expected_labels(root)


def test_demo_builds_every_release_the_projects_releases_file_names(tmp_path):
    """IMNET_RELEASES in the project's .env: the demo writes its sample raw release and builds each
    release under its own out root (the raw release read once for both: staged encodes)."""
    root = tmp_path.resolve()
    for name in ("pyproject.toml", "dagster.yaml", "workspace.yaml"):
        shutil.copy(REPO / name, root / name)
    (root / "releases.toml").write_text('[release.webp]\nout_root = "data/out/webp"\nnum_shards = 2\n\n'
                                        '[release.jpeg]\nout_root = "data/out/jpeg"\nnum_shards = 2\ncodec = "jpeg"\n')
    (root / ".env").write_text("IMNET_RELEASES=releases.toml\nIMNET_WORKERS=2\n")
    proc = imnet(["demo", "--synsets", "3", "--images", "6"], clean_env(), cwd=root, timeout=600)
    assert f"in {root / 'data/out/webp'}, {root / 'data/out/jpeg'}." in proc.stdout, proc.stdout
    for name in ("webp", "jpeg"):
        train = json.loads((root / "data/out" / name / "_info.json").read_text())["splits"]["train"]
        assert train["num_samples"] > 0 and len(list((root / "data/out" / name).glob("*.tar"))) == 2, train
    assert list((root / "data/out/webp/_staged").glob("webp-*/*.bin")), "the index staged no WebP encodes"
    assert not (root / "data/out/_info.json").exists()  # the default release's out root is not built


# ---------------------------------------------------------------- S3 behind TLS with a private CA

S3_SECRET = "firstHourSecretKey42"
S3_BUCKET = "first-hour"


@pytest.fixture(scope="module")
def tls_s3(tmp_path_factory):
    from ..s3server import MotoS3, private_ca

    ca, ctx = private_ca(tmp_path_factory.mktemp("ca"))
    with MotoS3(secret=S3_SECRET, ssl_context=ctx, ca_bundle=ca) as s3:
        MotoS3.fresh_buckets(s3.client(), S3_BUCKET)
        yield s3


def s3_project(folder: Path, s3, **env_lines: str | None) -> Path:
    """A project folder whose .env holds what the README says for S3 (roots, endpoint, CA bundle,
    credentials), with `env_lines` changed (None: left out)."""
    root = folder.resolve()
    root.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "dagster.yaml", "workspace.yaml"):
        shutil.copy(REPO / name, root / name)
    lines = {"IMNET_RAW_ROOT": f"s3://{S3_BUCKET}/raw", "IMNET_OUT_ROOT": f"s3://{S3_BUCKET}/out",
             "IMNET_NUM_SHARDS": "4", "DAGSTER_HOME": str(root / "data" / "dagster_home"), **s3.env(), **env_lines}
    (root / ".env").write_text("".join(f"{k}={v}\n" for k, v in lines.items() if v is not None))
    return root


def s3_clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in clean_env().items() if not k.startswith("AWS_")}, **extra}


def one_line_error(proc, secret: str = S3_SECRET) -> str:
    """The command failed with one line on stderr, no traceback and no secret anywhere."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert secret not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imnet: "), proc.stderr
    return lines[0]


def test_a_certificate_the_bundle_does_not_vouch_for_names_the_bundle_and_where_it_came_from(tls_s3, tmp_path):
    """A shell or image exporting the system's AWS_CA_BUNDLE wins over the private CA's in .env:
    the line names the bundle in use and the one .env sets; with none set, it says so."""
    import certifi

    root = s3_project(tmp_path / "env-wins", tls_s3)
    line = one_line_error(imnet(["status"], s3_clean_env(AWS_CA_BUNDLE=certifi.where()), cwd=root, check=False))
    assert f"not trusted by AWS_CA_BUNDLE={certifi.where()}: " in line, line
    assert f"wins over AWS_CA_BUNDLE={tls_s3.ca_bundle} in {root / '.env'}" in line, line
    root = s3_project(tmp_path / "no-ca", tls_s3, AWS_CA_BUNDLE=None)
    line = one_line_error(imnet(["status"], s3_clean_env(), cwd=root, check=False))
    assert "not trusted and AWS_CA_BUNDLE is not set" in line, line


def test_credentials_the_store_refuses_are_one_line_naming_its_error_code(tls_s3, tmp_path, monkeypatch):
    """moto checking signatures (every key is unknown to it then): obstore quotes S3's error document
    whole, several lines of XML; the message keeps its code and text on one line."""
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    root = s3_project(tmp_path / "refused", tls_s3)
    line = one_line_error(imnet(["status"], s3_clean_env(), cwd=root, check=False))
    assert "InvalidAccessKeyId: The AWS Access Key Id you provided does not exist" in line, line
    assert "<" not in line and "RequestId" not in line, line
    assert "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line, line


def test_read_dataset_uses_the_aws_variables_of_the_projects_env(demo, tls_s3, tmp_path, monkeypatch):
    """README's S3 settings live in .env; `dataset()` in the project reads its IMNET_OUT_ROOT and,
    as `imnet` does, its endpoint, CA bundle and credentials (the environment holds none of them)."""
    from imnet_assets.read import dataset

    demo_root, _ = demo
    out = demo_root / "data" / "out"
    client = tls_s3.client()
    for name in ["_info.json", "classes.tsv", *json.loads((out / "_info.json").read_text())["splits"]["train"]
                 ["filenames"]]:
        client.upload_file(str(out / name), S3_BUCKET, f"read/{name}")
    root = s3_project(tmp_path / "reader", tls_s3, IMNET_OUT_ROOT=f"s3://{S3_BUCKET}/read")
    for name in [k for k in os.environ if k.startswith(("AWS_", "IMNET_"))] + list(tls_s3.env()):
        monkeypatch.setenv(name, "")  # recorded, so that what .env puts there is taken away afterwards
        monkeypatch.delenv(name)
    monkeypatch.chdir(root)
    assert Counter(label for _, label in dataset()) == expected_labels(demo_root)


def test_a_bucket_that_does_not_exist_is_named(tls_s3, tmp_path):
    """A typo in a root's bucket: the line names the bucket and the endpoint, not 'empty or missing'
    (with `imnet sample-raw` there as the way on) nor only a lease's FileNotFoundError."""
    root = s3_project(tmp_path / "raw-typo", tls_s3, IMNET_RAW_ROOT="s3://frist-hour/raw")
    proc = imnet(["build"], s3_clean_env(), cwd=root, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert f"IMNET_RAW_ROOT=s3://frist-hour/raw: the bucket frist-hour does not exist at {tls_s3.endpoint}: " \
           "check its name" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert S3_SECRET not in proc.stdout + proc.stderr
    root = s3_project(tmp_path / "out-typo", tls_s3, IMNET_OUT_ROOT="s3://frist-hour/out")
    line = one_line_error(imnet(["build"], s3_clean_env(), cwd=root, check=False))
    assert f"(the bucket frist-hour does not exist at {tls_s3.endpoint}: check its name" in line, line
