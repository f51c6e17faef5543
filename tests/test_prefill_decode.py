"""Prefill/decode disaggregation on real engines: a prefill replica hands a request, with its KV, to a decode
replica after the first token (a stop-and-copy migration through the same connector), and the token ledger
follows it. Uses the session fleet's two "mig" replicas as the prefill and the decode replica.
"""

from __future__ import annotations

import random
import uuid

import pytest
import ray

from rayfleet.actors.replica.protocol import Destination, GenerateCall
from rayfleet.control_plane.serving.ledger import Placement, TokenLedger, follow

pytestmark = pytest.mark.engines


def replica(replica_id: str):
    return ray.get_actor(f"rayfleet-replica-{replica_id}", namespace="rayfleet")


async def run(call: GenerateCall, placement: Placement) -> tuple[list[int], TokenLedger]:
    ledger = TokenLedger(call=call, placement=placement)

    async def nowhere(_call, _exclude):  # the test places every hop itself; a replay would be a failure
        raise AssertionError("the request was replayed instead of handed over")

    tokens: list[int] = []
    async for choice in follow(ledger, nowhere, max_replays=0):
        tokens += choice.token_ids or []
    return tokens, ledger


async def test_a_request_prefilled_on_one_replica_decodes_on_another_token_exact(fleet):
    from vllm import SamplingParams

    if len(fleet.replicas("mig")) < 2:
        ray.get(fleet.controller.scale.remote("mig", 2))
        fleet.wait_for(lambda: len(fleet.replicas("mig")) == 2, what="two ready mig replicas")
    prefill_id, decode_id = sorted(r["replica_id"] for r in fleet.replicas("mig"))
    prefill, decode = replica(prefill_id), replica(decode_id)
    decode_node = (await decode.engine_facts.remote())["node_id"]
    prompt = [random.Random(7).randrange(10, 500) for _ in range(300)]  # 9 full blocks and a partial one
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)

    def call() -> GenerateCall:
        return GenerateCall(request_id=f"pd-{uuid.uuid4().hex[:8]}", prompt_token_ids=prompt, sampling_params=params)

    reference, _ = await run(call(), Placement(decode_id, decode))
    handed, ledger = await run(call(), Placement(prefill_id, prefill, Destination(decode_id, decode, decode_node)))

    assert handed == reference and len(handed) == 48
    assert ledger.migrations == 1 and ledger.hops == [prefill_id, decode_id]
    [record] = [r for r in await prefill.handoff_records.remote() if r["request_id"] == ledger.request_id]
    assert record["outcome"] == "migrated" and record["mode"] == "stop_and_copy"
    assert record["recomputed_tokens"] == 1  # the decode replica computed one token: the KV moved whole
    assert record["blocks_moved"] >= 300 // 32
