"""Health, replacement, scaling and draining of real replicas by the FleetController."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import ray

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


def test_killed_replica_process_is_replaced_and_serving_continues(fleet, client):
    victim = fleet.replicas("tiny-b")[0]["replica_id"]
    handle = ray.get_actor(f"rayfleet-replica-{victim}", namespace="rayfleet")
    os.kill(ray.get(handle.pid.remote()), signal.SIGKILL)

    def replaced():
        ready = fleet.replicas("tiny-b")
        return len(ready) == 1 and ready[0]["replica_id"] != victim

    fleet.wait_for(replaced, what="a replacement replica for tiny-b")
    assert fleet.status()["pools"]["tiny-b"]["restarts"] >= 1
    result = client.chat.completions.create(model="tiny-b", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == 5


def test_scale_outside_spec_bounds_is_refused(fleet):
    with pytest.raises(ray.exceptions.RayTaskError, match="max_replicas=3"):
        ray.get(fleet.controller.scale.remote("tiny-a", 9))
    with pytest.raises(ray.exceptions.RayTaskError, match="unknown pool 'nope'"):
        ray.get(fleet.controller.scale.remote("nope", 1))


async def test_scale_up_then_down_drains_in_flight_requests(fleet, async_client):
    ray.get(fleet.controller.scale.remote("tiny-a", 2))
    fleet.wait_for(lambda: len(fleet.replicas("tiny-a")) == 2, what="tiny-a to reach 2 ready replicas")

    # Long requests land on both replicas (least-load spreads them), then the pool shrinks under them.
    async def long_request(i):
        return await async_client.chat.completions.create(
            model="tiny-a", messages=[{"role": "user", "content": f"long {i}"}], max_tokens=400,
            extra_body={"ignore_eos": True})

    tasks = [asyncio.create_task(long_request(i)) for i in range(6)]
    await asyncio.sleep(1.0)
    busy = [r for r in fleet.replicas("tiny-a") if r["tokens_in_flight"] > 0]
    assert len(busy) == 2, f"requests did not spread over both replicas: {fleet.replicas('tiny-a')}"
    ray.get(fleet.controller.scale.remote("tiny-a", 1))
    draining = fleet.replicas("tiny-a", state="draining")
    assert len(draining) == 1

    results = await asyncio.gather(*tasks)
    assert all(r.usage.completion_tokens == 400 for r in results), "a drained replica dropped a request"
    fleet.wait_for(lambda: not fleet.replicas("tiny-a", state="draining") and len(fleet.replicas("tiny-a")) == 1,
                   timeout_s=60, what="the drained replica to stop")


async def test_drained_replica_takes_no_new_requests(fleet, client):
    ray.get(fleet.controller.scale.remote("tiny-a", 2))
    fleet.wait_for(lambda: len(fleet.replicas("tiny-a")) == 2, what="tiny-a to reach 2 ready replicas")
    target = fleet.replicas("tiny-a")[0]["replica_id"]
    ray.get(fleet.controller.drain.remote(target))
    for _ in range(4):
        client.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    fleet.wait_for(lambda: target not in {r["replica_id"] for r in fleet.status()["replicas"]}, timeout_s=60,
                   what="the drained replica to be removed")
    assert fleet.status()["pools"]["tiny-a"]["desired"] == 1
