"""Moving a request's KV between the session fleet's two "mig" replicas, called over Ray as the controller calls
them: pre-copied blocks written ahead into the destination's KV cache while the source decodes (the resume loads
only the last stage), and prefill/decode disaggregation (a prefill replica hands the request, with its KV, to a
decode replica after the first token, and the token ledger follows it).
"""

from __future__ import annotations

import random
import uuid

import pytest
import ray

from rayfleet.actors.replica.protocol import Destination, GenerateCall
from rayfleet.control_plane.serving.ledger import Placement, TokenLedger, follow
from rayfleet.control_plane.serving.replica_streams import ReplicaStreams

pytestmark = pytest.mark.engines


@pytest.fixture
def two_replicas(fleet):
    """The "mig" pool's two replicas (id, handle, Destination), both ready (an earlier drain may have left one)."""
    if len(fleet.replicas("mig")) < 2:
        ray.get(fleet.controller.scale.remote("mig", 2))
        fleet.wait_for(lambda: len(fleet.replicas("mig")) == 2, what="two ready mig replicas")
    found = []
    for replica_id in sorted(r["replica_id"] for r in fleet.replicas("mig")):
        handle = ray.get_actor(f"rayfleet-replica-{replica_id}", namespace="rayfleet")
        node = ray.get(handle.engine_facts.remote())["node_id"]
        found.append((replica_id, handle, Destination(replica_id, handle, node)))
    return found


def greedy_call(prompt: list[int], max_tokens: int) -> GenerateCall:
    from vllm import SamplingParams

    return GenerateCall(request_id=f"kv-{uuid.uuid4().hex[:8]}", prompt_token_ids=prompt,
                        sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


async def run(call: GenerateCall, placement: Placement, migrate_to: Destination | None = None):
    """The request's tokens through the token ledger (across handoffs), its ledger, and with `migrate_to` the
    record of a pre-copy migration there started after 8 tokens."""
    ledger = TokenLedger(call=call, placement=placement)

    async def nowhere(_call, _exclude):  # the test places every hop itself; a replay would be a failure
        raise AssertionError("the request was replayed instead of moved")

    tokens, migration = [], None
    async for choice in follow(ledger, nowhere, ReplicaStreams(), max_replays=0):
        tokens += choice.token_ids or []
        if migrate_to is not None and migration is None and len(tokens) >= 8:
            migration = placement.replica.migrate_out.remote(call.request_id, migrate_to,
                                                             f"wa-{uuid.uuid4().hex[:8]}", "precopy")
    return tokens, ledger, (await migration if migration is not None else None)


async def test_pre_copied_blocks_are_written_ahead_and_the_output_stays_exact(two_replicas):
    (src_id, src, _), (_, dst, destination) = two_replicas
    prompt = [random.Random(11).randrange(10, 500) for _ in range(600)]  # 18 full blocks to pre-copy
    # The reference runs on the source: the destination's prefix cache must not already hold the prompt.
    reference, _, _ = await run(greedy_call(prompt, 120), Placement(src_id, src))
    before = await dst.kv_stats.remote()
    tokens, _, record = await run(greedy_call(prompt, 120), Placement(src_id, src), migrate_to=destination)
    after = await dst.kv_stats.remote()

    assert tokens == reference
    assert record["outcome"] == "migrated" and record["stages"] >= 2, record
    assert after["write_ahead_loads"] - before["write_ahead_loads"] >= 1
    assert record["recomputed_tokens"] == 1


async def test_a_request_prefilled_on_one_replica_decodes_on_another_token_exact(two_replicas):
    (prefill_id, prefill, _), (decode_id, decode, to_decode) = two_replicas
    prompt = [random.Random(7).randrange(10, 500) for _ in range(300)]  # 9 full blocks and a partial one
    reference, _, _ = await run(greedy_call(prompt, 48), Placement(decode_id, decode))
    handed, ledger, _ = await run(greedy_call(prompt, 48), Placement(prefill_id, prefill, to_decode))

    assert handed == reference and len(handed) == 48
    assert ledger.migrations == 1 and ledger.hops == [prefill_id, decode_id]
    [record] = [r for r in await prefill.handoff_records.remote() if r["request_id"] == ledger.request_id]
    assert record["outcome"] == "migrated" and record["mode"] == "stop_and_copy"
    assert record["recomputed_tokens"] == 1  # the decode replica computed one token: the KV moved whole
    assert record["blocks_moved"] >= 300 // 32
