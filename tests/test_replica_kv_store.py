"""Prefix reuse between two LLMReplica actors sharing the fleet KV store, as the controller starts them.

What the engine-level tests (test_kv_prefix_store.py) do not cover: the replica actor passes its GCS
address to its engine (`RAY_ADDRESS`), the engine processes spawned inside a Ray actor join the cluster
and find the store the controller created by name, and the replica's `kv_stats` reports the store counters.
"""

from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.engines

BLOCK_SIZE = 32
PROMPT_LEN = 300  # 9 full blocks (288 tokens) can come from the store


def _collect(ray, replica, call) -> tuple[list[int], int | None]:
    tokens, cached = [], None
    for ref in replica.generate.options(num_returns="streaming").remote(call):
        chunk = ray.get(ref)
        cached = chunk.num_cached_tokens if chunk.num_cached_tokens is not None else cached
        for choice in chunk.choices:
            tokens += choice.token_ids
    return tokens, cached


@pytest.fixture(scope="module")
def kv_pool(ray_cluster, demo_models):
    """Two replicas of tiny-llama-a sharing one store, started as the controller starts a pool's: the first
    priced (the default), the second unpriced (`kv_store_priced: false`) with budgets long enough that a busy
    test machine never turns its hits into recomputes, so it loads what the store holds whatever it costs on
    this tiny model. Returns the store client and the two replica handles."""
    from rayfleet.actors.kv.store import get_or_create_kv_store
    from rayfleet.actors.kv.store_config import KVStoreConfig
    from rayfleet.actors.replica.llm_replica import LLMReplica

    priced = KVStoreConfig(name="test-replica-kv", memory_bytes=64 << 20, pin_memory=False)
    assert priced.priced  # the default
    unpriced = priced.model_copy(update={"priced": False, "lookup_budget_s": 30.0, "lookup_budget_per_block_s": None,
                                         "load_budget_s": 30.0})
    store = get_or_create_kv_store(priced)  # the controller's part
    engine = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024, "block_size": BLOCK_SIZE,
              "enable_prefix_caching": True}
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    replicas = [ray_cluster.remote(LLMReplica).options(num_cpus=0, runtime_env={"env_vars": env}).remote(
        f"{priced.name}-{i}", "kv", str(demo_models / "tiny-llama-a"), engine, kv_store=config)
        for i, config in enumerate((priced, unpriced))]
    try:
        ray_cluster.get([replica.start.remote() for replica in replicas])
        yield store, replicas
    finally:
        ray_cluster.get([replica.shutdown.remote() for replica in replicas])
        for replica in replicas:
            ray_cluster.kill(replica)
        store.shutdown()


def test_second_replica_loads_the_prefix_the_first_computed(ray_cluster, kv_pool):
    ray = ray_cluster
    from vllm import SamplingParams

    from rayfleet.actors.replica.protocol import GenerateCall

    store, (first_replica, second_replica) = kv_pool
    hits_before = sum(s.hits_memory for s in store.stats())
    rng = random.Random(7)
    prompt = [rng.randrange(10, 500) for _ in range(PROMPT_LEN)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    first, cached_first = _collect(ray, first_replica, GenerateCall("kv-first", prompt, params))
    ray.get(first_replica.kv_stats.remote())  # returns once the first replica's puts are in the store
    loaded_before = ray.get(second_replica.kv_stats.remote())["store_blocks_loaded"]
    second, cached_second = _collect(ray, second_replica, GenerateCall("kv-second", prompt, params))
    loaded = ray.get(second_replica.kv_stats.remote())["store_blocks_loaded"] - loaded_before
    assert second == first
    assert (cached_first, cached_second) == (0, (PROMPT_LEN - 1) // BLOCK_SIZE * BLOCK_SIZE)
    assert loaded == (PROMPT_LEN - 1) // BLOCK_SIZE
    assert sum(s.hits_memory for s in store.stats()) - hits_before == loaded


def test_a_priced_replica_computes_a_short_prefix_instead_of_waiting_for_the_store(ray_cluster, kv_pool):
    """Once the engine has timed its steps, a request with one block beyond its local hit is computed at once:
    on this tiny model a block prefills in well under the step its lookup would cost."""
    ray = ray_cluster
    from vllm import SamplingParams

    from rayfleet.actors.replica.protocol import GenerateCall

    _, (replica, _) = kv_pool
    rng = random.Random(11)
    # Requests of different lengths at once: a prefill step, then decode steps of 6, 5, ... 1 requests, so
    # the engine times steps of many sizes and has a price of a prefill token before the probe comes. Two
    # waves: the price's slope rests on the prefill steps, and one slow step alone should not set it.
    for wave in range(2):
        warm = [replica.generate.options(num_returns="streaming").remote(GenerateCall(
            f"warm-{wave}-{i}", [rng.randrange(10, 500) for _ in range(20 + 40 * i)],
            SamplingParams(max_tokens=8 * (i + 1), temperature=0.0, ignore_eos=True))) for i in range(6)]
        for stream in warm:
            for ref in stream:
                ray.get(ref)
    before = ray.get(replica.kv_stats.remote())
    probe = [rng.randrange(10, 500) for _ in range(BLOCK_SIZE + 8)]  # one claimable block, nothing local
    tokens, _ = _collect(ray, replica, GenerateCall("probe", probe, SamplingParams(max_tokens=4, temperature=0.0)))
    after = ray.get(replica.kv_stats.remote())
    assert len(tokens) == 4
    assert after["store_lookups_priced_out"] - before["store_lookups_priced_out"] == 1
    assert after["store_lookups"] == before["store_lookups"]  # the store was not asked
