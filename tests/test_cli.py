"""The `rayfleet` command line against the running test fleet (a real subprocess attaching to Ray)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def rayfleet(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rayfleet.control_plane.cli.main", *args], capture_output=True,
                          text=True, timeout=120, check=check)


def test_help_lists_every_command():
    out = rayfleet("--help").stdout
    for command in ("up", "status", "scale", "drain", "migrate", "down", "make-demo-models", "demo"):
        assert command in out


def test_make_demo_models_writes_loadable_folders(tmp_path):
    out = rayfleet("make-demo-models", str(tmp_path)).stdout.split()
    assert len(out) == 2
    for folder in out:
        assert {"config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in (tmp_path / folder.split("/")[-1]).iterdir()}


def test_up_rejects_an_invalid_spec_naming_the_field(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("pools:\n  - name: a\n    model: /m\n    max_replicas: 0\n")
    result = rayfleet("up", str(spec), check=False)
    assert result.returncode != 0
    assert "pools[0].max_replicas" in result.stderr


@pytest.mark.engines
def test_status_and_scale_against_the_running_fleet(fleet):
    import ray

    address = ray.get_runtime_context().gcs_address
    status = json.loads(rayfleet("--address", address, "status", "--json").stdout)
    assert {"tiny-a", "tiny-b", "mig", "cold"} == set(status["pools"])
    table = rayfleet("--address", address, "status").stdout
    assert "tiny-a" in table and "kv%" in table
    refused = rayfleet("--address", address, "scale", "tiny-b", "7", check=False)
    assert refused.returncode != 0 and "max_replicas=2" in refused.stderr
