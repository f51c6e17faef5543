"""The token ledger: one client stream over however many replicas a request passes through.

Each in-flight request has one ledger at the ingress: its prompt, its params, every token already sent to
the client, and the replica serving it now. The request keeps one id for its whole life. When it moves:
- by **live migration** the source's stream ends with a `Handoff`; the ledger emits any token the source
  committed but never streamed, then attaches to the destination, which resumes from the moved KV;
- by **replica failure** (actor died, engine dead, replica stopped accepting) the ledger replays prompt plus
  delivered tokens on another replica (what NVIDIA Dynamo does, and all it does).
Either way the client sees one uninterrupted stream with no duplicated or missing tokens.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateTokensStreamChoice
from vllm.v1.engine.exceptions import EngineDeadError

from rayfleet.actors.observability import tracing
from rayfleet.actors.replica.continuity import derived_seed, why_pinned
from rayfleet.actors.replica.protocol import (Destination, GenerateCall, Handoff, ReplicaChunk, ReplicaNotAccepting,
                                              UnknownRequest)

logger = logging.getLogger("rayfleet.ledger")


class ReplicaStalled(RuntimeError):
    """No chunk of the request arrived within the ingress' per-chunk deadline: the replica is hung."""


# Failures after which the request is replayed elsewhere instead of failing the client. UnknownRequest: the
# replica no longer knows the request (it can only have lost it), so its delivered tokens are all that is left.
REPLICA_LOST = (RayActorError, ActorDiedError, ActorUnavailableError, ReplicaNotAccepting, EngineDeadError,
                UnknownRequest, ReplicaStalled)


@dataclass(frozen=True)
class Placement:
    replica_id: str
    replica: object  # Ray actor handle
    handoff: Destination | None = None  # prefill/decode: where the request goes after its first token

    def prepare(self, call: GenerateCall) -> GenerateCall:
        """`call` as this replica runs it (told where to hand it over, for a prefill placement)."""
        return call if self.handoff is None else dataclasses.replace(call, handoff_to=self.handoff)


# Picks a replica for a call, never one of `exclude`; raises NoReplicaAvailable when none is left.
PlaceFn = Callable[[GenerateCall, frozenset[str]], Awaitable[Placement]]


class ChunkSource(Protocol):
    """How the ledger reaches a replica's chunks of one request (`replica_streams.ReplicaStreams`)."""

    def generate(self, replica_id: str, replica, call: GenerateCall) -> AsyncIterator[ReplicaChunk]: ...

    def attach(self, replica_id: str, replica, request_id: str) -> AsyncIterator[ReplicaChunk]: ...


class ReplayImpossible(RuntimeError):
    """The request cannot be replayed: tokens were sent and it is pinned (`continuity.why_pinned`)."""


@dataclass
class TokenLedger:
    call: GenerateCall
    placement: Placement | None = None
    delivered: dict[int, list[int]] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)
    hops: list[str] = field(default_factory=list)  # replicas the request has run on, in order
    migrations: int = 0
    replays: int = 0
    num_cached_tokens: int | None = None
    started_at: float = field(default_factory=time.monotonic)  # when the client's request arrived
    owner: str = ""  # the tenant whose key opened the request
    grammar_continues: bool = True  # its pool's engines advance a grammar over replayed output
    reseed_replays: bool = False  # a seeded request replays from a new seed (RL rollouts; see why_pinned)
    first_token_at: float | None = None
    last_token_at: float | None = None
    trace: Any = None  # the client request's tracing context: each hop's span is its child

    @property
    def request_id(self) -> str:
        return self.call.request_id

    @property
    def output_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.delivered.values())

    @property
    def done(self) -> bool:
        return len(self.finished) >= max(self.call.sampling_params.n, 1)

    def record(self, choice: GenerateTokensStreamChoice) -> None:
        self.delivered.setdefault(choice.index, []).extend(choice.token_ids or [])
        if choice.token_ids:
            self.last_token_at = time.monotonic()
            self.first_token_at = self.first_token_at or self.last_token_at
        if choice.finish_reason is not None:
            self.finished.add(choice.index)

    def unsent_after_handoff(self, handoff: Handoff) -> GenerateTokensStreamChoice | None:
        """Tokens the source committed (they are in the moved KV) but had not streamed yet."""
        # Sliced by the ledger's own prompt: after a replay the replica's prompt already holds sent tokens.
        committed = list(handoff.all_token_ids[len(self.call.prompt_token_ids):])
        sent = self.delivered.get(0, [])
        if committed[: len(sent)] != sent:
            raise RuntimeError(f"request {self.request_id}: source tokens diverge from the ledger at handoff")
        missing = committed[len(sent):]
        return GenerateTokensStreamChoice(index=0, token_ids=missing) if missing else None

    def replay_call(self) -> GenerateCall:
        """Prompt plus delivered tokens, with the remaining budget, for another replica."""
        params = self.call.sampling_params
        sent = self.delivered.get(0, [])
        pinned = why_pinned(params, self.grammar_continues, reseeds=self.reseed_replays)
        if pinned and self.output_tokens:
            raise ReplayImpossible(f"the replica serving request {self.request_id} failed after {self.output_tokens} "
                                   f"tokens were sent, and a request with {pinned} cannot continue on another "
                                   "replica without changing its output; send it again")
        if not sent:
            return self.call
        params = copy.copy(params)
        params.max_tokens = max((params.max_tokens or 0) - len(sent), 1)
        params.min_tokens = max(params.min_tokens - len(sent), 0)
        if self.reseed_replays and params.seed is not None:
            # The continuation's generator is seeded by the original seed and the prefix length: a rerun that
            # loses its replica at the same token samples the same continuation.
            params.seed = derived_seed(params.seed, len(sent))
        return GenerateCall(
            request_id=self.call.request_id,
            prompt_token_ids=list(self.call.prompt_token_ids) + sent,
            sampling_params=params,
            priority=self.call.priority,
            workflow_id=self.call.workflow_id,
            predicted_output_tokens=self.call.predicted_output_tokens,
            continued_tokens=len(sent),
        )


async def follow(ledger: TokenLedger, place: PlaceFn, source: ChunkSource, max_replays: int = 2,
                 chunk_timeout_s: float | None = None) -> AsyncIterator[GenerateTokensStreamChoice]:
    """Stream a request's choices across handoffs and failures, recording each in the ledger.

    A placement already set on the ledger is used first (the ingress places eagerly to answer 429/503
    before a stream starts). Closing the iterator before the request is done (client disconnect) aborts
    it where it runs now. A replica that sends no chunk for `chunk_timeout_s` is treated as lost.
    """
    exclude: set[str] = set()
    call = ledger.call
    if ledger.placement is None:
        ledger.placement = await place(call, frozenset())
    hop = _start_hop(ledger, "generate")
    stream = _generate(ledger, source, call, hop)
    try:
        while not ledger.done:
            try:
                handoff = None
                async for chunk in _within(stream, chunk_timeout_s, ledger):
                    if ledger.num_cached_tokens is None:
                        ledger.num_cached_tokens = chunk.num_cached_tokens
                    if chunk.handoff is not None:
                        handoff = chunk.handoff
                        break
                    for choice in chunk.choices:
                        ledger.record(choice)
                        yield choice
                if handoff is None:
                    if not ledger.done:
                        raise ReplicaNotAccepting(f"stream of {ledger.request_id} ended without finishing")
                    return
                unsent = ledger.unsent_after_handoff(handoff)
                if unsent is not None:
                    ledger.record(unsent)
                    yield unsent
                ledger.migrations += 1
                tracing.end_span(hop, **{"rayfleet.handed_off_to": handoff.replica_id})
                ledger.placement = Placement(handoff.replica_id, handoff.replica)
                hop = _start_hop(ledger, "attach")
                stream = source.attach(handoff.replica_id, handoff.replica, ledger.request_id)
            except REPLICA_LOST as error:
                if ledger.replays >= max_replays:
                    raise
                lost = ledger.placement.replica_id
                _abort_quietly(ledger)  # a hung replica would otherwise keep computing it
                exclude.add(lost)
                replay = ledger.replay_call()
                log_replay(ledger.request_id, lost, error, len(replay.prompt_token_ids))
                ledger.replays += 1
                tracing.end_span(hop, error)
                hop = None  # until the replay is placed
                ledger.placement = await place(replay, frozenset(exclude))
                hop = _start_hop(ledger, "replay")
                stream = _generate(ledger, source, replay, hop)
    finally:
        tracing.end_span(hop, **{"rayfleet.output_tokens": ledger.output_tokens})
        if not ledger.done and ledger.placement is not None:
            _abort_quietly(ledger)


_replicas_reported: collections.OrderedDict[str, None] = collections.OrderedDict()


def log_replay(request_id: str, replica_id: str, error: BaseException, tokens: int) -> None:
    """One warning per lost replica, with its first request; the rest of its requests (a dead rollout replica
    had a hundred) at debug level: the replays metric counts them all."""
    level = logging.DEBUG if replica_id in _replicas_reported else logging.WARNING
    _replicas_reported[replica_id] = None
    while len(_replicas_reported) > 1024:
        _replicas_reported.popitem(last=False)
    logger.log(level, "request %s lost replica %s (%s); replaying %d tokens elsewhere%s", request_id, replica_id,
               type(error).__name__, tokens,
               " (its other requests are replayed too, logged at debug level)" if level == logging.WARNING else "")


async def _within(stream, timeout_s: float | None, ledger: TokenLedger):
    """The stream's chunks, each within `timeout_s` of the previous one (ReplicaStalled otherwise).

    `asyncio.timeout`, not `wait_for`: on Python 3.11 `wait_for` wraps every chunk's wait in a new task,
    which is per-token CPU on the ingress."""
    if timeout_s is None:
        async for chunk in stream:
            yield chunk
        return
    while True:
        try:
            async with asyncio.timeout(timeout_s):
                chunk = await anext(stream)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise ReplicaStalled(f"no chunk of {ledger.request_id} from {ledger.placement.replica_id} "
                                 f"for {timeout_s:.0f} s") from None
        yield chunk


def _start_hop(ledger: TokenLedger, kind: str):
    """The span of the request's stay on the replica it is placed on now (generate, attach or replay)."""
    ledger.hops.append(ledger.placement.replica_id)
    return tracing.start_span(f"hop {kind}", ledger.trace, tracing.SpanKind.CLIENT,
                              {"rayfleet.replica": ledger.placement.replica_id, "rayfleet.hop": len(ledger.hops)})


def _generate(ledger: TokenLedger, source: ChunkSource, call: GenerateCall, hop) -> AsyncIterator[ReplicaChunk]:
    """Start `call` on the placed replica; the replica continues the trace under the hop's span."""
    call = ledger.placement.prepare(dataclasses.replace(call, trace_headers=tracing.headers_of(hop)))
    return source.generate(ledger.placement.replica_id, ledger.placement.replica, call)


def _abort_quietly(ledger: TokenLedger) -> None:
    """Fire-and-forget abort (the caller may be cancelled; the replica may be gone)."""
    try:
        ledger.placement.replica.abort.remote(ledger.request_id)
        logger.info("aborted request %s on %s", ledger.request_id, ledger.placement.replica_id)
    except Exception:  # the replica is already gone: nothing left to free
        logger.debug("abort of %s skipped: replica unreachable", ledger.request_id)

