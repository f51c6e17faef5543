"""Live migration through rayfleet's KV connector, on two real vLLM CPU engines (AsyncLLM, tiny Llama).

Both engines serve tiny-llama-a with block size 32 and prefix caching, and are shared by every test.
References are computed on engine A without tags; migrations go from A to B. Every test ends by
checking that both engines' free KV blocks return to their values after warm-up (nothing leaks).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from engine_requests import generate_to_end, random_prompt

pytestmark = pytest.mark.engines

REPO = Path(__file__).resolve().parents[1]
BLOCK_SIZE = 32
PROMPT_LEN = 100  # not a multiple of the block size: the last prompt block is partial
MAX_TOKENS = 300  # long enough that a request is still decoding when a test stops it


@dataclass
class Engines:
    runner: asyncio.Runner
    a: object  # AsyncLLM
    b: object
    src: object  # EngineKVMigrator over a
    dst: object  # EngineKVMigrator over b
    baseline_a: int
    baseline_b: int
    free_before_first_step: tuple[int, int]

    def run(self, coro, timeout_s: float = 60):
        return self.runner.run(asyncio.wait_for(coro, timeout_s))


def _engine(model: Path):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from rayfleet.actors.kv.engine_migrator import migration_engine_kwargs

    args = AsyncEngineArgs(model=str(model), max_model_len=1024, dtype="float32", enforce_eager=True,
                           gpu_memory_utilization=0.3, block_size=BLOCK_SIZE, enable_prefix_caching=True,
                           **migration_engine_kwargs())
    return AsyncLLM.from_engine_args(args)


async def _settled_free_blocks(migrator, timeout_s: float = 5.0, expect: int | None = None) -> int:
    """The engine's free-block count once it stops changing (or reaches ``expect``)."""
    deadline = time.monotonic() + timeout_s
    last = await migrator.free_kv_blocks()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now = await migrator.free_kv_blocks()
        if (expect is not None and now == expect) or (expect is None and now == last):
            return now
        last = now
    return last


@pytest.fixture(scope="module")
def engines():
    from rayfleet.actors.kv.engine_migrator import EngineKVMigrator
    from rayfleet.control_plane.cli.demo_models import build_demo_models

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    models = Path(os.environ.get("RAYFLEET_DEMO_MODELS", REPO / ".demo-models"))
    model = build_demo_models(models)[0]
    runner = asyncio.Runner()

    async def start():
        loop = asyncio.get_running_loop()
        a, b = await asyncio.gather(loop.run_in_executor(None, _engine, model),
                                    loop.run_in_executor(None, _engine, model))
        src, dst = EngineKVMigrator(a), EngineKVMigrator(b)
        fresh = (await src.free_kv_blocks(), await dst.free_kv_blocks())
        for engine in (a, b):  # warm up: the first step also publishes the free-block count
            await generate_to_end(engine, [1, 2, 3], _greedy(2), "warmup")
        return Engines(runner, a, b, src, dst, await _settled_free_blocks(src), await _settled_free_blocks(dst), fresh)

    harness = runner.run(start())
    yield harness
    harness.a.shutdown()
    harness.b.shutdown()
    runner.close()


def _greedy(max_tokens: int = MAX_TOKENS):
    from vllm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _prompt(seed: int) -> list[int]:
    return random_prompt(seed, PROMPT_LEN)


class _Stream:
    """A tagged request running on the source, its streamed tokens collected as a client would."""

    def __init__(self, engines: Engines, prompt: list[int], request_id: str, max_tokens: int = MAX_TOKENS):
        self.tokens: list[int] = []
        params = engines.src.tag(_greedy(max_tokens), request_id)
        self.task = asyncio.ensure_future(self._consume(engines.a, prompt, params, request_id))

    async def _consume(self, engine, prompt, params, request_id):
        async for output in engine.generate({"prompt_token_ids": prompt}, params, request_id):
            self.tokens = list(output.outputs[0].token_ids)
            await asyncio.sleep(0)

    async def until(self, num_tokens: int) -> None:
        while len(self.tokens) < num_tokens:
            assert not self.task.done(), "the request ended before the test could stop it"
            await asyncio.sleep(0.001)


@dataclass
class Migration:
    tokens: list[int]  # what the client sees: A's stream + unstreamed tokens + B's output
    final: object  # FinalKV
    chunks: list  # KVChunks staged on B, pre-copies then the final one
    dst_output: object  # B's last RequestOutput
    stats_before: dict
    stats_after: dict


async def _migrate(engines: Engines, prompt: list[int], request_id: str, precopy_at: tuple[int, ...] = (),
                   stop_at: int = 60, corrupt: bool = False) -> Migration:
    from rayfleet.actors.kv.engine_migrator import KVChunk

    migration_id = f"mig-{request_id}"
    stats_before = await engines.dst.stats()
    stream = _Stream(engines, prompt, request_id)
    chunks = []
    next_block = 0
    for num_tokens in precopy_at:
        await stream.until(num_tokens)
        chunk = await engines.src.export_complete_blocks(request_id, next_block)
        await engines.dst.stage(migration_id, chunk)
        chunks.append(chunk)
        next_block = chunk.end_block
    await stream.until(stop_at)
    final = await engines.src.stop_and_export(request_id, next_block)
    assert final is not None
    await stream.task  # the abort ends the source's stream
    chunk = final.chunk
    if corrupt:
        chunk = KVChunk(chunk.first_block, chunk.num_blocks, chunk.data.new_zeros(chunk.data.shape), chunk.layout)
    await engines.dst.stage(migration_id, chunk)
    chunks.append(chunk)

    streamed = stream.tokens
    generated_on_src = final.all_token_ids[len(prompt):]
    assert generated_on_src[:len(streamed)] == streamed
    resume = engines.src.resume(final, _greedy(), len(prompt), request_id, migration_id)
    dst_tokens, dst_output = await generate_to_end(engines.b, resume.prompt_token_ids, resume.sampling_params, request_id)
    return Migration(streamed + generated_on_src[len(streamed):] + dst_tokens, final, chunks, dst_output,
                     stats_before, await engines.dst.stats())


async def _assert_no_leak(engines: Engines) -> None:
    free_a = await _settled_free_blocks(engines.src, expect=engines.baseline_a)
    free_b = await _settled_free_blocks(engines.dst, expect=engines.baseline_b)
    assert (free_a, free_b) == (engines.baseline_a, engines.baseline_b)
    for migrator in (engines.src, engines.dst):
        stats = await migrator.stats()
        assert stats["held_finals"] == 0 and stats["staged_migrations"] == 0 and stats["tracked_requests"] == 0


def _delta(migration: Migration, counter: str) -> int:
    return migration.stats_after[counter] - migration.stats_before[counter]


def test_free_block_count_is_published(engines):
    async def check():
        stats = await engines.src.stats()
        # Everything is free after warm-up but vLLM's reserved null block.
        assert engines.baseline_a == stats["num_blocks"] - 1 > 0
        assert engines.baseline_b == (await engines.dst.stats())["num_blocks"] - 1
        # A fresh engine reports the same before its first step (a new replica can take migrations).
        assert engines.free_before_first_step == (engines.baseline_a, engines.baseline_b)

    engines.run(check())


def test_precopied_migration_is_token_identical(engines):
    async def check():
        prompt = _prompt(1)
        reference, _ = await generate_to_end(engines.a, prompt, _greedy(), "ref-1")
        migration = await _migrate(engines, prompt, "req-1", precopy_at=(20, 40), stop_at=60)
        assert migration.tokens == reference
        precopied = migration.chunks[:-1]
        assert [c.first_block for c in migration.chunks] == [0] + [c.end_block for c in precopied]
        assert sum(c.num_blocks for c in precopied) >= (PROMPT_LEN + 20) // BLOCK_SIZE
        await _assert_no_leak(engines)

    engines.run(check())


def test_stop_and_copy_migration_is_token_identical(engines):
    async def check():
        prompt = _prompt(2)
        reference, _ = await generate_to_end(engines.a, prompt, _greedy(), "ref-2")
        migration = await _migrate(engines, prompt, "req-2", stop_at=50)
        assert migration.tokens == reference
        assert migration.chunks[0].first_block == 0
        await _assert_no_leak(engines)

    engines.run(check())


def test_destination_computes_one_token_and_loads_the_rest(engines):
    async def check():
        prompt = _prompt(3)
        migration = await _migrate(engines, prompt, "req-3", precopy_at=(10,), stop_at=40)
        final = migration.final
        assert final.num_computed_tokens in (len(final.all_token_ids) - 1, len(final.all_token_ids))
        loaded = len(final.all_token_ids) - 1  # B had no prefix hit: everything but one token came from A
        assert migration.dst_output.num_cached_tokens == loaded
        assert _delta(migration, "loads") == 1
        assert _delta(migration, "tokens_loaded") == loaded
        assert _delta(migration, "blocks_imported") == math.ceil(loaded / BLOCK_SIZE)
        assert _delta(migration, "bytes_imported") == math.ceil(loaded / BLOCK_SIZE) * final.chunk.layout.bytes_per_block
        await _assert_no_leak(engines)

    engines.run(check())


def test_destination_prefix_hit_loads_only_the_missing_blocks(engines):
    async def check():
        prompt = _prompt(4)
        reference, _ = await generate_to_end(engines.a, prompt, _greedy(), "ref-4")
        await generate_to_end(engines.b, prompt, _greedy(1), "warm-b-4")  # B caches the prompt's full blocks
        migration = await _migrate(engines, prompt, "req-4", stop_at=40)
        assert migration.tokens == reference
        loaded_blocks = math.ceil((len(migration.final.all_token_ids) - 1) / BLOCK_SIZE) - PROMPT_LEN // BLOCK_SIZE
        assert _delta(migration, "blocks_imported") == loaded_blocks
        assert migration.dst_output.num_cached_tokens == len(migration.final.all_token_ids) - 1
        await _assert_no_leak(engines)

    engines.run(check())


def test_corrupted_staged_kv_changes_the_output(engines):
    async def check():
        prompt = _prompt(5)
        reference, _ = await generate_to_end(engines.a, prompt, _greedy(), "ref-5")
        migration = await _migrate(engines, prompt, "req-5", stop_at=40, corrupt=True)
        assert migration.dst_output.num_cached_tokens == len(migration.final.all_token_ids) - 1
        assert migration.tokens != reference
        await _assert_no_leak(engines)

    engines.run(check())


def test_client_abort_of_tagged_request_frees_its_blocks(engines):
    async def check():
        before = await engines.src.stats()
        stream = _Stream(engines, _prompt(6), "req-6")
        await stream.until(10)
        assert await engines.src.free_kv_blocks() < engines.baseline_a
        await engines.a.abort("req-6")
        await stream.task
        await _assert_no_leak(engines)  # within 5 s; the worker releases at the step that reports the abort
        after = await engines.src.stats()
        assert after["aborts_released"] - before["aborts_released"] == 1

    engines.run(check())


def test_unclaimed_final_export_is_freed_at_its_deadline(engines):
    async def check():
        before = await engines.src.stats()
        stream = _Stream(engines, _prompt(7), "req-7")
        await stream.until(10)
        await engines.a.collective_rpc("rayfleet_expect_final", args=("req-7", 0.3))
        await engines.a.abort("req-7")
        await stream.task
        await asyncio.sleep(0.1)
        assert (await engines.src.stats())["held_finals"] == 1  # kept for the export that never comes
        await asyncio.sleep(0.4)
        after = await engines.src.stats()
        assert after["finals_expired"] - before["finals_expired"] == 1
        [late] = await engines.a.collective_rpc("rayfleet_export_final", args=("req-7", 0))
        assert late["status"] == "expired"
        await _assert_no_leak(engines)

    engines.run(check())


def test_drop_staged_frees_the_staging(engines):
    async def check():
        stream = _Stream(engines, _prompt(8), "req-8")
        await stream.until(10)
        chunk = await engines.src.export_complete_blocks("req-8")
        await engines.a.abort("req-8")
        await stream.task
        await engines.dst.stage("mig-8", chunk)
        stats = await engines.dst.stats()
        assert stats["staged_migrations"] == 1 and stats["staged_bytes"] == chunk.nbytes > 0
        assert await engines.dst.drop_staged("mig-8")
        assert not await engines.dst.drop_staged("mig-8")
        await _assert_no_leak(engines)

    engines.run(check())


def test_resume_without_staged_kv_recomputes_and_stays_exact(engines):
    async def check():
        prompt = _prompt(10)
        reference, _ = await generate_to_end(engines.a, prompt, _greedy(40), "ref-10")
        before = await engines.dst.stats()
        # A resume whose staging never arrived: the worker reports its blocks as load errors and the
        # engine (kv_load_failure_policy="recompute") computes them instead.
        params = engines.dst.tag(_greedy(40), "req-10", load="mig-never-staged", num_tokens=PROMPT_LEN)
        tokens, _ = await generate_to_end(engines.b, prompt, params, "req-10")
        assert tokens == reference
        after = await engines.dst.stats()
        assert after["load_errors"] - before["load_errors"] == 1
        assert after["blocks_imported"] == before["blocks_imported"]
        await _assert_no_leak(engines)

    engines.run(check())


def test_staging_covered_by_the_local_prefix_cache_is_dropped(engines):
    async def check():
        prompt = _prompt(11)
        reference, _ = await generate_to_end(engines.a, prompt, _greedy(20), "ref-11")
        await generate_to_end(engines.b, prompt, _greedy(1), "warm-b-11")  # B caches the prompt's 3 full blocks
        layout = await engines.dst.layout()
        from rayfleet.actors.kv.engine_migrator import KVChunk

        await engines.dst.stage("mig-11", KVChunk(0, 2, torch.zeros(2, layout.bytes_per_block, dtype=torch.uint8),
                                                  layout))
        before = await engines.dst.stats()
        params = engines.dst.tag(_greedy(20), "req-11", load="mig-11", num_tokens=2 * BLOCK_SIZE)
        tokens, _ = await generate_to_end(engines.b, prompt, params, "req-11")
        assert tokens == reference  # the zeroed staging was never loaded
        after = await engines.dst.stats()
        assert after["staged_dropped_by_engine"] - before["staged_dropped_by_engine"] == 1
        assert after["blocks_imported"] == before["blocks_imported"]
        await _assert_no_leak(engines)

    engines.run(check())


def test_request_finished_before_the_stop_exports_nothing(engines):
    async def check():
        stream = _Stream(engines, _prompt(9), "req-9", max_tokens=8)
        await stream.task
        assert len(stream.tokens) == 8
        assert await engines.src.stop_and_export("req-9", timeout_s=2.0) is None
        await _assert_no_leak(engines)

    engines.run(check())


def test_mismatched_layout_is_refused(engines):
    from dataclasses import replace

    from rayfleet.actors.kv.engine_migrator import KVChunk, KVLayoutMismatchError

    async def check():
        layout = await engines.dst.layout()
        assert layout.kv_layout == "LBHNC" and layout.block_size == BLOCK_SIZE
        other = replace(layout, block_size=64)
        chunk = KVChunk(0, 1, torch.zeros(1, other.bytes_per_block, dtype=torch.uint8), other)
        with pytest.raises(KVLayoutMismatchError):
            await engines.dst.stage("mig-bad", chunk)
        # The worker checks too, and the engine survives the failed RPC.
        with pytest.raises(Exception, match="layout mismatch"):
            await engines.b.collective_rpc("rayfleet_stage", args=("mig-bad", 0, 1, bytes(other.bytes_per_block),
                                                                   other.to_wire()))
        assert (await engines.dst.stats())["staged_migrations"] == 0
        tokens, _ = await generate_to_end(engines.b, [5, 6, 7], _greedy(4), "after-bad-stage")
        assert len(tokens) == 4
        await _assert_no_leak(engines)

    engines.run(check())
