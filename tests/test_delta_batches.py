"""Batching a replica's deltas for its readers (`actors/replica/delta_stream.py`): what one stream item carries."""

from __future__ import annotations

import asyncio

from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateTokensStreamChoice

from rayfleet.actors.replica.delta_stream import Outbox, Outboxes, coalesce
from rayfleet.actors.replica.protocol import Handoff, ReplicaChunk, RequestDelta


def tokens(request_id: str, *ids: int, finish: str | None = None) -> RequestDelta:
    choice = GenerateTokensStreamChoice(index=0, token_ids=list(ids), finish_reason=finish)
    return RequestDelta(request_id, chunk=ReplicaChunk(choices=[choice]))


def handoff(request_id: str) -> RequestDelta:
    return RequestDelta(request_id, chunk=ReplicaChunk(handoff=Handoff("dst", None, (1, 2, 3))))


def flat(deltas: list[RequestDelta]) -> list[tuple]:
    return [(d.request_id, "end" if d.chunk is None and d.error is None else "error" if d.error else
             "handoff" if d.chunk.handoff else tuple(d.chunk.choices[0].token_ids)) for d in deltas]


def test_token_chunks_merge_but_never_across_a_handoff_or_an_end():
    merged = coalesce([tokens("r", 1), tokens("r", 2), handoff("r"), tokens("r", 3), RequestDelta("r"),
                       tokens("r", 4)])
    assert flat(merged) == [("r", (1, 2)), ("r", "handoff"), ("r", (3,)), ("r", "end"), ("r", (4,))]


def test_one_batch_carries_every_request_in_its_own_order():
    outbox = Outbox()
    for delta in (tokens("a", 1), tokens("b", 7), tokens("a", 2, finish="length"), RequestDelta("a"),
                  RequestDelta("b", error=RuntimeError("engine died"))):
        outbox.put(delta)
    batch = outbox.take()
    assert flat(batch.deltas) == [("a", (1, 2)), ("a", "end"), ("b", (7,)), ("b", "error")]
    assert batch.deltas[0].chunk.choices[0].finish_reason == "length"
    assert outbox.take().deltas == [] and not outbox.ready.is_set()


def test_the_first_delta_goes_out_without_waiting_for_a_window():
    async def first_batch() -> list[tuple]:
        outbox = Outbox()
        batches = outbox.batches()
        reader = asyncio.create_task(batches.__anext__())
        await asyncio.sleep(0)
        outbox.put(tokens("a", 5))
        return flat((await asyncio.wait_for(reader, timeout=1)).deltas)

    assert asyncio.run(first_batch()) == [("a", (5,))]


def test_a_closed_reader_names_the_requests_that_were_still_streaming_to_it():
    outboxes = Outboxes()
    outbox = outboxes.get("ingress-1")
    outbox.requests |= {"done", "running", "moved"}
    outbox.put(RequestDelta("done"))
    outbox.put(handoff("moved"))
    assert outboxes.close("ingress-1") == {"running"}
    assert outboxes.get("ingress-1") is not outbox
