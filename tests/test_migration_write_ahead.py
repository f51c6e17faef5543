"""Pre-copied blocks are written into the destination's KV cache while the source keeps decoding (write-ahead):
the resumed request finds them in the destination's prefix cache and loads only the last stage. Uses the session
fleet's two "mig" replicas, called over Ray as the controller calls them.
"""

from __future__ import annotations

import random
import uuid

import pytest
import ray

from rayfleet.actors.replica.protocol import Destination, GenerateCall

pytestmark = pytest.mark.engines


def replica(replica_id: str):
    return ray.get_actor(f"rayfleet-replica-{replica_id}", namespace="rayfleet")


async def collect(handle, call: GenerateCall, migrate_to: Destination | None = None, at: int = 8):
    """The request's tokens; with `migrate_to`, pre-copy migrated there after `at` tokens (record returned)."""
    tokens, migration = [], None
    stream = handle.generate.options(num_returns="streaming").remote(call)
    while True:
        handoff = None
        async for ref in stream:
            chunk = await ref
            if chunk.handoff is not None:
                handoff = chunk.handoff
                break
            tokens += [t for c in chunk.choices for t in c.token_ids or []]
            if migrate_to is not None and migration is None and len(tokens) >= at:
                migration = handle.migrate_out.remote(call.request_id, migrate_to, f"wa-{uuid.uuid4().hex[:8]}",
                                                      "precopy")
        if handoff is None:
            return tokens, (await migration if migration is not None else None)
        tokens += list(handoff.all_token_ids[len(call.prompt_token_ids) + len(tokens):])
        stream = handoff.replica.attach.options(num_returns="streaming").remote(call.request_id)


async def test_pre_copied_blocks_are_written_ahead_and_the_output_stays_exact(fleet):
    from vllm import SamplingParams

    if len(fleet.replicas("mig")) < 2:
        ray.get(fleet.controller.scale.remote("mig", 2))
        fleet.wait_for(lambda: len(fleet.replicas("mig")) == 2, what="two ready mig replicas")
    src_id, dst_id = sorted(r["replica_id"] for r in fleet.replicas("mig"))
    src, dst = replica(src_id), replica(dst_id)
    destination = Destination(dst_id, dst, (await dst.engine_facts.remote())["node_id"])
    prompt = [random.Random(11).randrange(10, 500) for _ in range(600)]  # 18 full blocks to pre-copy
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)

    def call() -> GenerateCall:
        return GenerateCall(request_id=f"wa-{uuid.uuid4().hex[:8]}", prompt_token_ids=prompt, sampling_params=params)

    # The reference runs on the source: the destination's prefix cache must not already hold the prompt.
    reference, _ = await collect(src, call())
    before = await dst.kv_stats.remote()
    tokens, record = await collect(src, call(), migrate_to=destination)
    after = await dst.kv_stats.remote()

    assert tokens == reference
    assert record["outcome"] == "migrated" and record["stages"] >= 2, record
    assert after["write_ahead_loads"] - before["write_ahead_loads"] >= 1
    assert record["recomputed_tokens"] == 1
