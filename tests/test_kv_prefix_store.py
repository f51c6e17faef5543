"""Prefix reuse across replicas and offload through rayfleet's KV connector and the fleet KV store.

Two real vLLM CPU engines (AsyncLLM, tiny-llama-a, block size 32, prefix caching) share one KV store in a
real local Ray cluster, as two replicas of a pool do. The engine processes reach the store through
``RAY_ADDRESS``, like a replica's. Every test uses its own prompt (fresh hashes) and ends by checking that
both engines' free KV blocks return to their values after warm-up.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from engine_requests import generate_to_end, random_prompt

pytestmark = pytest.mark.engines

REPO = Path(__file__).resolve().parents[1]
BLOCK_SIZE = 32
PROMPT_LEN = 500  # 15 full blocks plus a partial one: 15 blocks (480 tokens) can come from the store
STORE_BLOCKS = (PROMPT_LEN - 1) // BLOCK_SIZE
NAMESPACE = "test-prefix-store|tiny-llama-a|bs32"


@dataclass
class Engines:
    runner: asyncio.Runner
    a: object  # AsyncLLM
    b: object
    stats_a: object  # EngineKVMigrator over a (its stats RPC carries the store counters)
    stats_b: object
    store: object  # KVStoreClient
    baseline: tuple[int, int]

    def run(self, coro, timeout_s: float = 60):
        return self.runner.run(asyncio.wait_for(coro, timeout_s))


def _engine(model: Path, store_config):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from rayfleet.actors.kv.engine_migrator import migration_engine_kwargs

    args = AsyncEngineArgs(model=str(model), max_model_len=1024, dtype="float32", enforce_eager=True,
                           gpu_memory_utilization=0.3, block_size=BLOCK_SIZE, enable_prefix_caching=True,
                           **migration_engine_kwargs(kv_store=store_config, kv_store_namespace=NAMESPACE))
    return AsyncLLM.from_engine_args(args)


async def _free_blocks(migrator, expect: int, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + timeout_s
    free = await migrator.free_kv_blocks()
    while free != expect and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        free = await migrator.free_kv_blocks()
    return free


@pytest.fixture(scope="module")
def engines(ray_cluster, demo_models):
    from rayfleet.actors.kv.engine_migrator import EngineKVMigrator
    from rayfleet.actors.kv.store import get_or_create_kv_store
    from rayfleet.actors.kv.store_config import KVStoreConfig

    config = KVStoreConfig(name="test-prefix-store", memory_bytes=64 << 20, pin_memory=False)
    store = get_or_create_kv_store(config)  # created here, so it outlives the engines' connections
    saved_env = {key: os.environ.get(key) for key in ("RAY_ADDRESS", "VLLM_WORKER_MULTIPROC_METHOD")}
    os.environ["RAY_ADDRESS"] = ray_cluster.get_runtime_context().gcs_address
    # A forked engine would inherit this process's Ray connection state; spawn makes it connect afresh.
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    model = demo_models / "tiny-llama-a"
    runner = asyncio.Runner()

    async def start():
        loop = asyncio.get_running_loop()
        a, b = await asyncio.gather(loop.run_in_executor(None, _engine, model, config),
                                    loop.run_in_executor(None, _engine, model, config))
        stats_a, stats_b = EngineKVMigrator(a), EngineKVMigrator(b)
        for engine in (a, b):  # warm up: the first step also publishes the free-block count
            await generate_to_end(engine, [1, 2, 3], _greedy(2), "warmup")
        await asyncio.sleep(0.2)
        return Engines(runner, a, b, stats_a, stats_b, store,
                       (await stats_a.free_kv_blocks(), await stats_b.free_kv_blocks()))

    harness = runner.run(start())
    yield harness
    harness.a.shutdown()
    harness.b.shutdown()
    runner.close()
    store.shutdown()
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _greedy(max_tokens: int = 24, skip_prefix_cache: bool = False):
    from vllm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          skip_reading_prefix_cache=skip_prefix_cache or None)


def _prompt(seed: int) -> list[int]:
    return random_prompt(seed, PROMPT_LEN)


async def _reference(engines: Engines, prompt: list[int], request_id: str) -> list[int]:
    """Greedy output computed from scratch on A (no local prefix cache, no store load)."""
    tokens, _ = await generate_to_end(engines.a, prompt, _greedy(skip_prefix_cache=True), request_id)
    return tokens


def _store_hits(engines: Engines) -> int:
    return sum(s.hits_memory + s.hits_disk for s in engines.store.stats())


def _plant(engines: Engines, prompt: list[int], blocks: dict[int, np.ndarray]) -> None:
    """Put ``blocks`` (block index -> bytes) into the store under the prompt's hashes, before any engine does."""
    from rayfleet.actors.kv.block_hash import block_hashes

    hashes = block_hashes(prompt, BLOCK_SIZE, NAMESPACE)
    engines.store.put([hashes[i] for i in blocks], list(blocks.values()))


async def _assert_no_leak(engines: Engines) -> None:
    free = (await _free_blocks(engines.stats_a, engines.baseline[0]),
            await _free_blocks(engines.stats_b, engines.baseline[1]))
    assert free == engines.baseline


def test_prefix_computed_on_one_replica_is_loaded_from_the_store_on_another(engines):
    async def body():
        prompt = _prompt(1)
        tokens_a, out_a = await generate_to_end(engines.a, prompt, _greedy(), "reuse-a")
        assert out_a.num_cached_tokens == 0  # A computed the whole prompt (and saved its full blocks)
        saved = await engines.stats_a.stats()
        hits_before, loaded_before = _store_hits(engines), (await engines.stats_b.stats())["store_blocks_loaded"]

        tokens_b, out_b = await generate_to_end(engines.b, prompt, _greedy(), "reuse-b")
        stats_b = await engines.stats_b.stats()
        assert tokens_b == tokens_a
        assert out_b.num_cached_tokens == STORE_BLOCKS * BLOCK_SIZE  # all but the partial last block
        assert stats_b["store_blocks_loaded"] - loaded_before == STORE_BLOCKS
        assert _store_hits(engines) - hits_before == STORE_BLOCKS
        assert saved["store_blocks_saved"] >= STORE_BLOCKS
        await _assert_no_leak(engines)

    engines.run(body())


def test_blocks_dropped_from_the_local_cache_are_loaded_back_from_the_store(engines):
    async def body():
        prompt = _prompt(2)
        tokens, _ = await generate_to_end(engines.a, prompt, _greedy(), "offload-1")
        assert await engines.a.reset_prefix_cache()  # stands for eviction under memory pressure
        loaded_before = (await engines.stats_a.stats())["store_blocks_loaded"]
        again, out = await generate_to_end(engines.a, prompt, _greedy(), "offload-2")
        assert again == tokens
        assert out.num_cached_tokens == STORE_BLOCKS * BLOCK_SIZE
        assert (await engines.stats_a.stats())["store_blocks_loaded"] - loaded_before == STORE_BLOCKS
        await _assert_no_leak(engines)

    engines.run(body())


def test_corrupted_store_blocks_change_the_output(engines):
    """Proves the loaded KV is used: garbage in the store's blocks changes B's greedy output."""

    async def body():
        prompt = _prompt(3)
        block_bytes = (await engines.stats_b.layout()).bytes_per_block
        rng = np.random.default_rng(3)
        noise = rng.standard_normal(block_bytes // 4).astype(np.float32) * 50  # fp32 KV of one block
        _plant(engines, prompt, {i: noise.view(np.uint8) for i in range(STORE_BLOCKS)})
        reference = await _reference(engines, prompt, "corrupt-ref")
        tokens, out = await generate_to_end(engines.b, prompt, _greedy(), "corrupt-b")
        assert out.num_cached_tokens == STORE_BLOCKS * BLOCK_SIZE
        assert tokens != reference
        await _assert_no_leak(engines)

    engines.run(body())


def test_store_blocks_unusable_at_load_time_are_recomputed(engines):
    """A block the store holds at lookup but cannot deliver at load is reported as a load error; vLLM
    recomputes from it and the output is still exact. (Wrong-size blocks stand for an eviction between
    lookup and load, which a test cannot time.)"""

    async def body():
        prompt = _prompt(4)
        first_bad = 5
        _plant(engines, prompt, {i: np.zeros(16, np.uint8) for i in range(first_bad, STORE_BLOCKS)})
        reference = await _reference(engines, prompt, "lost-ref")  # A puts blocks 0-4; 5-14 stay bad
        before = await engines.stats_b.stats()
        tokens, _ = await generate_to_end(engines.b, prompt, _greedy(), "lost-b")
        after = await engines.stats_b.stats()
        assert tokens == reference
        assert after["store_load_errors"] - before["store_load_errors"] == 1
        assert after["store_blocks_loaded"] - before["store_blocks_loaded"] == first_bad
        await _assert_no_leak(engines)

    engines.run(body())
