"""Launch helpers shared by the `rayfleet` commands and the demo: reach or start a Ray cluster, load a spec,
build the demo models it needs, deploy the Serve app and wait for the replicas, print the fleet status.

Every command talks to a Ray cluster: `--address` (or RAY_ADDRESS) names one; without it `up` and `demo`
start a local one (`ray start --head`, with the Ray of this Python environment, activated or not) so that
the fleet outlives the command, and the other commands attach to it. A cluster `up` started is remembered
(`~/.rayfleet/local-cluster.json`), so that `down --stop-ray` stops that cluster and no other.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

logger = logging.getLogger("rayfleet.cli")

DEMO_SPEC = files("rayfleet.control_plane.cli") / "demo_fleet.yaml"
DEFAULT_DEMO_MODELS = ".demo-models"
# Each replica actor reserves whole logical CPUs; a 2-core machine still needs room for several replicas,
# the controller and Serve (ENVIRONMENT.md: deployments hang with too few logical CPUs).
LOCAL_LOGICAL_CPUS = 16
STARTED_CLUSTER = Path(os.environ.get("RAYFLEET_HOME", Path.home() / ".rayfleet")) / "local-cluster.json"


def connect(address: str | None, start_local: bool) -> None:
    import ray

    # Without an address: the cluster `ray start` (or `rayfleet up`) last started on this machine, as Ray's
    # own CLI finds it; not Ray's legacy "any running cluster", which may be someone else's `ray.init`.
    address = address or os.environ.get("RAY_ADDRESS") or ray._private.utils.read_ray_address()
    if address:
        ray.init(address=address, namespace="rayfleet", log_to_driver=False)
        return
    if not start_local:
        raise SystemExit("no Ray cluster is running; start one with `rayfleet up` (or pass --address)")
    ray.init(address=start_local_cluster(), namespace="rayfleet", log_to_driver=False)
    remember_started_cluster()


def start_local_cluster() -> str:
    """`ray start --head` with this environment's Ray (`python -m`: no `ray` on PATH needed); its address."""
    import ray

    logger.info("starting a local Ray cluster (%d logical CPUs)", LOCAL_LOGICAL_CPUS)
    started = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={_free_port()}",
                              f"--num-cpus={LOCAL_LOGICAL_CPUS}", "--disable-usage-stats", "--include-dashboard=false"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if started.returncode != 0:
        last = (started.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"could not start a local Ray cluster: {last}")
    return ray._private.utils.read_ray_address()


def _free_port() -> int:
    """A free port for the head's GCS: Ray's default 6379 may belong to another cluster (or a Redis)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def remember_started_cluster() -> None:
    import ray

    node = ray._private.worker.global_worker.node
    STARTED_CLUSTER.parent.mkdir(parents=True, exist_ok=True)
    STARTED_CLUSTER.write_text(json.dumps({"gcs_address": node.gcs_address, "session_name": node.session_name}))


def stop_started_cluster() -> str:
    """Stop the cluster the driver is connected to if `rayfleet up` started it; say what was done.

    Only that cluster's processes go (matched by its session name), unlike `ray stop`, which stops every
    Ray cluster on the machine."""
    import psutil
    import ray

    node = ray._private.worker.global_worker.node
    record = json.loads(STARTED_CLUSTER.read_text()) if STARTED_CLUSTER.exists() else {}
    if record.get("gcs_address") != node.gcs_address or record.get("session_name") != node.session_name:
        return f"the Ray cluster at {node.gcs_address} was not started by rayfleet: left running (`ray stop` stops it)"
    session = record["session_name"]
    ray.shutdown()
    processes = [p for p in psutil.process_iter(["cmdline"]) if session in " ".join(p.info["cmdline"] or ())]
    for process in processes:
        _signal(process, signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=15)
    for process in alive:
        _signal(process, signal.SIGKILL)
    STARTED_CLUSTER.unlink(missing_ok=True)
    address_file = Path(ray._private.utils.get_ray_address_file(None))
    if address_file.exists() and address_file.read_text().strip() == record["gcs_address"]:
        address_file.unlink()  # as `ray stop` does: later commands must not look for the stopped cluster
    return f"stopped the local Ray cluster rayfleet started ({len(processes)} processes of {session})"


def _signal(process, sig: int) -> None:
    try:
        process.send_signal(sig)
    except Exception:  # already gone
        pass


def controller():
    import ray

    from rayfleet.control_plane.controller_api import CONTROLLER_NAME, NAMESPACE

    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        raise SystemExit("no fleet is running on this Ray cluster; start one with `rayfleet up`") from None


def check_keys(spec) -> None:
    """Before anything starts: a spec whose ingress would refuse to start for want of a key is a one-line error
    naming the field, not a failed Serve deployment. Keys named by environment variables may exist only on the
    cluster: the ingress checks those itself."""
    from rayfleet.control_plane.serving.auth import KeyRing

    if not (spec.ingress.api_keys_env or spec.ingress.admin_keys_env):
        KeyRing.from_spec(spec.ingress)


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
    from rayfleet.control_plane.serving.grpc_registration import GRPC_SERVICER_FUNCTIONS

    if spec.ingress.grpc_port is None:
        return {}
    return {"port": spec.ingress.grpc_port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS}


def _wait_with_progress(handle, spec, wait_s: float) -> dict:
    import ray
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    total = sum(p.start_replicas for p in spec.pools)
    deadline = time.monotonic() + wait_s
    with logging_redirect_tqdm(), tqdm(total=total, desc="replicas ready", unit="replica") as bar:
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
