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


def _start_replicas(ray, demo_models, config, count: int) -> list:
    """`count` replicas of tiny-llama-a using the store `config` names, as the controller starts them."""
    from rayfleet.actors.replica.llm_replica import LLMReplica

    engine = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024, "block_size": BLOCK_SIZE,
              "enable_prefix_caching": True}
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    return [ray.remote(LLMReplica).options(num_cpus=0, runtime_env={"env_vars": env}).remote(
        f"{config.name}-{i}", "kv", str(demo_models / "tiny-llama-a"), engine, kv_store=config) for i in range(count)]


def _stop(ray, replicas: list, store) -> None:
    ray.get([replica.shutdown.remote() for replica in replicas])
    for replica in replicas:
        ray.kill(replica)
    store.shutdown()


def test_second_replica_loads_the_prefix_the_first_computed(ray_cluster, demo_models):
    ray = ray_cluster
    from vllm import SamplingParams

    from rayfleet.actors.kv.store import get_or_create_kv_store
    from rayfleet.actors.kv.store_config import KVStoreConfig
    from rayfleet.actors.replica.protocol import GenerateCall

    # Budgets long enough that a busy test machine never turns the hit into a recompute; unpriced, so that the
    # engine loads what the store holds whatever it costs on this tiny model.
    config = KVStoreConfig(name="test-replica-kv", memory_bytes=64 << 20, pin_memory=False, lookup_budget_s=30.0,
                           lookup_budget_per_block_s=None, load_budget_s=30.0, priced=False)
    store = get_or_create_kv_store(config)  # the controller's part
    replicas = _start_replicas(ray, demo_models, config, 2)
    try:
        ray.get([replica.start.remote() for replica in replicas])
        rng = random.Random(7)
        prompt = [rng.randrange(10, 500) for _ in range(PROMPT_LEN)]
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        first, cached_first = _collect(ray, replicas[0], GenerateCall("kv-first", prompt, params))
        ray.get(replicas[0].kv_stats.remote())  # returns once the first replica's puts are in the store
        second, cached_second = _collect(ray, replicas[1], GenerateCall("kv-second", prompt, params))
        stats = ray.get(replicas[1].kv_stats.remote())
        assert second == first
        assert (cached_first, cached_second) == (0, (PROMPT_LEN - 1) // BLOCK_SIZE * BLOCK_SIZE)
        assert stats["store_blocks_loaded"] == (PROMPT_LEN - 1) // BLOCK_SIZE
        assert sum(s.hits_memory for s in store.stats()) == stats["store_blocks_loaded"]
    finally:
        _stop(ray, replicas, store)


def test_a_priced_replica_computes_a_short_prefix_instead_of_waiting_for_the_store(ray_cluster, demo_models):
    """Once the engine has timed its steps, a request with one block beyond its local hit is computed at once:
    on this tiny model a block prefills in well under the step its lookup would cost."""
    ray = ray_cluster
    from vllm import SamplingParams

    from rayfleet.actors.kv.store import get_or_create_kv_store
    from rayfleet.actors.kv.store_config import KVStoreConfig
    from rayfleet.actors.replica.protocol import GenerateCall

    config = KVStoreConfig(name="test-priced-kv", memory_bytes=64 << 20, pin_memory=False)
    assert config.priced  # the default
    store = get_or_create_kv_store(config)
    [replica] = _start_replicas(ray, demo_models, config, 1)
    try:
        ray.get(replica.start.remote())
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
    finally:
        _stop(ray, [replica], store)
