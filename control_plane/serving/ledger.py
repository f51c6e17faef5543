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

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateTokensStreamChoice
from vllm.v1.engine.exceptions import EngineDeadError

from rayfleet.actors.replica.protocol import Destination, GenerateCall, Handoff, ReplicaNotAccepting

logger = logging.getLogger("rayfleet.ledger")

# Failures after which the request is replayed elsewhere instead of failing the client.
REPLICA_LOST = (RayActorError, ActorDiedError, ActorUnavailableError, ReplicaNotAccepting, EngineDeadError)


@dataclass(frozen=True)
class Placement:
    replica_id: str
    replica: object  # Ray actor handle
    handoff: Destination | None = None  # prefill/decode: where the request goes after its first token

    def start(self, call: GenerateCall):
        """The replica's stream of `call` (told where to hand it over, for a prefill placement)."""
        if self.handoff is not None:
            call = dataclasses.replace(call, handoff_to=self.handoff)
        return self.replica.generate.options(num_returns="streaming").remote(call)


# Picks a replica for a call, never one of `exclude`; raises NoReplicaAvailable when none is left.
PlaceFn = Callable[[GenerateCall, frozenset[str]], Awaitable[Placement]]


class ReplayImpossible(RuntimeError):
    """The request cannot be replayed (n > 1 with tokens already sent, or out of attempts)."""


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
    started_at: float = field(default_factory=time.monotonic)

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
        if params.n > 1 and self.output_tokens:
            raise ReplayImpossible("n > 1 requests cannot be replayed once tokens were sent")
        if not sent:
            return self.call
        params = copy.copy(params)
        params.max_tokens = max((params.max_tokens or 0) - len(sent), 1)
        params.min_tokens = max(params.min_tokens - len(sent), 0)
        return GenerateCall(
            request_id=self.call.request_id,
            prompt_token_ids=list(self.call.prompt_token_ids) + sent,
            sampling_params=params,
            priority=self.call.priority,
            workflow_id=self.call.workflow_id,
            predicted_output_tokens=self.call.predicted_output_tokens,
        )


async def follow(ledger: TokenLedger, place: PlaceFn, max_replays: int = 2) -> AsyncIterator[GenerateTokensStreamChoice]:
    """Stream a request's choices across handoffs and failures, recording each in the ledger.

    A placement already set on the ledger is used first (the ingress places eagerly to answer 429/503
    before a stream starts). Closing the iterator before the request is done (client disconnect) aborts
    it where it runs now.
    """
    exclude: set[str] = set()
    call = ledger.call
    if ledger.placement is None:
        ledger.placement = await place(call, frozenset())
    ledger.hops.append(ledger.placement.replica_id)
    stream = ledger.placement.start(call)
    try:
        while not ledger.done:
            try:
                handoff = None
                async for ref in stream:
                    chunk = await ref
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
                ledger.placement = Placement(handoff.replica_id, handoff.replica)
                ledger.hops.append(handoff.replica_id)
                stream = handoff.replica.attach.options(num_returns="streaming").remote(ledger.request_id)
            except REPLICA_LOST as error:
                if ledger.replays >= max_replays:
                    raise
                lost = ledger.placement.replica_id
                exclude.add(lost)
                replay = ledger.replay_call()
                logger.warning("request %s lost replica %s (%s); replaying %d tokens elsewhere",
                               ledger.request_id, lost, type(error).__name__, len(replay.prompt_token_ids))
                ledger.replays += 1
                ledger.placement = await place(replay, frozenset(exclude))
                ledger.hops.append(ledger.placement.replica_id)
                stream = ledger.placement.start(replay)
    finally:
        if not ledger.done and ledger.placement is not None:
            _abort_quietly(ledger)


def _abort_quietly(ledger: TokenLedger) -> None:
    """Fire-and-forget abort (the caller may be cancelled; the replica may be gone)."""
    try:
        ledger.placement.replica.abort.remote(ledger.request_id)
        logger.info("aborted request %s on %s", ledger.request_id, ledger.placement.replica_id)
    except Exception:  # the replica is already gone: nothing left to free
        logger.debug("abort of %s skipped: replica unreachable", ledger.request_id)

