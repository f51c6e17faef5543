"""One request running on a replica: its call, its output queue and the progress the fleet sees."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from rayfleet.actors.replica.delta_stream import Outbox
from rayfleet.actors.replica.protocol import GenerateCall, ReplicaChunk, RequestDelta


@dataclass
class ActiveRequest:
    call: GenerateCall
    prompt_len: int
    max_tokens: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    output_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)  # choice 0's tokens (migration writes ahead by them)
    first_token_at: float | None = None
    last_token_at: float | None = None
    last_token_wall: float | None = None  # wall clock: migration downtime spans two processes
    first_output: asyncio.Event = field(default_factory=asyncio.Event)
    num_cached_tokens: int | None = None  # the engine's prefix hit (local cache + KV loaded by the connector)
    arrival_time: float = field(default_factory=time.time)
    arrival_monotonic: float = field(default_factory=time.monotonic)
    task: asyncio.Task | None = None
    span: Any = None  # this replica's tracing span of the request (ended when it finishes or leaves)
    # Set while the request is being moved out: the engine's abort output then must not end the
    # client's stream; the migration puts a handoff (or resumes locally) instead.
    leaving: bool = False
    finished: bool = False  # its stream on this replica is complete
    arrived: bool = False  # it came here by migration: the ingress attaches to it (see LLMReplica.attach)
    attached: bool = False
    # The reader's multiplexed stream, once one follows the request there; until then `queue` holds its output.
    outbox: Outbox | None = None

    def deliver(self, item: RequestDelta) -> None:
        """The request's next piece, to its reader's outbox or, while it has none, to its own queue."""
        if self.outbox is not None:
            self.outbox.put(item)
        else:
            self.queue.put_nowait(item)

    def deliver_committed(self, all_token_ids: list[int], finish_reason: str | None = None) -> None:
        """Stream the tokens the engine committed (they are in its KV) that the reader has not had: after a stop
        these are the output of the step in flight, which the abort kept from the reader. Token ids only (the
        engine's export carries no logprobs). With a finish reason, the request's last chunk."""
        from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateTokensStreamChoice

        unsent = list(all_token_ids[self.prompt_len + self.output_tokens:])
        if not unsent and finish_reason is None:
            return
        self.output_tokens += len(unsent)
        self.output_token_ids += unsent
        if unsent:
            self.last_token_at, self.last_token_wall = time.monotonic(), time.time()
        self.deliver(RequestDelta(self.call.request_id, chunk=ReplicaChunk(choices=[
            GenerateTokensStreamChoice(index=0, token_ids=unsent, finish_reason=finish_reason)])))

    def deliver_to(self, outbox: Outbox) -> None:
        """From now on the request streams on `outbox`, starting with what has queued up so far."""
        outbox.requests.add(self.call.request_id)
        while not self.queue.empty():
            outbox.put(self.queue.get_nowait())
        self.outbox = outbox
