"""Launch helpers shared by the `rayfleet` commands and the demo: reach or start a Ray cluster, load a spec,
build the demo models it needs, deploy the Serve app and wait for the replicas, print the fleet status.

Every command talks to a Ray cluster: `--address` (or RAY_ADDRESS) names one; without it `up` and `demo`
start a local one (`ray start --head`) so that the fleet outlives the command, and the other commands
attach to it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from importlib.resources import files
from pathlib import Path

logger = logging.getLogger("rayfleet.cli")

DEMO_SPEC = files("rayfleet.control_plane.cli") / "demo_fleet.yaml"
DEFAULT_DEMO_MODELS = ".demo-models"
# Each replica actor reserves whole logical CPUs; a 2-core machine still needs room for several replicas,
# the controller and Serve (ENVIRONMENT.md: deployments hang with too few logical CPUs).
LOCAL_LOGICAL_CPUS = 16


def connect(address: str | None, start_local: bool) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace="rayfleet", log_to_driver=False)
        return
    try:
        ray.init(address="auto", namespace="rayfleet", log_to_driver=False)
        return
    except ConnectionError:
        if not start_local:
            raise SystemExit("no Ray cluster is running; start one with `rayfleet up` (or pass --address)")
    logger.info("starting a local Ray cluster (%d logical CPUs)", LOCAL_LOGICAL_CPUS)
    subprocess.run(["ray", "start", "--head", f"--num-cpus={LOCAL_LOGICAL_CPUS}", "--disable-usage-stats",
                    "--include-dashboard=false"], check=True, stdout=subprocess.DEVNULL)
    ray.init(address="auto", namespace="rayfleet", log_to_driver=False)


def controller():
    import ray

    from rayfleet.control_plane.controller_api import CONTROLLER_NAME, NAMESPACE

    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        raise SystemExit("no fleet is running on this Ray cluster; start one with `rayfleet up`") from None


def deploy(spec, wait_s: float) -> str:
    """Deploy the controller and the ingress for `spec`; returns the endpoint URL once replicas are ready."""
    from ray import serve

    from rayfleet.control_plane.serve_app import build_app

    serve.start(http_options={"host": spec.ingress.host, "port": spec.ingress.port}, grpc_options=grpc_options(spec))
    serve.run(build_app({"spec": spec.model_dump()}), name="rayfleet", route_prefix="/", blocking=False)
    url = f"http://{spec.ingress.host}:{spec.ingress.port}/v1"
    if spec.ingress.grpc_port:
        logger.info("gRPC endpoint (vLLM's VllmEngine service): %s:%d", spec.ingress.host, spec.ingress.grpc_port)
    ready = _wait_with_progress(controller(), spec, wait_s)
    logger.info("fleet ready: %s", ready)
    return url


def grpc_options(spec) -> dict:
    """Serve's gRPC proxy serving vLLM's gRPC protocol, when the spec gives a gRPC port."""
    from rayfleet.control_plane.serving.grpc_servicer import GRPC_SERVICER_FUNCTIONS

    if spec.ingress.grpc_port is None:
        return {}
    return {"port": spec.ingress.grpc_port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS}


def _wait_with_progress(handle, spec, wait_s: float) -> dict:
    import ray
    from tqdm import tqdm

    total = sum(p.start_replicas for p in spec.pools)
    deadline = time.monotonic() + wait_s
    with tqdm(total=total, desc="replicas ready", unit="replica") as bar:
        while time.monotonic() < deadline:
            status = ray.get(handle.status.remote())
            ready = sum(p["ready"] for p in status["pools"].values())
            bar.n = min(ready, total)
            bar.refresh()
            if ready >= total:
                return {name: p["ready"] for name, p in status["pools"].items()}
            time.sleep(1.0)
    raise SystemExit(f"fleet not ready after {wait_s:.0f} s; see `rayfleet status`")


def load_any_spec(path: str | None):
    from rayfleet.control_plane.spec import SpecError, load_spec

    from rayfleet.actors.tasks import TRAINED_MODELS_DIR

    os.environ.setdefault("RAYFLEET_DEMO_MODELS", str(Path(DEFAULT_DEMO_MODELS).resolve()))
    os.environ.setdefault("RAYFLEET_TASK_MODELS", str(TRAINED_MODELS_DIR))
    try:
        return load_spec(path or str(DEMO_SPEC))
    except SpecError as error:
        raise SystemExit(str(error)) from None


def ensure_demo_models(spec) -> None:
    """Build the tiny demo models when the spec points at the demo models folder and they are missing."""
    from rayfleet.control_plane.cli.demo_models import DEMO_MODELS, build_demo_models

    demo_dir = Path(os.environ["RAYFLEET_DEMO_MODELS"])
    if any(Path(p.model).parent == demo_dir and not Path(p.model).exists() for p in spec.pools):
        logger.info("building demo models in %s", demo_dir)
        build_demo_models(demo_dir, DEMO_MODELS)


def routing_decisions(limit: int) -> dict:
    """The ingress' recent routing decisions, over a Serve handle (no URL or API key needed)."""
    from ray import serve

    return serve.get_app_handle("rayfleet").routing_decisions.remote(limit).result(timeout_s=30)


def render_routing(routing: dict) -> str:
    lines = [f"router {routing['router']}: last {len(routing['decisions'])} decisions"]
    for d in routing["decisions"]:
        stage = f" workflow {d['workflow_id']} stage {d['workflow_stage']}" if d.get("workflow_id") else ""
        lines.append(f"  {d['request_id']} -> {d['pool']} / {d['replica_id']}: {d['why']}{stage}")
        for c in d["candidates"]:
            lines.append(f"      {c['pool']:<14} quality {c['quality']:.2f}  length {c['output_tokens']:6.1f}  "
                         f"latency {1e3 * c['latency_s']:7.1f} ms  backlog {c['backlog_tokens']:>5}  "
                         f"objective {c['objective']:+.3f}")
    return "\n".join(lines)


def render_status(status: dict) -> str:
    lines = [f"fleet {status['fleet']}"]
    for name, pool in status["pools"].items():
        lines.append(f"  pool {name}: {pool['ready']}/{pool['desired']} ready (min {pool['min']}, max {pool['max']}), "
                     f"{pool['restarts']} replaced")
    header = f"  {'replica':<22}{'state':<10}{'run':>5}{'wait':>6}{'kv%':>7}{'tokens':>8}{'tok/s':>8}"
    lines.append(header)
    for r in status["replicas"]:
        lines.append(f"  {r['replica_id']:<22}{r['state']:<10}{r['running']:>5}{r['waiting']:>6}"
                     f"{100 * r['kv_cache_usage']:>6.1f}%{r['tokens_in_flight']:>8}{r['decode_tokens_per_s']:>8.1f}")
    if status.get("migrations"):
        lines.append("  recent migrations:")
        for m in status["migrations"][-10:]:
            lines.append(f"    {m['migration_id']} {m['request_id']} {m['src']} -> {m['dst']} {m['mode']} "
                         f"{m['outcome']}: downtime {1e3 * m['downtime_s']:.1f} ms, {m['stages']} stages, "
                         f"{m['blocks_moved']} blocks, {m['bytes_moved'] / 2**20:.2f} MiB")
    return "\n".join(lines)
