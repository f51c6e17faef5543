"""Bad values files are rejected by `helm install` and `helm lint` with a message that names the field.

Runs Helm v4 for real (helm/tools/chart_check.py under the Helm tools' Python, see tests/test_helm_chart.py
for what is and is not reached). values.schema.json catches types, required fields, enumerations and
unknown keys; checks across fields that JSON Schema cannot express fail in the templates with the field
path in the message. The schema's `fleet` part is FleetSpec's own JSON Schema, kept in sync by
helm/tools/sync_fleet_schema.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "rayfleet"
sys.path.insert(0, str(REPO / "helm" / "tools"))
from helm_tools import HelmToolsMissing, check_cases  # noqa: E402

GROUP = {"name": "gpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 2, "accelerator": {"type": "L4", "count": 1}}
POOL = {"name": "small", "model": "Qwen/Qwen2.5-0.5B-Instruct", "resources": {"num_gpus": 1, "accelerator_type": "L4"}}

# case: (values file content, text the error must contain)
SCHEMA_REJECTS: dict[str, tuple[dict[str, Any], str]] = {
    "wrong-type-max-replicas": (
        {"workerGroups": [{**GROUP, "maxReplicas": "four"}]},
        "at '/workerGroups/0/maxReplicas': got string, want integer"),
    "wrong-type-gpu-count": (
        {"workerGroups": [{**GROUP, "accelerator": {"type": "L4", "count": 0.5}}]},
        "at '/workerGroups/0/accelerator/count': got number, want integer"),
    "missing-pool-model": (
        {"fleet": {"pools": [{"name": "small"}]}},
        "at '/fleet/pools/0': missing property 'model'"),
    "missing-group-name": (
        {"workerGroups": [{k: v for k, v in GROUP.items() if k != "name"}]},
        "at '/workerGroups/0': missing property 'name'"),
    "missing-external-redis-url": (
        {"redis": {"mode": "external"}},
        "at '/redis/external/url': minLength: got 0, want 1"),
    "redis-url-with-credentials": (
        {"redis": {"mode": "external", "external": {"url": "redis://user:secret@redis.example:6379"}}},
        "at '/redis/external/url': 'redis://user:secret@redis.example:6379' does not match pattern"),
    "missing-rl-entrypoint": (
        {"rlJob": {"enabled": True, "workerGroups": [GROUP]}},
        "at '/rlJob/entrypoint': minLength: got 0, want 1"),
    "unknown-top-level-key": (
        {"workerGroup": [GROUP]},
        "at '': additional properties 'workerGroup' not allowed"),
    "unknown-fleet-key": (
        {"fleet": {"pools": [{**POOL, "max_replica": 3}]}},
        "at '/fleet/pools/0': additional properties 'max_replica' not allowed"),
    "bad-redis-mode": (
        {"redis": {"mode": "embedded"}},
        "at '/redis/mode': value must be one of 'bundled', 'external'"),
    "bad-group-name": (
        {"workerGroups": [{**GROUP, "name": "GPU_Pool"}]},
        "at '/workerGroups/0/name': 'GPU_Pool' does not match pattern"),
    "bad-quantity": (
        {"workerGroups": [{**GROUP, "resources": {"limits": {"memory": "lots"}}}]},
        "at '/workerGroups/0/resources/limits/memory'"),
}
H100_POOL = {**POOL, "resources": {"num_gpus": 1, "accelerator_type": "H100"}}
CPU_GROUP = {k: v for k, v in GROUP.items() if k != "accelerator"}
# Rejected by the templates (relations between fields), with the field path in the message.
TEMPLATE_REJECTS: dict[str, tuple[dict[str, Any], str]] = {
    "pool-accelerator-without-group": (
        {"fleet": {"pools": [H100_POOL]}, "workerGroups": [GROUP]},
        'fleet.pools[0].resources.accelerator_type: no worker group offers "H100" '
        "(accelerator types of workerGroups: L4)"),
    "gpu-pool-without-gpu-group": (
        {"fleet": {"pools": [{"name": "small", "model": "m", "resources": {"num_gpus": 1}}]},
         "workerGroups": [CPU_GROUP]},
        "fleet.pools[0].resources.num_gpus: the pool needs GPUs but no worker group of workerGroups has an "
        "accelerator"),
    "duplicate-group-names": (
        {"workerGroups": [GROUP, GROUP]},
        'workerGroups[1].name: "gpu" is used by another worker group'),
    "replicas-outside-bounds": (
        {"workerGroups": [{**GROUP, "replicas": 5}]},
        "workerGroups[0].replicas: 5 is outside [minReplicas 0, maxReplicas 2]"),
    "accelerator-without-node-labels": (
        {"workerGroups": [{**GROUP, "accelerator": {"type": "MI300X", "count": 1}}],
         "fleet": {"pools": [{**POOL, "resources": {"num_gpus": 1, "accelerator_type": "MI300X"}}]}},
        'workerGroups[0].accelerator.type: "MI300X" has no node label values in accelerators.products'),
    "ray-resources-twice": (
        {"workerGroups": [{**GROUP, "rayStartParams": {"num-gpus": "1"}}]},
        "workerGroups[0].rayStartParams.num-gpus: KubeRay rejects it together with the group's Ray resources"),
    "name-too-long-for-kuberay": (
        {"fullnameOverride": "a-rayfleet-name-that-is-longer-than-kuberay-allows"},
        'RayService name "a-rayfleet-name-that-is-longer-than-kuberay-allows": KubeRay requires at most 47 characters'),
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Each case as a real values file, installed and linted by Helm."""
    directory = tmp_path_factory.mktemp("values")
    cases = {}
    for name, (values, _) in {**SCHEMA_REJECTS, **TEMPLATE_REJECTS}.items():
        path = directory / f"values-{name}.yaml"
        path.write_text(yaml.safe_dump(values))
        cases[name] = {"values_files": [str(path)]}
    try:
        return check_cases(cases)
    except HelmToolsMissing as missing:
        pytest.fail(str(missing))


@pytest.mark.parametrize("case", SCHEMA_REJECTS)
def test_schema_rejects_the_values_file_naming_the_field(reports, case):
    report = reports[case]
    assert "objects" not in report, "rendered although the values are invalid"
    assert "values don't meet the specifications of the schema" in report["error"]
    assert SCHEMA_REJECTS[case][1] in report["error"]
    assert {"severity": "ERROR", "path": "values.yaml"} in report["lint"]


@pytest.mark.parametrize("case", TEMPLATE_REJECTS)
def test_templates_reject_inconsistent_values_naming_the_field(reports, case):
    report = reports[case]
    assert "objects" not in report, "rendered although the values are inconsistent"
    assert TEMPLATE_REJECTS[case][1] in report["error"]


def test_values_schema_carries_the_current_fleet_spec_schema():
    from sync_fleet_schema import SCHEMA, render, synced

    current = SCHEMA.read_text()
    assert current == render(synced(json.loads(current))), (
        "helm/rayfleet/values.schema.json is out of date with control_plane/spec.py: "
        "run .venv/bin/python helm/tools/sync_fleet_schema.py"
    )


def test_default_values_satisfy_their_own_schema():
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))
