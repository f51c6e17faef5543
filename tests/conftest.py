"""Shared fixtures: real Ray, real vLLM CPU engines on tiny local models, real Redis, the official client.

Engines start once per session (about 25 s each on 2 cores) and are shared by every test that needs a fleet.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAYFLEET_DEMO_MODELS", str(REPO / ".demo-models"))
os.environ.setdefault("RAYFLEET_TASK_MODELS", str(REPO / "actors" / "tasks" / "trained"))
API_KEY = "test-key-1"
OTHER_TENANT_KEY = "test-key-of-tenant-b"  # a second user: sees and reaches none of API_KEY's requests
ADMIN_KEY = "test-admin-key-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pytest_collection_modifyitems(config, items):
    """GPU tests are deselected on machines without CUDA (CI's), and the run says so; they never skip."""
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        print(f"\n[rayfleet] {len(gpu)} GPU tests deselected: no CUDA device here "
              "(they run on the GPU machine; output in docs/kernels-gpu-test-output.txt)")


@pytest.fixture(scope="session")
def demo_models() -> Path:
    from rayfleet.control_plane.cli.demo_models import build_demo_models

    path = Path(os.environ["RAYFLEET_DEMO_MODELS"])
    build_demo_models(path)
    return path


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server on a free loopback port (installed by tests/run.sh)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed; run tests through tests/run.sh, which installs it")
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        # address="local": a cluster of the suite's own, even when `rayfleet up` left one running here. The
        # dashboard serves Ray's Jobs API (the RL job test submits through it).
        ray.init(address="local", num_cpus=16, include_dashboard=True, dashboard_port=free_port(), namespace="rayfleet",
                 log_to_driver=False)
    yield ray
    ray.shutdown()


def fleet_spec_dict(demo_models: Path, redis_url: str, port: int) -> dict:
    engine = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024, "gpu_memory_utilization": 0.3,
              "block_size": 32, "max_num_seqs": 64}
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    return {
        "name": "rayfleet-test",
        "pools": [
            {"name": "tiny-a", "model": str(demo_models / "tiny-llama-a"), "min_replicas": 1, "max_replicas": 3,
             "resources": {"num_cpus": 1}, "env": env, "engine_args": engine, "tags": {"cost": "low"}},
            {"name": "tiny-b", "model": str(demo_models / "tiny-llama-b"), "min_replicas": 1, "max_replicas": 2,
             "resources": {"num_cpus": 1}, "env": env, "engine_args": engine},
            # Two replicas with small KV caches (40 blocks of 32 tokens): the live-migration tests fill them. A
            # weight-transfer backend: the promotion test loads a new weight version into them.
            {"name": "mig", "model": str(demo_models / "tiny-llama-b"), "min_replicas": 1, "max_replicas": 3,
             "initial_replicas": 2, "resources": {"num_cpus": 1}, "env": env,
             "engine_args": {**engine, "num_gpu_blocks_override": 40,
                             "weight_transfer_config": {"backend": "rayfleet_object_store"}}},
            # Never started: requests to it prove the 503 path.
            {"name": "cold", "model": str(demo_models / "tiny-llama-a"), "min_replicas": 0, "max_replicas": 1,
             "resources": {"num_cpus": 1}, "env": env, "engine_args": engine},
        ],
        "ingress": {"host": "127.0.0.1", "port": port,
                    "api_keys": [API_KEY, {"name": "tenant-b", "key": OTHER_TENANT_KEY},
                                 {"name": "ops", "key": ADMIN_KEY, "role": "admin"}],
                    "chunk_timeout_s": 30},
        "policies": {"router": {"name": "least_load"},
                     "admission": {"name": "queue_limit", "params": {"max_in_flight_per_replica": 48}},
                     # Drains by migration on the "mig" pool only (no pressure triggers), so the tests'
                     # explicit migrations are the only others.
                     "migration": {"name": "llumnix", "params": {"pools": ["mig"], "triggers": ["drain"]}},
                     "tick_s": 0.5},
        # stall_timeout_s: 20, not 10: with the RL module's two rollout engines the box runs eight engines on 2
        # cores, and one rollout engine once took 11 s for its first step after its first weight sync
        # (2026-12-02, test_rl_fleet; cause not found), which a 10 s bound reported as a stall.
        "health": {"check_period_s": 0.5, "check_timeout_s": 10, "stall_timeout_s": 20},
        "state_store": redis_url,
    }


@pytest.fixture(scope="session")
def otlp_receiver():
    """Where the test fleet's processes export their trace spans (tests/otlp_receiver.py)."""
    from otlp_receiver import OTLPReceiver

    receiver = OTLPReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def fleet(ray_cluster, demo_models, redis_url, otlp_receiver):
    """A deployed fleet: controller + OpenAI ingress + one replica each of tiny-a and tiny-b, traced."""
    from ray import serve

    from rayfleet.control_plane.cli.launch import grpc_options
    from rayfleet.control_plane.controller_api import CONTROLLER_NAME, NAMESPACE
    from rayfleet.control_plane.serve_app import build_app
    from rayfleet.control_plane.spec import parse_spec

    port, grpc_port = free_port(), free_port()
    spec_dict = fleet_spec_dict(demo_models, redis_url, port)
    spec_dict["ingress"]["grpc_port"] = grpc_port
    spec_dict["tracing"] = {"otlp_endpoint": otlp_receiver.endpoint, "export_delay_s": 0.5}
    spec = parse_spec(spec_dict)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, grpc_options=grpc_options(spec))
    serve.run(build_app({"spec": spec.model_dump()}), name="rayfleet", route_prefix="/", blocking=False)
    controller = ray_cluster.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    ray_cluster.get(controller.wait_ready.remote(timeout_s=300))
    yield Fleet(spec=spec, controller=controller, base_url=f"http://127.0.0.1:{port}/v1",
                grpc_target=f"127.0.0.1:{grpc_port}")
    serve.shutdown()
    ray_cluster.get(controller.shutdown.remote())
    ray_cluster.kill(controller)


class Fleet:
    def __init__(self, spec, controller, base_url: str, grpc_target: str):
        self.spec = spec
        self.controller = controller
        self.base_url = base_url
        self.grpc_target = grpc_target

    def status(self) -> dict:
        import ray

        return ray.get(self.controller.status.remote())

    def replicas(self, pool: str, state: str = "ready") -> list[dict]:
        return [r for r in self.status()["replicas"] if r["pool"] == pool and r["state"] == state]

    def wait_for(self, predicate, timeout_s: float = 240, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}: {self.status()}")


@pytest.fixture(scope="session")
def client(fleet):
    from openai import OpenAI

    return OpenAI(base_url=fleet.base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def async_client(fleet):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=fleet.base_url, api_key=API_KEY, max_retries=0, timeout=300)
