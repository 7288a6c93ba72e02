"""deploy/: the Helm values against the chart's own schema, and settings sized for 1,024 partitions.

The schema is the chart's values.schema.json, vendored in deploy/k8s (SCHEMA.md says from where
and how it is applied here: chart defaults fill `required`, Kubernetes `$ref`s are checked by type).
"""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
DOCKER = REPO / "deploy" / "docker"
TIMEOUTS = ("DAGSTER_SCHEDULE_GRPC_TIMEOUT_SECONDS", "DAGSTER_SENSOR_GRPC_TIMEOUT_SECONDS")
# What one tick of the top-up schedule or the audit sensor may take at 1,024 shards: a state file
# per shard from S3 at 20-50 ms each is up to ~50 s alone; Dagster's default limit is 60 s.
MIN_TICK_SECONDS = 180


def _whole_values(schema: dict) -> set[str]:
    """Definitions a user writes out whole: list items, and alternatives to a plain value (a string
    or {env: NAME}), which no chart default fills in, so their `required` keys stay required."""
    found: set[str] = set()

    def walk(node, whole: bool) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if whole and ref.startswith("#/definitions/"):
                found.add(ref.rsplit("/", 1)[1])
            for key, value in node.items():
                if key == "anyOf":  # [definition, null] is an optional block the defaults fill
                    walk(value, any(alt.get("type") not in (None, "null") for alt in value))
                else:
                    walk(value, key == "items")
        elif isinstance(node, list):
            for value in node:
                walk(value, whole)

    walk(schema, False)
    return found


def _offline(schema: dict) -> dict:
    """The schema as Helm applies it to the chart's defaults merged with values.yaml, offline:
    `required` dropped from objects the defaults supply (not from list items or alternatives),
    external `$ref`s (kubernetesjsonschema.dev) dropped, keeping the types declared beside them."""
    keep = _whole_values(schema)

    def clean(node, name: str | None = None):
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "required" and "properties" in node and name not in keep:
                    continue
                if key == "$ref" and not str(value).startswith("#"):
                    continue
                out[key] = clean(value)
            return out
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node

    out = clean({k: v for k, v in schema.items() if k != "definitions"})
    out["definitions"] = {name: clean(d, name) for name, d in schema["definitions"].items()}
    return out


@pytest.fixture(scope="module")
def validator():
    schema = json.loads((K8S / "values.schema.json").read_text())
    extra = json.loads((K8S / "values.schema.concurrency.json").read_text())
    assert "concurrency" not in schema["properties"]  # else drop the addition (SCHEMA.md)
    schema["definitions"].update(extra["definitions"])
    schema["properties"]["concurrency"] = {"$ref": "#/definitions/Concurrency"}
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(_offline(schema))


def values() -> dict:
    return yaml.safe_load((K8S / "values.yaml").read_text())


def errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(doc)]


def test_helm_values_match_the_charts_schema(validator):
    assert errors(validator, values()) == []


@pytest.mark.parametrize("change, where", [
    (lambda v: v["dagsterDaemon"].__setitem__("runMonitring", {"enabled": True}), "dagsterDaemon"),
    (lambda v: v["runLauncher"]["config"]["k8sRunLauncher"].__setitem__("imagePullPolicy", "Sometimes"),
     "runLauncher.config.k8sRunLauncher"),
    (lambda v: v["concurrency"]["pools"].__setitem__("default_limit", 8), "concurrency.pools"),
    (lambda v: v["concurrency"]["runs"]["tagConcurrencyLimits"][0].pop("limit"),
     "concurrency.runs.tagConcurrencyLimits.0"),
    (lambda v: v["dagsterDaemon"]["sensors"].__setitem__("numWorkers", "four"), "dagsterDaemon.sensors.numWorkers"),
])
def test_the_schema_check_catches_a_wrong_key_or_type(validator, change, where):
    doc = copy.deepcopy(values())
    change(doc)
    found = errors(validator, doc)
    assert any(e.startswith(where) for e in found), found


def _env(entries) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in entries} if isinstance(entries, list) else dict(entries)


def test_helm_values_are_sized_for_1024_partitions():
    v = values()
    monitoring = v["dagsterDaemon"]["runMonitoring"]
    # configmap-instance.yaml renders it as run_monitoring.free_slots_after_run_end_seconds
    assert 0 < monitoring["freeSlotsAfterRunEndSeconds"] <= monitoring["pollIntervalSeconds"] * 5
    for part in ("dagsterDaemon", "dagsterWebserver"):
        env = _env(v[part]["env"])
        for name in TIMEOUTS:
            assert int(env[name]) >= MIN_TICK_SECONDS, (part, name, env.get(name))


def test_docker_host_is_sized_for_1024_partitions():
    compose = yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())
    for service in ("webserver", "daemon"):
        env = {**compose["x-dagster"].get("environment", {}), **compose["services"][service].get("environment", {})}
        for name in TIMEOUTS:
            assert int(env[name]) >= MIN_TICK_SECONDS, (service, name)
    instance = yaml.safe_load((DOCKER / "dagster.yaml").read_text())
    assert instance["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    assert instance["run_launcher"]["module"] == "imnet_assets.defs.launcher"
