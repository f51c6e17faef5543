"""Health, replacement, scaling and draining of real replicas by the FleetController."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest
import ray
from test_live_migration import replica_handle

pytestmark = pytest.mark.engines


def test_status_reports_load_per_replica(fleet, client):
    client.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "hi"}], max_tokens=64,
                                   extra_body={"ignore_eos": True})
    fleet.wait_for(lambda: fleet.replicas("tiny-a")[0]["decode_tokens_per_s"] > 0, timeout_s=5,
                   what="recent decode throughput to show in the status")
    replicas = fleet.status()["replicas"]
    assert {r["pool"] for r in replicas} == {"tiny-a", "tiny-b", "mig"}
    for r in replicas:
        assert r["state"] == "ready"
        assert {"running", "waiting", "kv_cache_usage", "tokens_in_flight", "decode_tokens_per_s"} <= set(r)


def test_controller_state_is_kept_in_redis(fleet, redis_url):
    import redis

    keys = redis.Redis.from_url(redis_url).keys("rayfleet:rayfleet-test:*")
    assert {b"rayfleet:rayfleet-test:spec", b"rayfleet:rayfleet-test:replicas"} <= set(keys)


def test_restarted_controller_resumes_its_loop_and_readopts_its_replicas_those_of_added_pools_too(
        fleet, client, demo_models):
    """Pools added at runtime (an RL job's rollout pool) come back from the state store after the restart; their
    live replicas must be taken back too, not left running beside new ones."""
    from conftest import fleet_spec_dict
    from ray.util.state import list_actors

    pool = {**fleet_spec_dict(demo_models, "redis://unused", 0)["pools"][0], "name": "added", "max_replicas": 1}
    ray.get(fleet.controller.add_pool.remote(pool))
    try:
        fleet.wait_for(lambda: fleet.replicas("added", state="ready"), timeout_s=180,
                       what="the added pool's replica to be ready")
        before = fleet.status()
        pid = before["controller"]["pid"]
        os.kill(pid, signal.SIGKILL)

        def restarted():
            try:
                status = fleet.status()
            except ray.exceptions.RayActorError:
                return False
            return status["controller"]["pid"] != pid and status["controller"]["ticks"] >= 3

        fleet.wait_for(restarted, timeout_s=120, what="Ray to restart the controller and its loop to tick")
        ready = lambda status: {r["replica_id"] for r in status["replicas"] if r["state"] == "ready"}  # noqa: E731
        fleet.wait_for(lambda: ready(fleet.status()) == ready(before), timeout_s=60,
                       what="every replica, the added pool's included, to be re-adopted as ready")
        assert fleet.status()["controller"]["state_store_connected"]
        alive = [a.name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
                 if (a.name or "").startswith("rayfleet-replica-added-")]
        assert len(alive) == 1, f"the restarted controller started replicas beside the added pool's: {alive}"
        result = client.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=5, extra_body={"ignore_eos": True})
        assert result.usage.completion_tokens == 5
    finally:
        ray.get(fleet.controller.remove_pool.remote("added"), timeout=120)


def test_controller_starts_while_redis_is_down_and_writes_its_state_once_it_is_up(ray_cluster, demo_models):
    """A second controller actor, for a pool of no replicas (it touches none of the session fleet's): its
    Redis, with a password, is not running when it starts."""
    import shutil
    import subprocess

    import redis as redis_client
    from conftest import free_port

    from rayfleet.control_plane.controller import FleetController

    port = free_port()
    spec = {"name": "redis-late", "state_store": f"redis://:s3cret-pw@127.0.0.1:{port}/0",
            "pools": [{"name": "ghost", "model": str(demo_models / "tiny-llama-a"), "min_replicas": 0}],
            "ingress": {"api_keys": ["ghost-user-key-0123456789"]}, "health": {"check_period_s": 0.2}}
    controller = ray.remote(FleetController).options(num_cpus=0).remote(spec)
    try:
        assert ray.get(controller.status.remote(), timeout=60)["controller"]["state_store_connected"] is False
        server = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                   "--requirepass", "s3cret-pw", "--save", "", "--appendonly", "no"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not ray.get(controller.status.remote())["controller"]["state_store_connected"]:
                assert time.monotonic() < deadline, "the controller never connected to Redis"
                time.sleep(0.2)
            stored = redis_client.Redis(port=port, password="s3cret-pw").get("rayfleet:redis-late:spec").decode()
            assert "s3cret-pw" not in stored and "ghost-user-key" not in stored
        finally:
            server.terminate()
            server.wait(timeout=10)
    finally:
        ray.kill(controller)


def test_controller_restores_its_scalers_seasonal_history_from_redis_and_keeps_it(ray_cluster, demo_models,
                                                                                   redis_url):
    """A second controller actor, for a pool of no replicas, starting where a previous controller of its fleet
    left a seasonal scaler's history in Redis: it takes that history back and saves it again with its own bins.
    A controller that did not restore it would save only the bins it counted itself, and the old one would be
    gone from the store."""
    import redis as redis_client

    from rayfleet.control_plane.controller import FleetController

    bin_s = 30.0
    earlier_bin = int(time.time() // bin_s) - 5  # two and a half minutes ago: within what a season keeps
    store = redis_client.Redis.from_url(redis_url)
    key = "rayfleet:season-kept:policy_state:scaler"
    store.set(key, json.dumps({"name": "predictive",
                               "state": {"bin_s": bin_s, "pools": {"ghost": [[earlier_bin, 42]]}}}))
    spec = {"name": "season-kept", "state_store": redis_url,
            "pools": [{"name": "ghost", "model": str(demo_models / "tiny-llama-a"), "min_replicas": 0}],
            "policies": {"scaler": {"name": "predictive", "params": {"season_s": 3600.0, "season_bin_s": bin_s}},
                         "tick_s": 0.2},
            "health": {"check_period_s": 0.2}}
    controller = ray.remote(FleetController).options(num_cpus=0).remote(spec)
    try:
        def saved_bins() -> dict[int, int]:
            raw = store.get(key)
            return {b: n for b, n in json.loads(raw)["state"]["pools"].get("ghost", [])} if raw else {}

        deadline = time.monotonic() + 60
        while max(saved_bins(), default=earlier_bin) == earlier_bin:  # until it saved a bin of its own
            assert time.monotonic() < deadline, f"the controller never saved its scaler's history: {saved_bins()}"
            time.sleep(0.2)
        assert saved_bins()[earlier_bin] == 42
    finally:
        ray.kill(controller)
        store.delete(*store.keys("rayfleet:season-kept:*"))


async def test_stalled_engine_core_of_a_single_replica_pool_is_replaced_and_its_stream_finishes_token_exact(
        fleet, client, async_client):
    """SIGSTOP of the engine core of tiny-b's only replica: no error anywhere, only silence. The controller
    must notice the stall (no engine step with requests in flight) and replace the replica, and the stream,
    which has no other replica to go to, must wait for the replacement and finish token-exact."""
    import psutil

    messages = [{"role": "user", "content": "a stream whose engine stops"}]
    request = dict(model="tiny-b", messages=messages, max_tokens=300, temperature=0, extra_body={"ignore_eos": True})
    reference = client.chat.completions.create(**request).choices[0].message.content
    victim = fleet.replicas("tiny-b")[0]["replica_id"]
    handle = ray.get_actor(f"rayfleet-replica-{victim}", namespace="rayfleet")
    stream = await async_client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                        **request)
    text, usage, stopped = [], None, []
    try:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
                if len(text) == 5:
                    stopped = psutil.Process(ray.get(handle.pid.remote())).children(recursive=True)
                    for process in stopped:
                        process.send_signal(signal.SIGSTOP)
            usage = chunk.usage or usage
    finally:
        for process in stopped:  # let the stopped processes see their replica is gone, and exit
            try:
                process.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
    assert "".join(text) == reference and usage.completion_tokens == 300
    ready = fleet.replicas("tiny-b")
    assert len(ready) == 1 and ready[0]["replica_id"] != victim
    assert fleet.status()["pools"]["tiny-b"]["restarts"] >= 1
    _, alive = psutil.wait_procs(stopped, timeout=15)
    for process in alive:  # an engine core that did not notice its parent's death
        process.kill()


async def test_scale_down_drains_in_flight_requests_and_the_draining_replica_takes_no_new_ones(fleet, async_client):
    """tiny-a scaled 2 -> 1 under six long requests: the replica chosen to go finishes every request it has (this
    pool does not migrate), gets none of the requests sent while it drains, and is removed once empty."""
    ray.get(fleet.controller.scale.remote("tiny-a", 2))
    fleet.wait_for(lambda: len(fleet.replicas("tiny-a")) == 2, what="tiny-a to reach 2 ready replicas")

    # Long requests land on both replicas (least-load spreads them), then the pool shrinks under them.
    async def chat(content: str, max_tokens: int):
        return await async_client.chat.completions.create(
            model="tiny-a", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
            extra_body={"ignore_eos": True})

    tasks = [asyncio.create_task(chat(f"long {i}", 600)) for i in range(6)]
    def both_busy() -> bool:
        replicas = fleet.replicas("tiny-a")
        return len(replicas) == 2 and all(r["tokens_in_flight"] > 0 for r in replicas)

    # In a thread: the requests' tasks need this event loop while the controller's view catches up.
    await asyncio.to_thread(fleet.wait_for, both_busy, 60, "the long requests to spread over both replicas")
    ray.get(fleet.controller.scale.remote("tiny-a", 1))
    [draining] = fleet.replicas("tiny-a", state="draining")
    drained = replica_handle(draining["replica_id"])
    started = (await drained.delta_stats.remote())["requests_started"]
    short = await asyncio.gather(*(chat(f"short {i}", 2) for i in range(4)))
    assert all(r.usage.completion_tokens == 2 for r in short)
    assert (await drained.delta_stats.remote())["requests_started"] == started, "a draining replica took a request"
    # Still draining when they ran, so the router had it to choose and passed it over.
    assert fleet.replicas("tiny-a", state="draining"), "the long requests ended before the short ones: no test"

    results = await asyncio.gather(*tasks)
    assert all(r.usage.completion_tokens == 600 for r in results), "a drained replica dropped a request"
    fleet.wait_for(lambda: not fleet.replicas("tiny-a", state="draining") and len(fleet.replicas("tiny-a")) == 1,
                   timeout_s=60, what="the drained replica to stop")
    assert fleet.status()["pools"]["tiny-a"]["desired"] == 1


def test_a_pool_removed_while_its_replica_builds_its_engine_stops_it_at_once(fleet, demo_models):
    """A replica still building its engine (its actor alive, `start` running) has nothing to finish: removing its
    pool kills it at once. A graceful shutdown call queued behind the ~30 s build, so removing a pool (or
    stopping the fleet) while a replacement started waited the shutdown's full 30 s timeout."""
    from ray.util.state import list_actors

    from conftest import fleet_spec_dict

    pool = {**fleet_spec_dict(demo_models, "redis://unused", 0)["pools"][0], "name": "brief", "max_replicas": 1}
    ray.get(fleet.controller.add_pool.remote(pool))
    [replica] = fleet.replicas("brief", state="starting")
    name = f"rayfleet-replica-{replica['replica_id']}"

    def actor_state() -> str:
        found = list_actors(filters=[("name", "=", name)])
        return found[0].state if found else "UNKNOWN"

    fleet.wait_for(lambda: actor_state() == "ALIVE", timeout_s=60, what="the replica's actor to run its engine build")
    assert fleet.replicas("brief", state="starting"), "the engine was built before the pool was removed: no test"
    started = time.monotonic()
    assert ray.get(fleet.controller.remove_pool.remote("brief"))["stopped"] == 1
    took = time.monotonic() - started
    assert took < 10, f"removing the pool took {took:.1f} s: it waited for the starting replica"
    fleet.wait_for(lambda: actor_state() == "DEAD", timeout_s=30, what="the starting replica's actor to be killed")
    assert "brief" not in fleet.status()["pools"]
