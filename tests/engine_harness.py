"""Two real vLLM CPU engines (AsyncLLM) with rayfleet's KV connector, in this process: the harness of the
engine-level connector tests (live migration, KV store). A module fixture builds one `EnginePair` and every
test of the module shares it; `settled_free_blocks` is how a test shows that nothing leaked."""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BLOCK_SIZE = 32


@dataclass
class EnginePair:
    runner: asyncio.Runner
    a: Any  # AsyncLLM
    b: Any
    rpc_a: Any  # EngineKVMigrator over a: migration primitives and the connector's counters
    rpc_b: Any
    baseline: tuple[int, int]  # free KV blocks of a and b once warmed up
    free_before_first_step: tuple[int, int]

    def run(self, coro, timeout_s: float = 60):
        return self.runner.run(asyncio.wait_for(coro, timeout_s))

    def close(self) -> None:
        self.a.shutdown()
        self.b.shutdown()
        self.runner.close()


def _engine(model: Path, connector_kwargs: dict[str, Any]):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from rayfleet.actors.kv.engine_migrator import migration_engine_kwargs

    # disable_log_stats: both engines live in this process and are built at once, and each one's Prometheus
    # logger re-registers vLLM's metrics in the process-global registry; two at the same moment race
    # (DuplicateTimeseries, seen in CI). The tests read the connector's counters, not vLLM's stats.
    args = AsyncEngineArgs(model=str(model), max_model_len=1024, dtype="float32", enforce_eager=True,
                           gpu_memory_utilization=0.3, block_size=BLOCK_SIZE, enable_prefix_caching=True,
                           disable_log_stats=True,
                           **migration_engine_kwargs(**connector_kwargs))
    return AsyncLLM.from_engine_args(args)


def start_engine_pair(model: Path, **connector_kwargs: Any) -> EnginePair:
    """Build two engines of `model` at once (~30 s on 2 cores), warm them up, record their free blocks.

    `connector_kwargs` go to `migration_engine_kwargs` (e.g. `kv_store=...`)."""
    from rayfleet.actors.kv.engine_migrator import EngineKVMigrator
    from rayfleet.kernels import sweep_orphans

    # The suites check that no shared-memory rows are left on the host: rows a killed process left behind are
    # not theirs (a replica starting on the host sweeps them too).
    sweep_orphans()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    runner = asyncio.Runner()

    async def start() -> EnginePair:
        loop = asyncio.get_running_loop()
        a, b = await asyncio.gather(loop.run_in_executor(None, _engine, model, connector_kwargs),
                                    loop.run_in_executor(None, _engine, model, connector_kwargs))
        rpc_a, rpc_b = EngineKVMigrator(a), EngineKVMigrator(b)
        fresh = (await rpc_a.free_kv_blocks(), await rpc_b.free_kv_blocks())
        for engine in (a, b):  # warm up: the first step also publishes the free-block count
            await generate_to_end(engine, [1, 2, 3], greedy(2), "warmup")
        baseline = (await settled_free_blocks(rpc_a), await settled_free_blocks(rpc_b))
        return EnginePair(runner, a, b, rpc_a, rpc_b, baseline, fresh)

    return runner.run(start())


async def settled_free_blocks(migrator, timeout_s: float = 5.0, expect: int | None = None) -> int:
    """The engine's free-block count once it stops changing (or reaches `expect`)."""
    deadline = time.monotonic() + timeout_s
    last = await migrator.free_kv_blocks()
    while time.monotonic() < deadline:
        if expect is not None and last == expect:
            return last
        await asyncio.sleep(0.05)
        now = await migrator.free_kv_blocks()
        if expect is None and now == last:
            return now
        last = now
    return last


def greedy(max_tokens: int, skip_prefix_cache: bool = False):
    from vllm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          skip_reading_prefix_cache=skip_prefix_cache or None)


def random_prompt(seed: int, length: int) -> list[int]:
    """Token ids from the demo models' ordinary vocabulary (10..499), reproducible by seed."""
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(length)]


async def generate_to_end(engine, prompt: list[int], params, request_id: str):
    """Run a request to the end; return (generated token ids, last RequestOutput)."""
    last = None
    async for output in engine.generate({"prompt_token_ids": prompt}, params, request_id):
        last = output
    return list(last.outputs[0].token_ids), last
