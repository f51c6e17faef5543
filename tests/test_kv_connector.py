"""Live migration through rayfleet's KV connector, on two real vLLM CPU engines (AsyncLLM, tiny Llama).

Both engines serve tiny-llama-a with block size 32 and prefix caching, and are shared by every test.
References are computed on engine A without tags; migrations go from A to B. Every test ends by
checking that both engines' free KV blocks return to their values after warm-up (nothing leaks).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import numpy as np
import pytest
from engine_harness import (
    BLOCK_SIZE,
    EnginePair,
    generate_to_end,
    greedy,
    random_prompt,
    settled_free_blocks,
    start_engine_pair,
)

from rayfleet.kernels import SharedRows, live_files

pytestmark = pytest.mark.engines

PROMPT_LEN = 100  # not a multiple of the block size: the last prompt block is partial
MAX_TOKENS = 300  # long enough that a request is still decoding when a test stops it


@pytest.fixture(scope="module")
def engines(demo_models):
    pair = start_engine_pair(demo_models / "tiny-llama-a")
    yield pair
    pair.close()


def _greedy(max_tokens: int = MAX_TOKENS):
    return greedy(max_tokens)


def _prompt(seed: int) -> list[int]:
    return random_prompt(seed, PROMPT_LEN)


class _Stream:
    """A tagged request running on the source, its streamed tokens collected as a client would."""

    def __init__(self, engines: EnginePair, prompt: list[int], request_id: str, max_tokens: int = MAX_TOKENS):
        self.tokens: list[int] = []
        params = engines.rpc_a.tag(_greedy(max_tokens), request_id)
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


async def _migrate(engines: EnginePair, prompt: list[int], request_id: str, precopy_at: tuple[int, ...] = (),
                   stop_at: int = 60, corrupt: bool = False) -> Migration:
    from rayfleet.actors.kv.engine_migrator import KVChunk

    migration_id = f"mig-{request_id}"
    stats_before = await engines.rpc_b.stats()
    stream = _Stream(engines, prompt, request_id)
    chunks = []
    next_block = 0
    for num_tokens in precopy_at:
        await stream.until(num_tokens)
        chunk = await engines.rpc_a.export_complete_blocks(request_id, next_block)
        await engines.rpc_b.stage(migration_id, chunk)
        chunks.append(chunk)
        next_block = chunk.end_block
    await stream.until(stop_at)
    final = await engines.rpc_a.stop_and_export(request_id, next_block)
    assert final is not None
    await stream.task  # the abort ends the source's stream
    chunk = final.chunk
    if corrupt:  # zeros carried by value: the path of a chunk from another node
        chunk.release()
        chunk = KVChunk(chunk.first_block, chunk.num_blocks, chunk.layout,
                        data=np.zeros((chunk.num_blocks, chunk.layout.bytes_per_block), dtype=np.uint8))
    await engines.rpc_b.stage(migration_id, chunk)
    chunks.append(chunk)
    for staged in chunks:  # B mapped them while staging: the exporter may unlink its rows now
        staged.release()

    streamed = stream.tokens
    generated_on_src = final.all_token_ids[len(prompt):]
    assert generated_on_src[:len(streamed)] == streamed
    resume = engines.rpc_a.resume(final, _greedy(), len(prompt), request_id, migration_id)
    dst_tokens, dst_output = await generate_to_end(engines.b, resume.prompt_token_ids, resume.sampling_params, request_id)
    return Migration(streamed + generated_on_src[len(streamed):] + dst_tokens, final, chunks, dst_output,
                     stats_before, await engines.rpc_b.stats())


async def _assert_no_leak(engines: EnginePair) -> None:
    free_a = await settled_free_blocks(engines.rpc_a, expect=engines.baseline[0])
    free_b = await settled_free_blocks(engines.rpc_b, expect=engines.baseline[1])
    assert (free_a, free_b) == (engines.baseline[0], engines.baseline[1])
    for migrator in (engines.rpc_a, engines.rpc_b):
        stats = await migrator.stats()
        assert stats["held_finals"] == 0 and stats["staged_migrations"] == 0 and stats["tracked_requests"] == 0
    assert live_files() == []  # no shared-memory rows left behind


def _delta(migration: Migration, counter: str) -> int:
    return migration.stats_after[counter] - migration.stats_before[counter]


def test_free_block_count_is_published(engines):
    async def check():
        stats = await engines.rpc_a.stats()
        # Everything is free after warm-up but vLLM's reserved null block.
        assert engines.baseline[0] == stats["num_blocks"] - 1 > 0
        assert engines.baseline[1] == (await engines.rpc_b.stats())["num_blocks"] - 1
        # A fresh engine reports the same before its first step (a new replica can take migrations).
        assert engines.free_before_first_step == (engines.baseline[0], engines.baseline[1])

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


def test_a_resume_sent_right_behind_its_unacknowledged_last_stage_loads_it(engines):
    # The replica submits the resumed request without waiting for the staging's reply (one of B's steps less
    # in the pause): B must still read the staging first, because it was sent first.
    async def check():
        prompt = _prompt(12)
        reference, _ = await generate_to_end(engines.a, prompt, _greedy(), "ref-12")
        stream = _Stream(engines, prompt, "req-12")
        await stream.until(40)
        final = await engines.rpc_a.stop_and_export("req-12", 0)
        await stream.task
        before = await engines.rpc_b.stats()
        staged = await engines.rpc_b.send_stage("mig-12", final.chunk)
        assert not staged.done()  # the reply is still on its way when the request follows
        resume = engines.rpc_a.resume(final, _greedy(), len(prompt), "req-12", "mig-12")
        dst_tokens, dst_output = await generate_to_end(engines.b, resume.prompt_token_ids, resume.sampling_params,
                                                       "req-12")
        await staged
        final.chunk.release()
        assert final.all_token_ids[len(prompt):] + dst_tokens == reference
        after = await engines.rpc_b.stats()
        loaded = len(final.all_token_ids) - 1  # everything but one token, from the staging
        assert (after["load_errors"] - before["load_errors"], after["tokens_loaded"] - before["tokens_loaded"]) == (
            0, loaded)
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
        before = await engines.rpc_a.stats()
        stream = _Stream(engines, _prompt(6), "req-6")
        await stream.until(10)
        assert await engines.rpc_a.free_kv_blocks() < engines.baseline[0]
        await engines.a.abort("req-6")
        await stream.task
        await _assert_no_leak(engines)  # within 5 s; the worker releases at the step that reports the abort
        after = await engines.rpc_a.stats()
        assert after["aborts_released"] - before["aborts_released"] == 1

    engines.run(check())


def test_unclaimed_final_export_is_freed_at_its_deadline(engines):
    async def stats_until(predicate, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while not predicate(stats := await engines.rpc_a.stats()):
            assert time.monotonic() < deadline, f"condition not reached: {stats}"
            await asyncio.sleep(0.02)
        return stats

    async def check():
        before = await engines.rpc_a.stats()
        stream = _Stream(engines, _prompt(7), "req-7")
        await stream.until(10)
        await engines.a.collective_rpc("rayfleet_expect_final", args=("req-7", 2.0))
        await engines.a.abort("req-7")
        await stream.task
        # Kept for the export that never comes, then freed once its deadline has passed.
        await stats_until(lambda s: s["held_finals"] == 1, timeout_s=1.5)
        after = await stats_until(lambda s: s["finals_expired"] > before["finals_expired"], timeout_s=5)
        assert after["finals_expired"] - before["finals_expired"] == 1 and after["held_finals"] == 0
        [late] = await engines.a.collective_rpc("rayfleet_export_final", args=("req-7", 0, "host"))
        assert late["status"] == "expired"
        await _assert_no_leak(engines)

    engines.run(check())


def test_drop_staged_frees_the_staging(engines):
    async def check():
        stream = _Stream(engines, _prompt(8), "req-8")
        await stream.until(10)
        chunk = await engines.rpc_a.export_complete_blocks("req-8")
        await engines.a.abort("req-8")
        await stream.task
        await engines.rpc_b.stage("mig-8", chunk)
        chunk.release()
        stats = await engines.rpc_b.stats()
        assert stats["staged_migrations"] == 1 and stats["staged_bytes"] == chunk.nbytes > 0
        assert await engines.rpc_b.drop_staged("mig-8")
        assert not await engines.rpc_b.drop_staged("mig-8")
        await _assert_no_leak(engines)

    engines.run(check())


def test_resume_without_staged_kv_recomputes_and_stays_exact(engines):
    async def check():
        prompt = _prompt(10)
        reference, _ = await generate_to_end(engines.a, prompt, _greedy(40), "ref-10")
        before = await engines.rpc_b.stats()
        # A resume whose staging never arrived: the worker reports its blocks as load errors and the
        # engine (kv_load_failure_policy="recompute") computes them instead.
        params = engines.rpc_b.tag(_greedy(40), "req-10", load="mig-never-staged", num_tokens=PROMPT_LEN)
        tokens, _ = await generate_to_end(engines.b, prompt, params, "req-10")
        assert tokens == reference
        after = await engines.rpc_b.stats()
        assert after["load_errors"] - before["load_errors"] == 1
        assert after["blocks_imported"] == before["blocks_imported"]
        await _assert_no_leak(engines)

    engines.run(check())


def test_staging_covered_by_the_local_prefix_cache_is_dropped(engines):
    async def check():
        prompt = _prompt(11)
        reference, _ = await generate_to_end(engines.a, prompt, _greedy(20), "ref-11")
        await generate_to_end(engines.b, prompt, _greedy(1), "warm-b-11")  # B caches the prompt's 3 full blocks
        layout = await engines.rpc_b.layout()
        from rayfleet.actors.kv.engine_migrator import KVChunk

        await engines.rpc_b.stage("mig-11", KVChunk(0, 2, layout, data=np.zeros((2, layout.bytes_per_block), np.uint8)))
        before = await engines.rpc_b.stats()
        params = engines.rpc_b.tag(_greedy(20), "req-11", load="mig-11", num_tokens=2 * BLOCK_SIZE)
        tokens, _ = await generate_to_end(engines.b, prompt, params, "req-11")
        assert tokens == reference  # the zeroed staging was never loaded
        after = await engines.rpc_b.stats()
        assert after["staged_dropped_by_engine"] - before["staged_dropped_by_engine"] == 1
        assert after["blocks_imported"] == before["blocks_imported"]
        await _assert_no_leak(engines)

    engines.run(check())


def test_request_finished_before_the_stop_exports_nothing(engines):
    async def check():
        stream = _Stream(engines, _prompt(9), "req-9", max_tokens=8)
        await stream.task
        assert len(stream.tokens) == 8
        assert await engines.rpc_a.stop_and_export("req-9", timeout_s=2.0) is None
        await _assert_no_leak(engines)

    engines.run(check())


def test_mismatched_layout_is_refused(engines):
    from dataclasses import replace

    from rayfleet.actors.kv.engine_migrator import KVChunk, KVLayoutMismatchError

    async def check():
        layout = await engines.rpc_b.layout()
        assert layout.kv_layout == "LBHNC" and layout.block_size == BLOCK_SIZE
        other = replace(layout, block_size=64)
        shared, _ = SharedRows.allocate(1, other.bytes_per_block)
        chunk = KVChunk(0, 1, other, shared=shared)
        try:
            with pytest.raises(KVLayoutMismatchError):
                await engines.rpc_b.stage("mig-bad", chunk)
            # The worker checks too, and the engine survives the failed RPC.
            with pytest.raises(Exception, match="layout mismatch"):
                await engines.b.collective_rpc("rayfleet_stage", args=("mig-bad", chunk.to_wire()))
        finally:
            chunk.release()
        assert (await engines.rpc_b.stats())["staged_migrations"] == 0
        tokens, _ = await generate_to_end(engines.b, [5, 6, 7], _greedy(4), "after-bad-stage")
        assert len(tokens) == 4
        await _assert_no_leak(engines)

    engines.run(check())
