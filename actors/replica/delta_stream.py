"""Batching a replica's token deltas: one Ray stream per reader carries every request's deltas.

A per-request Ray stream costs one stream item (serialize, report, deserialize) and one derender call per
token; at saturation that cost more CPU than the engine. Instead each ingress process opens one long-lived
stream per replica (`LLMReplica.deltas`), and the requests it starts there (`LLMReplica.submit`) or follows
there after a migration (`LLMReplica.attach_to`) deliver into that reader's `Outbox`. The outbox sends what
has accumulated as one `DeltaBatch` as soon as the stream can take it: every request's deltas of one engine
step ride in one item, and nothing waits for a batch window (the first token goes out with the step that
made it). A request's consecutive token chunks in one batch are merged into one chunk (tokens and logprobs
concatenated), so the ingress derenders a batch per request at a time; ends, errors and handoffs are never
merged across, so the order the ledger relies on is the order the engine produced.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from rayfleet.actors.replica.protocol import DeltaBatch, ReplicaChunk, RequestDelta


def merge_chunks(first: ReplicaChunk, second: ReplicaChunk) -> ReplicaChunk:
    """Two consecutive chunks of one request as one: per choice, tokens and logprobs concatenated."""
    merged = {c.index: c.model_copy(deep=True) for c in first.choices}
    for choice in second.choices:
        into = merged.get(choice.index)
        if into is None:
            merged[choice.index] = choice
            continue
        into.token_ids = (into.token_ids or []) + (choice.token_ids or [])
        if choice.logprobs is not None:
            content = (into.logprobs.content if into.logprobs else []) + (choice.logprobs.content or [])
            into.logprobs = choice.logprobs.model_copy(update={"content": content})
        into.finish_reason, into.stop_reason = choice.finish_reason, choice.stop_reason
        into.weight_versions = choice.weight_versions or into.weight_versions  # spans come with the end
    return ReplicaChunk(choices=[merged[i] for i in sorted(merged)],
                        num_cached_tokens=first.num_cached_tokens if first.num_cached_tokens is not None
                        else second.num_cached_tokens)


def mergeable(delta: RequestDelta) -> bool:
    """Plain token chunks merge; an end, an error or a handoff stays where it is."""
    return delta.chunk is not None and delta.chunk.handoff is None


def coalesce(deltas: list[RequestDelta]) -> list[RequestDelta]:
    """One request's deltas in order, with each run of token chunks merged into one."""
    out: list[RequestDelta] = []
    for delta in deltas:
        if out and mergeable(out[-1]) and mergeable(delta):
            out[-1] = RequestDelta(out[-1].request_id, chunk=merge_chunks(out[-1].chunk, delta.chunk))
        else:
            out.append(delta)
    return out


@dataclass
class BatchStats:
    """How much the batching saves: stream items sent and the request deltas they carried."""

    batches: int = 0
    deltas: int = 0


async def read_chunks(queue: asyncio.Queue[RequestDelta]) -> AsyncIterator[ReplicaChunk]:
    """A request's chunks from its queue of deltas, up to its end, error (raised) or handoff (the last chunk);
    what queued up while the reader was busy comes merged, so it is derendered as one chunk."""
    while True:
        deltas = [await queue.get()]
        while not queue.empty():
            deltas.append(queue.get_nowait())
        for delta in coalesce(deltas):
            if delta.error is not None:
                raise delta.error
            if delta.chunk is None:
                return
            yield delta.chunk
            if delta.chunk.handoff is not None:
                return


class Outbox:
    """What one reader has not received yet, per request, in the order it was produced."""

    def __init__(self, stats: BatchStats | None = None) -> None:
        self.stats = stats or BatchStats()
        self.pending: dict[str, list[RequestDelta]] = {}
        self.ready = asyncio.Event()
        self.requests: set[str] = set()  # requests delivering here, to abort if the reader goes away

    def put(self, delta: RequestDelta) -> None:
        self.pending.setdefault(delta.request_id, []).append(delta)
        if delta.chunk is None or delta.chunk.handoff is not None:  # the request is done on this replica
            self.requests.discard(delta.request_id)
        self.ready.set()

    def take(self) -> DeltaBatch:
        pending, self.pending = self.pending, {}
        self.ready.clear()
        self.stats.batches += 1
        self.stats.deltas += sum(len(deltas) for deltas in pending.values())
        return DeltaBatch([d for deltas in pending.values() for d in coalesce(deltas)])

    async def batches(self) -> AsyncIterator[DeltaBatch]:
        while True:
            await self.ready.wait()
            yield self.take()


class Outboxes:
    """A replica's outboxes, one per reader (subscriber id); `submit` may arrive before the stream opens."""

    def __init__(self) -> None:
        self.by_subscriber: dict[str, Outbox] = {}
        self.stats = BatchStats()

    def get(self, subscriber: str) -> Outbox:
        if subscriber not in self.by_subscriber:
            self.by_subscriber[subscriber] = Outbox(self.stats)
        return self.by_subscriber[subscriber]

    def close(self, subscriber: str) -> set[str]:
        """Forget a reader; returns the requests that were still delivering to it."""
        outbox = self.by_subscriber.pop(subscriber, None)
        return set() if outbox is None else outbox.requests
