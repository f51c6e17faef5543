"""The `rayfleet` command line against the running test fleet (a real subprocess attaching to Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def listening_pid(port: int) -> int | None:
    import psutil

    return next((c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port), None)


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


def test_up_without_a_key_or_auth_none_is_refused_naming_the_field_before_starting_anything(tmp_path):
    spec = tmp_path / "open.yaml"
    spec.write_text("pools:\n  - name: a\n    model: /m\n")
    result = rayfleet("up", str(spec), "--address", "127.0.0.1:1", check=False)  # nothing listens there
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "ingress.auth is 'api_keys' but no key is configured" in result.stderr
    assert "ingress.auth: none" in result.stderr


@pytest.mark.engines
def test_status_and_scale_against_the_running_fleet(fleet):
    import ray

    address = ray.get_runtime_context().gcs_address
    status = json.loads(rayfleet("--address", address, "status", "--json").stdout)
    assert {"tiny-a", "tiny-b", "mig", "cold"} == set(status["pools"])
    assert status["kv_store"] is None  # asked for, and the session fleet has none (its line: test_kv_store.py)
    # The session fleet's llumnix plans for the "mig" pool only: it prices moves there every tick.
    policy = status["migration_policy"]
    assert policy["name"] == "llumnix" and set(policy["pause_s"]) == {"mig"} and policy["pause_s"]["mig"] > 0
    table = rayfleet("--address", address, "status").stdout
    assert "tiny-a" in table and "kv%" in table
    assert "migration policy llumnix: moves priced at a pause of mig " in table
    refused = rayfleet("--address", address, "scale", "tiny-b", "7", check=False)
    assert refused.returncode != 0 and "max_replicas=2" in refused.stderr


def test_control_commands_load_the_controller_class_without_vllm():
    """`ray.get_actor` imports the actor's class module in the caller: the controller's module must not pull vLLM
    (or torch) in, or every `status`, `scale`, `drain`, `migrate` and `down` pays seconds of imports for it (10 s
    on this machine before the messages stopped importing vLLM for a type annotation)."""
    probe = ("import sys; import rayfleet.control_plane.controller, rayfleet.control_plane.cli.main; "
             "print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_version_names_rayfleet_ray_and_vllm():
    out = rayfleet("--version").stdout
    assert out.startswith("rayfleet 0.") and "ray 2.60" in out and "vllm 0.32" in out


def test_every_subcommand_takes_address_as_rays_cli_does():
    from rayfleet.control_plane.cli.main import build_parser

    parser = build_parser()
    for argv in (["status"], ["scale", "p", "1"], ["drain", "r"], ["migrate", "q", "a", "b"], ["down"], ["up"],
                 ["demo"], ["make-demo-models", "d"]):
        assert parser.parse_args([*argv, "--address", "10.0.0.1:6379"]).address == "10.0.0.1:6379"
        assert parser.parse_args(["--address", "10.0.0.2:6379", *argv]).address == "10.0.0.2:6379"


def test_an_error_is_one_line_not_a_traceback(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    result = rayfleet("make-demo-models", str(blocked / "models"), check=False)  # a folder under a file
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("rayfleet")]
    assert lines and "make-demo-models" in lines[0] and "Error" in lines[0], result.stderr



def test_simulate_shards_a_roofline_profile_and_refuses_a_calibrated_one_in_one_line():
    sharded = json.loads(rayfleet("simulate", "--profile", "a100-llama-13b", "--tensor-parallel", "2", "--replicas",
                                  "2", "--rate", "2", "--duration-s", "20", "--json").stdout)
    assert sharded["requests"] == sharded["served"] == 40
    refused = rayfleet("simulate", "--profile", "cpu-tiny-llama-b", "--tensor-parallel", "2", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "does not keep the one-GPU roofline" in refused.stderr and "a100-llama-13b" in refused.stderr, refused.stderr

@pytest.mark.engines
def test_up_from_the_unactivated_venv_serves_on_a_port_a_new_ingress_takes_over_and_down_stop_ray_stops_only_its_cluster(ray_cluster, tmp_path, demo_models):
    """`rayfleet up` with no `ray` on PATH starts a cluster of its own (the suite's keeps running) whose ingress
    replica listens on the spec's port itself, a replacement replica takes the port over when it dies, and
    `down --stop-ray` stops exactly that cluster."""
    import tempfile

    import psutil

    from conftest import free_port

    ray_tmp = tempfile.mkdtemp(prefix="rf-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RAY_ADDRESS")}
    env.update(PATH="/usr/bin:/bin", RAY_TMPDIR=ray_tmp, RAYFLEET_HOME=str(tmp_path))
    spec = tmp_path / "fleet.yaml"
    port = free_port()
    spec.write_text(f"name: cli-test\npools:\n  - name: idle\n    model: {demo_models / 'tiny-llama-a'}\n"
                    f"    min_replicas: 0\ningress: {{port: {port}, auth: none}}\n")
    cli = [str(Path(sys.executable).parent / "rayfleet")]
    try:
        up = subprocess.run([*cli, "up", str(spec), "--wait", "60"], env=env, capture_output=True, text=True,
                            timeout=240)
        assert up.returncode == 0, up.stderr
        assert "is up" in up.stdout and "/dashboard" in up.stdout
        # One ingress replica on a cluster rayfleet started: Serve's direct ingress, the replica itself listens
        # on the spec's port (no proxy hop).
        listener = listening_pid(port)
        assert "ServeReplica:rayfleet:OpenAIIngress" in psutil.Process(listener).name()
        # A crashed ingress replica is replaced on the same port (the only one it may use). Seconds on a quiet
        # machine; in the suite, with the session fleet's engines on the same two cores, the new replica's
        # start (imports, vLLM's renderer) once took over a minute.
        psutil.Process(listener).kill()
        deadline = time.monotonic() + 180
        while listening_pid(port) in (None, listener):
            assert time.monotonic() < deadline, "no new ingress replica listens on the port 3 minutes after"
            time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        started = json.loads((tmp_path / "local-cluster.json").read_text())
        status = subprocess.run([*cli, "status", "--json", "--address", started["gcs_address"]], env=env,
                                capture_output=True, text=True, timeout=120)
        assert json.loads(status.stdout)["fleet"] == "cli-test", status.stderr
        down = subprocess.run([*cli, "down", "--stop-ray"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        assert "stopped the local Ray cluster rayfleet started" in down.stdout
        assert not (tmp_path / "local-cluster.json").exists()
        assert ray_cluster.get(ray_cluster.put("the suite's own cluster still runs")) == \
            "the suite's own cluster still runs"
    finally:  # whatever a failed run left of that cluster
        for process in psutil.process_iter(["cmdline"]):
            if ray_tmp in " ".join(process.info["cmdline"] or ()):
                process.kill()
