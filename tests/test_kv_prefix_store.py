"""Prefix reuse across replicas and offload through rayfleet's KV connector and the fleet KV store.

Two real vLLM CPU engines (AsyncLLM, tiny-llama-a, block size 32, prefix caching) share one KV store in a
real local Ray cluster, as two replicas of a pool do. The engine processes reach the store through
``RAY_ADDRESS``, like a replica's. Loads are asynchronous (the default) with budgets long enough that a
loaded test machine never turns a hit into a recompute (the budgets have their own unit tests). Every test
uses its own prompt (fresh hashes) and ends by checking that both engines' free KV blocks return to their
values after warm-up.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
from engine_harness import BLOCK_SIZE, EnginePair, generate_to_end, greedy, random_prompt, settled_free_blocks, \
    start_engine_pair

pytestmark = pytest.mark.engines

PROMPT_LEN = 500  # 15 full blocks plus a partial one: 15 blocks (480 tokens) can come from the store
STORE_BLOCKS = (PROMPT_LEN - 1) // BLOCK_SIZE
NAMESPACE = "test-prefix-store|tiny-llama-a|bs32"


@pytest.fixture(scope="module")
def store(ray_cluster):
    """The store both engines use: created here, so it outlives the engines' connections."""
    from rayfleet.actors.kv.store import get_or_create_kv_store
    from rayfleet.actors.kv.store_config import KVStoreConfig

    # Unpriced: these tests assert what loads do, and on this tiny model a priced engine would compute the
    # prefixes instead (test_replica_kv_store shows the pricing on a real engine).
    client = get_or_create_kv_store(KVStoreConfig(name="test-prefix-store", memory_bytes=64 << 20, pin_memory=False,
                                                  lookup_budget_s=30.0, lookup_budget_per_block_s=None,
                                                  load_budget_s=30.0, priced=False))
    yield client
    client.shutdown()


@pytest.fixture(scope="module")
def engines(ray_cluster, demo_models, store):
    config = ray_cluster.get(store.shards[0].config.remote())
    saved_env = {key: os.environ.get(key) for key in ("RAY_ADDRESS", "VLLM_WORKER_MULTIPROC_METHOD")}
    # The engine processes reach the store as a replica's do: through the cluster's GCS address.
    os.environ["RAY_ADDRESS"] = ray_cluster.get_runtime_context().gcs_address
    # A forked engine would inherit this process's Ray connection state; spawn makes it connect afresh.
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    pair = start_engine_pair(demo_models / "tiny-llama-a", kv_store=config, kv_store_namespace=NAMESPACE)
    yield pair
    pair.close()
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _greedy(max_tokens: int = 24, skip_prefix_cache: bool = False):
    return greedy(max_tokens, skip_prefix_cache)


def _prompt(seed: int) -> list[int]:
    return random_prompt(seed, PROMPT_LEN)


async def _reference(engines: EnginePair, prompt: list[int], request_id: str) -> list[int]:
    """Greedy output computed from scratch on A (no local prefix cache, no store load)."""
    tokens, _ = await generate_to_end(engines.a, prompt, _greedy(skip_prefix_cache=True), request_id)
    return tokens


def _store_hits(store) -> int:
    return sum(s.hits_memory + s.hits_disk for s in store.stats())


def _plant(store, prompt: list[int], blocks: dict[int, np.ndarray]) -> None:
    """Put ``blocks`` (block index -> bytes) into the store under the prompt's hashes, before any engine does."""
    from rayfleet.actors.kv.block_hash import block_hashes

    hashes = block_hashes(prompt, BLOCK_SIZE, NAMESPACE)
    store.put([hashes[i] for i in blocks], list(blocks.values()))


async def _assert_no_leak(engines: EnginePair) -> None:
    free = (await settled_free_blocks(engines.rpc_a, expect=engines.baseline[0]),
            await settled_free_blocks(engines.rpc_b, expect=engines.baseline[1]))
    assert free == engines.baseline


def test_prefix_computed_on_one_replica_is_loaded_from_the_store_on_another(engines, store):
    async def body():
        prompt = _prompt(1)
        tokens_a, out_a = await generate_to_end(engines.a, prompt, _greedy(), "reuse-a")
        assert out_a.num_cached_tokens == 0  # A computed the whole prompt (and saved its full blocks)
        saved = await engines.rpc_a.stats()
        hits_before, loaded_before = _store_hits(store), (await engines.rpc_b.stats())["store_blocks_loaded"]

        tokens_b, out_b = await generate_to_end(engines.b, prompt, _greedy(), "reuse-b")
        stats_b = await engines.rpc_b.stats()
        assert tokens_b == tokens_a
        assert out_b.num_cached_tokens == STORE_BLOCKS * BLOCK_SIZE  # all but the partial last block
        assert stats_b["store_blocks_loaded"] - loaded_before == STORE_BLOCKS
        assert _store_hits(store) - hits_before == STORE_BLOCKS
        assert saved["store_blocks_saved"] >= STORE_BLOCKS
        await _assert_no_leak(engines)

    engines.run(body())


def test_blocks_dropped_from_the_local_cache_are_loaded_back_from_the_store(engines):
    async def body():
        prompt = _prompt(2)
        tokens, _ = await generate_to_end(engines.a, prompt, _greedy(), "offload-1")
        assert await engines.a.reset_prefix_cache()  # stands for eviction under memory pressure
        loaded_before = (await engines.rpc_a.stats())["store_blocks_loaded"]
        again, out = await generate_to_end(engines.a, prompt, _greedy(), "offload-2")
        assert again == tokens
        assert out.num_cached_tokens == STORE_BLOCKS * BLOCK_SIZE
        assert (await engines.rpc_a.stats())["store_blocks_loaded"] - loaded_before == STORE_BLOCKS
        await _assert_no_leak(engines)

    engines.run(body())


def test_corrupted_store_blocks_change_the_output(engines, store):
    """Proves the loaded KV is used: garbage in the store's blocks changes B's greedy output."""

    async def body():
        prompt = _prompt(3)
        block_bytes = (await engines.rpc_b.layout()).bytes_per_block
        rng = np.random.default_rng(3)
        noise = rng.standard_normal(block_bytes // 4).astype(np.float32) * 50  # fp32 KV of one block
        _plant(store, prompt, {i: noise.view(np.uint8) for i in range(STORE_BLOCKS)})
        reference = await _reference(engines, prompt, "corrupt-ref")
        tokens, out = await generate_to_end(engines.b, prompt, _greedy(), "corrupt-b")
        assert out.num_cached_tokens == STORE_BLOCKS * BLOCK_SIZE
        assert tokens != reference
        await _assert_no_leak(engines)

    engines.run(body())


def test_store_blocks_unusable_at_load_time_are_recomputed(engines, store):
    """A block the store holds at lookup but cannot deliver at load is reported as a load error; vLLM
    recomputes from it and the output is still exact. (Wrong-size blocks stand for an eviction between
    lookup and load, which a test cannot time.)"""

    async def body():
        prompt = _prompt(4)
        first_bad = 5
        _plant(store, prompt, {i: np.zeros(16, np.uint8) for i in range(first_bad, STORE_BLOCKS)})
        reference = await _reference(engines, prompt, "lost-ref")  # A puts blocks 0-4; 5-14 stay bad
        before = await engines.rpc_b.stats()
        tokens, _ = await generate_to_end(engines.b, prompt, _greedy(), "lost-b")
        after = await engines.rpc_b.stats()
        assert tokens == reference
        assert after["store_load_errors"] - before["store_load_errors"] == 1
        assert after["store_blocks_loaded"] - before["store_blocks_loaded"] == first_bad
        await _assert_no_leak(engines)

    engines.run(body())


def _hold_until(path: str):
    """A call that keeps the shard busy (it runs one call at a time) until `path` exists, or 120 s."""
    def hold(_shard) -> None:
        import os
        import time

        deadline = time.monotonic() + 120
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
    return hold


async def _until_waiting_on(shard, method: str, timeout_s: float = 60) -> None:
    """Until a call of `method` is queued or running on `shard` (Ray's task events come about a second late)."""
    from ray.util.state import list_tasks

    def waiting() -> bool:
        tasks = list_tasks(filters=[("actor_id", "=", shard._actor_id.hex())], limit=1000)
        return any(t.name.endswith(f".{method}") and t.state not in ("FINISHED", "FAILED") for t in tasks)

    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await asyncio.to_thread(waiting):
        assert asyncio.get_running_loop().time() < deadline, f"no {method} call reached the shard in {timeout_s} s"
        await asyncio.sleep(0.2)


def test_a_shard_killed_mid_load_costs_a_recompute_and_the_engine_survives(engines, store, tmp_path):
    """A computes a prompt and puts its blocks; B's lookup finds them; B's async load then waits on the shard
    (held busy by another call) and the shard is killed under it. The load fails, vLLM recomputes the blocks,
    B's output is exact and B keeps serving. (The shard restarts empty: later tests put their own blocks.)"""
    import ray

    async def body():
        prompt = _prompt(5)
        reference, _ = await generate_to_end(engines.a, prompt, _greedy(), "kill-a")
        await engines.rpc_a.stats()  # returns once A's puts are in the store
        shard = store.shards[0]
        before = await engines.rpc_b.stats()
        release_lookup = tmp_path / "release-lookup"
        shard.__ray_call__.remote(_hold_until(str(release_lookup)))
        request = asyncio.ensure_future(generate_to_end(engines.b, prompt, _greedy(), "kill-b"))
        await _until_waiting_on(shard, "contains")  # B's lookup, behind the first hold
        shard.__ray_call__.remote(_hold_until(str(tmp_path / "never")))  # B's get will wait behind this one
        release_lookup.touch()
        await _until_waiting_on(shard, "get")
        ray.kill(shard, no_restart=False)
        tokens, _ = await request
        after = await engines.rpc_b.stats()
        assert tokens == reference
        assert after["store_hit_blocks"] - before["store_hit_blocks"] == STORE_BLOCKS  # claimed at lookup
        assert after["store_load_errors"] - before["store_load_errors"] == 1  # then lost: recomputed
        assert after["store_blocks_loaded"] == before["store_blocks_loaded"]
        again, _ = await generate_to_end(engines.b, _prompt(6), _greedy(max_tokens=4), "kill-after")
        assert len(again) == 4
        await _assert_no_leak(engines)

    engines.run(body())
