"""Launch helpers shared by the `rayfleet` commands and the demo: reach or start a Ray cluster, load a spec,
build the demo models it needs, deploy the Serve app and wait for the replicas, print the fleet status.

Every command talks to a Ray cluster: `--address` (or RAY_ADDRESS) names one; without it `up` and `demo`
start a local one (`ray start --head`, with the Ray of this Python environment, activated or not) so that
the fleet outlives the command, and the other commands attach to it. A cluster `up` started is remembered
(`~/.rayfleet/local-cluster.json`), so that `down --stop-ray` stops that cluster and no other.

A cluster rayfleet starts runs Serve's direct ingress when the spec allows it (`ingress.direct_ingress`): the
ingress replica listens on the spec's port itself and requests skip the proxy hop. Serve reads that setting
when Ray starts, so it is part of the cluster, recorded with it, and checked against later specs.
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


def connect(address: str | None, start_local: bool, serve_env: dict[str, str] | None = None) -> dict[str, str]:
    """Attach to (or, with `start_local`, start) a Ray cluster; returns the Serve settings it started with.

    `serve_env` is what a cluster started here starts with (`direct_ingress_env`); for a cluster rayfleet
    started earlier it comes from its record, for any other cluster it is unknown and taken as Serve's defaults.
    """
    import ray

    # Without an address: the cluster `ray start` (or `rayfleet up`) last started on this machine, as Ray's
    # own CLI finds it; not Ray's legacy "any running cluster", which may be someone else's `ray.init`.
    address = address or os.environ.get("RAY_ADDRESS") or ray._private.utils.read_ray_address()
    if address:
        ray.init(address=address, namespace="rayfleet", log_to_driver=False)
        return started_cluster_record().get("serve_env", {})
    if not start_local:
        raise SystemExit("no Ray cluster is running; start one with `rayfleet up` (or pass --address)")
    serve_env = serve_env or {}
    ray.init(address=start_local_cluster(serve_env), namespace="rayfleet", log_to_driver=False)
    remember_started_cluster(serve_env)
    return serve_env


def direct_ingress_env(ingress) -> dict[str, str]:
    """Serve's settings for direct ingress on the ingress' port (empty: Serve's proxy), read when Ray starts."""
    if not ingress.uses_direct_ingress:
        return {}
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(ingress.port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(ingress.port + 1),
            # A replica waits this long for an external load balancer to deregister it; there is none here.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
            # Serve keeps a freed port out of use for 150 s so HAProxy's stale server lists expire; there is no
            # HAProxy here, and with one port a replacement ingress (a crashed replica, a redeploy with another
            # spec) would otherwise find no port for those 150 s.
            "RAY_SERVE_PORT_QUARANTINE_S": "0"}


def start_local_cluster(serve_env: dict[str, str]) -> str:
    """`ray start --head` with this environment's Ray (`python -m`: no `ray` on PATH needed); its address."""
    import ray

    logger.info("starting a local Ray cluster (%d logical CPUs%s)", LOCAL_LOGICAL_CPUS,
                ", Serve direct ingress" if serve_env else "")
    started = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={_free_port()}",
                              f"--num-cpus={LOCAL_LOGICAL_CPUS}", "--disable-usage-stats", "--include-dashboard=false"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **serve_env})
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


def remember_started_cluster(serve_env: dict[str, str]) -> None:
    import ray

    node = ray._private.worker.global_worker.node
    STARTED_CLUSTER.parent.mkdir(parents=True, exist_ok=True)
    STARTED_CLUSTER.write_text(json.dumps({"gcs_address": node.gcs_address, "session_name": node.session_name,
                                           "serve_env": serve_env}))


def started_cluster_record() -> dict:
    """The record of the cluster the driver is connected to, if `rayfleet up` started it (else empty)."""
    import ray

    node = ray._private.worker.global_worker.node
    record = json.loads(STARTED_CLUSTER.read_text()) if STARTED_CLUSTER.exists() else {}
    started_here = record.get("gcs_address") == node.gcs_address and record.get("session_name") == node.session_name
    return record if started_here else {}


def stop_started_cluster() -> str:
    """Stop the cluster the driver is connected to if `rayfleet up` started it; say what was done.

    Only that cluster's processes go (matched by its session name), unlike `ray stop`, which stops every
    Ray cluster on the machine."""
    import psutil
    import ray

    node = ray._private.worker.global_worker.node
    record = started_cluster_record()
    if not record:
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


def deploy(spec, wait_s: float, serve_env: dict[str, str]) -> str:
    """Deploy the controller and the ingress for `spec` on a cluster started with `serve_env`; returns the
    endpoint URL once the replicas are ready and the ingress answers."""
    base = start_serve(spec, serve_env)
    if spec.ingress.grpc_port:
        logger.info("gRPC endpoint (vLLM's VllmEngine service): %s:%d", spec.ingress.host, spec.ingress.grpc_port)
    deadline = time.monotonic() + wait_s
    ready = _wait_with_progress(controller(), spec, wait_s)
    _wait_for_http(base, deadline)
    logger.info("fleet ready: %s", ready)
    return f"{base}/v1"


def start_serve(spec, serve_env: dict[str, str]) -> str:
    """Start Serve for `spec` on a cluster started with `serve_env` and deploy the fleet's app (without waiting
    for it); returns the ingress' base URL."""
    from ray import serve

    from rayfleet.control_plane.serve_app import build_app

    direct = check_serve_env(spec, serve_env)
    # With direct ingress the ingress replica owns the spec's port; Serve's proxy, if it starts, gets another.
    proxy_port = _free_port() if direct else spec.ingress.port
    serve.start(http_options={"host": spec.ingress.host, "port": proxy_port}, grpc_options=grpc_options(spec))
    serve.run(build_app({"spec": spec.model_dump()}), name="rayfleet", route_prefix="/", blocking=False)
    base = f"http://{spec.ingress.host}:{spec.ingress.port}"
    logger.info("HTTP endpoint %s (%s)", base, "Serve direct ingress" if direct else "through Serve's proxy")
    return base


def check_serve_env(spec, serve_env: dict[str, str]) -> bool:
    """Whether the cluster serves `spec` by direct ingress; a spec the cluster cannot serve as asked is an error
    naming the field (the setting was fixed when the cluster started)."""
    direct = serve_env.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1"
    ingress = spec.ingress
    if direct and not (ingress.uses_direct_ingress
                       and serve_env.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT") == str(ingress.port)):
        raise SystemExit(
            f"this Ray cluster was started with Serve's direct ingress on port "
            f"{serve_env.get('RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT')}, which ingress (port {ingress.port}, "
            f"num_replicas {ingress.num_replicas}, grpc_port {ingress.grpc_port}, direct_ingress "
            f"'{ingress.direct_ingress}') cannot use; stop it (`rayfleet down --stop-ray`) and run `rayfleet up` again")
    if not direct and ingress.direct_ingress == "on":
        raise SystemExit("ingress.direct_ingress is 'on' but this Ray cluster was not started with Serve's direct "
                         "ingress (rayfleet sets it only on clusters it starts); use 'auto' or 'off'")
    return direct


def _wait_for_http(base: str, deadline: float) -> None:
    """Until the ingress answers HTTP at all (any status): the controller's readiness says nothing of it."""
    import httpx

    while True:
        try:
            httpx.get(f"{base}/health", timeout=5)
            return
        except httpx.HTTPError as error:
            if time.monotonic() > deadline:
                raise SystemExit(f"the ingress did not answer at {base} ({type(error).__name__})") from None
        time.sleep(0.5)


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


def rl_progress() -> dict | None:
    """The RL job's progress (the last run on this cluster), if one ran."""
    import ray

    from rayfleet.actors.rl.progress import find_progress_actor

    actor = find_progress_actor()
    return None if actor is None else ray.get(actor.status.remote(), timeout=10)


def render_rl(rl: dict) -> list[str]:
    run = rl["run"]
    lines = [f"  rl run {run.get('run_id', '?')} (k={run.get('k')}, {run.get('sync')} sync, pool {run.get('pool')}): "
             f"{rl['state']}, {rl['steps_done']} steps of {run.get('steps', '?')}"
             + (f"; error: {rl['error']}" if rl["error"] else "")]
    for s in rl["steps"][-3:]:
        lines.append(f"    step {s['step']}: reward {s['reward_mean']:.3f}, {s['samples_per_s']:.1f} samples/s, lag "
                     f"{s['version_lag_mean']:.2f} (max {s['version_lag_max']}), {s['dropped_stale']} dropped stale, "
                     f"rollout weights v{s['pool_version']}, sync {s['sync_s']:.2f} s total, "
                     f"{s['replays']} replays")
    if "heldout_reward" in run:
        lines.append(f"    held-out reward by snapshot: {run['heldout_reward']}")
    return lines


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
    policy = status.get("migration_policy", {})
    if policy.get("pause_s"):
        priced = ", ".join(f"{pool} {1e3 * pause:.0f} ms" for pool, pause in sorted(policy["pause_s"].items()))
        lines.append(f"  migration policy {policy['name']}: moves priced at a pause of {priced}")
        lines += [f"    refused {request_id}: {why}" for request_id, why in policy.get("refused", [])]
    if status.get("migrations"):
        lines.append("  recent migrations:")
        for m in status["migrations"][-10:]:
            lines.append(f"    {m['migration_id']} {m['request_id']} {m['src']} -> {m['dst']} {m['mode']} "
                         f"{m['outcome']}: downtime {1e3 * m['downtime_s']:.1f} ms, {m['stages']} stages, "
                         f"{m['blocks_moved']} blocks, {m['bytes_moved'] / 2**20:.2f} MiB")
    if status.get("kv_store"):
        lines.append(render_kv_store(status["kv_store"]))
    if status.get("rl"):
        lines += render_rl(status["rl"])
    return "\n".join(lines)


def render_kv_store(shards: list[dict]) -> str:
    """One line over the store's shards (`FleetController.kv_store_stats`): what it holds, how many of the
    blocks engines came to load it still had, what it had to let go."""
    total = {key: sum(shard[key] for shard in shards) for key in shards[0] if key != "pinned"}
    hits = total["hits_memory"] + total["hits_disk"]
    asked = hits + total["misses"]
    line = (f"  KV store: {len(shards)} shard{'s' if len(shards) != 1 else ''}, {total['memory_blocks']:,} blocks in "
            f"memory ({total['memory_bytes'] / 2**20:,.1f} of {total['memory_capacity_bytes'] / 2**20:,.0f} MiB)")
    if total["disk_capacity_bytes"]:
        line += (f", {total['disk_blocks']:,} on disk ({total['disk_bytes'] / 2**20:,.1f} of "
                 f"{total['disk_capacity_bytes'] / 2**20:,.0f} MiB)")
    line += f"; {hits:,} of {asked:,} blocks loaded"
    if asked:
        line += f" ({hits / asked:.0%}; {total['hits_memory']:,} from memory, {total['hits_disk']:,} from disk)"
    return line + f"; evicted {total['evictions_memory']:,} from memory, {total['evictions_disk']:,} from disk"
