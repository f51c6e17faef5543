"""What every front end of the ingress shares: callers (`auth.py`), the fleet view, admission, placement, ledgers.

The HTTP routes (`openai_api.py`, `admin_api.py`) and the gRPC servicer (`grpc_servicer.py`) are mixins over
one `FleetGateway`; `ingress.py` assembles them into the Serve deployment. The gateway knows the controller
only by name (`controller_api`) and sees the fleet as a `FleetSnapshot`: the controller's view, refreshed at
most every `VIEW_TTL_S` and off the requests' path, with this ingress' own in-flight requests laid over it.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Callable

import ray
from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateTokensStreamChoice

from rayfleet.actors.embedding.embedder import get_or_create_embedder
from rayfleet.actors.observability import tracing
from rayfleet.actors.observability.logs import configure_actor_logging
from rayfleet.actors.replica.protocol import Destination, GenerateCall
from rayfleet.control_plane.controller_api import CONTROLLER_NAME, NAMESPACE
from rayfleet.control_plane.serving.auth import KeyRing, Principal
from rayfleet.control_plane.serving.errors import OpenAIHTTPError
from rayfleet.control_plane.serving.ledger import Placement, TokenLedger, follow
from rayfleet.control_plane.serving.rendering import PoolRenderer
from rayfleet.control_plane.serving.replica_streams import ReplicaStreams
from rayfleet.control_plane.serving.request_telemetry import ClientRequest, RequestTelemetry
from rayfleet.control_plane.spec import FleetSpec, parse_spec
from rayfleet.policies import registry
from rayfleet.policies.base import (
    AdmissionVerdict,
    FleetSnapshot,
    LearningRouter,
    NoReplicaAvailable,
    RequestInfo,
    RequestOutcome,
    RoutingDecision,
)

logger = logging.getLogger("rayfleet.ingress")

VIEW_TTL_S = 0.25  # the routing view is refreshed from the controller at most this often
QUEUE_WAIT_S = 0.05
REPLACEMENT_POLL_S = 0.5


def overlay_local_load(snapshot: FleetSnapshot, ledgers: dict[str, TokenLedger]) -> FleetSnapshot:
    """The controller's view is up to one tick old; this ingress knows its own in-flight requests now."""
    tokens: dict[str, int] = {}
    requests: dict[str, int] = {}
    remaining: dict[str, int] = {}  # decode work still expected: predicted length (else max_tokens) - output
    for ledger in ledgers.values():
        if ledger.placement is not None:
            rid = ledger.placement.replica_id
            tokens[rid] = tokens.get(rid, 0) + len(ledger.call.prompt_token_ids) + ledger.output_tokens
            requests[rid] = requests.get(rid, 0) + 1
            expected = ledger.call.predicted_output_tokens or ledger.call.sampling_params.max_tokens or 0
            remaining[rid] = remaining.get(rid, 0) + max(expected - ledger.output_tokens, 0)
    return snapshot.with_local_load(tokens, requests, remaining)


async def within_wait(task: asyncio.Task, wait_s: float, late: Callable[[Any], None]):
    """`task`'s result if it is done within `wait_s`, else None; a result that comes later goes to `late`
    (the task keeps running: its work is not wasted)."""
    try:
        return await asyncio.wait_for(asyncio.shield(task), wait_s)
    except TimeoutError:
        def deliver(done: asyncio.Task) -> None:
            if not done.cancelled() and done.result() is not None:
                late(done.result())

        task.add_done_callback(deliver)
        return None


class ControllerView:
    """The controller's routing view (snapshot and READY replicas' handles), kept fresh without making requests
    wait for it.

    A view younger than `VIEW_TTL_S` is used as is. One younger than `stale_s` (the spec's `ingress.view_stale_s`,
    by default 1 s: one controller tick, and the snapshot's loads are that old anyway) is used at once while a
    fresh one is fetched in the background.
    Only an older one, or a caller that needs a fresh view (a replay placing around a lost replica), waits for
    the controller. Why: a request that waited for the round trip paid 4-8 ms before its replica call, and at
    2 req/s most requests arrive more than `VIEW_TTL_S` after the last one.

    While the controller is unreachable (Ray re-creating it: seconds on an idle machine, 65 s in the chaos soak
    on a loaded one) the last view keeps routing, up to `max_stale_s` old: only the controller changes which
    replicas serve, and a replica that died meanwhile is one the ledger replays around. Past that, a 503.
    """

    def __init__(self, controller: Any, max_stale_s: float, stale_s: float):
        self.controller = controller
        self.max_stale_s = max_stale_s
        self.stale_s = stale_s
        self._view: tuple[FleetSnapshot, dict[str, Any]] | None = None
        self._view_at = 0.0
        self._refresh: asyncio.Task | None = None

    async def get(self, fresh: bool = False) -> tuple[FleetSnapshot, dict[str, Any]]:
        age = time.monotonic() - self._view_at
        if fresh or self._view is None or age > max(self.stale_s, VIEW_TTL_S):
            await self._fetch()
        elif age > VIEW_TTL_S and (self._refresh is None or self._refresh.done()):
            # A fresh context: the fetch must not be a child of this request, which Serve cancels if its
            # client leaves (see replica_streams.ReplicaStream).
            self._refresh = asyncio.create_task(self._fetch_in_background(), context=contextvars.Context())
        return self._view

    async def _fetch(self) -> None:
        try:
            self._view = await self.controller.fleet_view.remote()
            self._view_at = time.monotonic()
        except ray.exceptions.RayActorError as error:
            if self._view is None or time.monotonic() - self._view_at > self.max_stale_s:
                raise OpenAIHTTPError(503, "The fleet controller is restarting; retry shortly.",
                                      "ServiceUnavailableError", retry_after_s=5) from None
            logger.warning("controller unreachable (%s); routing on a %.1f s old view", type(error).__name__,
                           time.monotonic() - self._view_at)

    async def _fetch_in_background(self) -> None:
        try:
            await self._fetch()
        except OpenAIHTTPError:  # the controller is gone for too long: the next request's own fetch says so
            pass
        except Exception as error:  # routing goes on with the view it has; a request's own fetch raises it
            logger.warning("refreshing the routing view failed: %s: %s", type(error).__name__, error)


class FleetGateway:
    """The protocol-neutral half of the ingress. Errors are `OpenAIHTTPError`s; the gRPC servicer maps
    their statuses to gRPC codes."""

    def __init__(self, spec: dict[str, Any]):
        self.spec: FleetSpec = parse_spec(spec)
        configure_actor_logging(self.spec.log_level)
        tracing.setup_tracing(self.spec.tracing, "ingress")
        self.telemetry = RequestTelemetry(self.spec)
        policies = self.spec.policies
        self.router = registry.create("router", policies.router.name, policies.router.params)
        self.admission = registry.create("admission", policies.admission.name, policies.admission.params)
        self.keys = KeyRing.from_spec(self.spec.ingress)
        self.controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        self.renderers = {pool.name: PoolRenderer(pool.name, pool.model, pool.engine_args)
                          for pool in self.spec.pools}
        self._renderers_started = asyncio.Lock()
        self._started = False
        # A learning router (Chimera) gets outcomes; one that needs embeddings gets the fleet's embedder.
        self.learning_router = self.router if isinstance(self.router, LearningRouter) else None
        self.embedder = None
        self._router_started = asyncio.Lock()
        self.labels_learned: dict[str, int] = {}  # pool -> revision of the verifier scores the router learned
        self._relearning: asyncio.Task | None = None
        # A request accepts the same wait for a restarting controller as for a replica's replacement.
        self.view = ControllerView(self.controller, self.spec.ingress.replay_wait_s, self.spec.ingress.view_stale_s)
        self.ledgers: dict[str, TokenLedger] = {}
        self.replica_streams = ReplicaStreams(local=self.spec.ingress.local_deltas)

    async def ensure_renderers(self) -> None:
        if self._started:
            return
        async with self._renderers_started:
            if not self._started:
                await asyncio.gather(*(r.start() for r in self.renderers.values()))
                self._started = True

    async def ensure_router(self) -> None:
        """Start the embedder and fit the router's offline table (once, on the first request that needs it)."""
        router = self.learning_router
        if router is None or not router.needs_embeddings or self.embedder is not None:
            return
        async with self._router_started:
            if self.embedder is None:
                embedder = get_or_create_embedder(NAMESPACE)
                prompts = router.table_prompts()
                if prompts:
                    router.fit_table(await embedder.embed.remote(prompts))
                logger.info("router %s: %d table rows embedded", self.spec.policies.router.name, len(prompts))
                self.embedder = embedder

    def start_embedding(self, text: str) -> asyncio.Task | None:
        """Submit the prompt's embedding for the router now, so it computes while the caller goes on (renders);
        the task gives None (the router falls back to priors) if the embedder fails."""
        if self.embedder is None or not text:
            return None
        return asyncio.create_task(self._embedding(self.embedder.embed.remote([text])))

    async def embedding_for(self, request_id: str, task: asyncio.Task) -> tuple[float, ...] | None:
        """The request's embedding if it arrives within the router's wait, else None (routed on priors); a late
        one still reaches the router when it arrives."""
        router = self.learning_router
        return await within_wait(task, router.embedding_wait_s,
                                 lambda vector: router.attach_embedding(request_id, vector))

    async def _embedding(self, pending) -> tuple[float, ...] | None:
        try:
            [vector] = await pending
        except ray.exceptions.RayActorError as error:
            # Ray restarts a crashed embedder (max_restarts); one gone for good (its owner, the ingress process
            # that created it, died) is replaced, here or by another ingress that noticed first.
            logger.warning("prompt embedder unavailable (%s); routing on priors, using the embedder Ray restarts "
                           "or a new one", type(error).__name__)
            self.embedder = get_or_create_embedder(NAMESPACE)
            return None
        except Exception:
            logger.exception("prompt embedding failed; routing on priors")
            return None
        return tuple(vector.tolist())

    def routing_decisions(self, limit: int = 20) -> dict:
        """The router's recent decisions with each candidate's predictions (also called over a Serve handle
        by `rayfleet status --routing`)."""
        decisions = self.learning_router.explain(limit) if self.learning_router is not None else []
        return {"router": self.spec.policies.router.name, "decisions": decisions}

    async def fleet_view(self, fresh: bool = False) -> tuple[FleetSnapshot, dict[str, Any]]:
        snapshot, handles = await self.view.get(fresh)
        self.relearn_promoted_pools(snapshot)
        return overlay_local_load(snapshot, self.ledgers), handles

    def relearn_promoted_pools(self, snapshot: FleetSnapshot) -> None:
        """Pools whose promoted weights came with verifier scores the router has not learned: relearn them in
        the background (the embedder exists once the router was started: only an embedding router relearns)."""
        if self.embedder is None or (self._relearning is not None and not self._relearning.done()):
            return
        due = [name for name, pool in snapshot.pools.items()
               if pool.quality_labels_revision != self.labels_learned.get(name, 0)]
        if due:
            self._relearning = asyncio.create_task(self._relearn(due))

    async def _relearn(self, pools: list[str]) -> None:
        for pool in pools:
            try:
                revision, rows = await self.controller.pool_quality_labels.remote(pool)
                if rows:  # none: a controller on a memory:// store lost them; the router keeps what it knew
                    self.learning_router.relearn(pool, rows,
                                                 await self.embedder.embed.remote([r.prompt for r in rows]))
                    logger.info("router %s relearned pool %s from %d verifier scores (revision %d)",
                                self.spec.policies.router.name, pool, len(rows), revision)
            except Exception as error:  # the next view retries; routing goes on with what the router knew
                logger.warning("relearning pool %s from its promoted weights' verifier scores failed: %s: %s",
                               pool, type(error).__name__, error)
                continue
            self.labels_learned[pool] = revision

    def authenticate(self, authorization: str, how: str) -> Principal:
        """The caller of an `Authorization: Bearer <key>` value; `how` tells the client where to send the key."""
        return self.keys.authenticate(authorization, how)

    @staticmethod
    def unserved_pools(snapshot: FleetSnapshot) -> list[str]:
        """Pools meant to run (desired > 0) with no ready replica: the fleet is degraded."""
        return [name for name, pool in snapshot.pools.items() if pool.desired_replicas and not pool.routable_replicas]

    @staticmethod
    def info_from_call(call: GenerateCall, pool: str) -> RequestInfo:
        return RequestInfo(request_id=call.request_id, pool=pool, prompt_tokens=len(call.prompt_token_ids),
                           max_tokens=call.sampling_params.max_tokens or 0, priority=call.priority,
                           workflow_id=call.workflow_id, prompt_token_ids=tuple(call.prompt_token_ids))

    async def admit_and_place(self, info: RequestInfo, trace=None) -> tuple[Placement, RoutingDecision]:
        """Admission (queue, 429 or 503) then routing; returns the placement and the router's decision."""
        snapshot, handles = await self._admit(info, trace)
        try:
            return await self.place(info, frozenset(), snapshot, handles, trace)
        except NoReplicaAvailable as error:
            raise OpenAIHTTPError(503, f"{error}; retry later.", "ServiceUnavailableError", retry_after_s=5) from None

    async def _admit(self, info: RequestInfo, trace) -> tuple[FleetSnapshot, dict[str, Any]]:
        """Wait, queued, until the admission policy admits; 429 or 503 when it rejects or the wait runs out."""
        span = tracing.start_span("admission", trace, attributes={"rayfleet.policy": self.spec.policies.admission.name})
        model, polls = info.pool or "auto", 0
        deadline = time.monotonic() + self.spec.ingress.request_timeout_s
        replacement_deadline = time.monotonic() + self.spec.ingress.replay_wait_s
        try:
            while True:
                snapshot, handles = await self.fleet_view()
                decision = self.admission.admit(info, snapshot)
                if decision.verdict is AdmissionVerdict.ADMIT:
                    tracing.end_span(span, **{"rayfleet.verdict": "admit", "rayfleet.queued_polls": polls})
                    return snapshot, handles
                if (decision.verdict is AdmissionVerdict.REJECT and self._replacement_coming(info, snapshot)
                        and time.monotonic() < replacement_deadline):
                    # The pool's replicas are all being replaced (a crash, a rollout of a one-replica pool): wait
                    # for one, as a request that lost its replica does, rather than refuse.
                    await asyncio.sleep(REPLACEMENT_POLL_S)
                    continue
                if decision.verdict is AdmissionVerdict.REJECT:
                    status = 503 if "no ready replica" in decision.reason else 429
                    raise OpenAIHTTPError(status, f"Request rejected: {decision.reason}.",
                                          err_type="ServiceUnavailableError" if status == 503 else "RateLimitError",
                                          retry_after_s=decision.retry_after_s)
                if time.monotonic() > deadline:
                    raise OpenAIHTTPError(429, "Request queued too long; retry later.", "RateLimitError",
                                          retry_after_s=5)
                if polls == 0:
                    self.telemetry.queued(model, +1)
                polls += 1
                await asyncio.sleep(QUEUE_WAIT_S)
        except BaseException as error:  # rejected, or the client left while queued
            tracing.end_span(span, error, **{"rayfleet.verdict": "reject"})
            raise
        finally:
            if polls:
                self.telemetry.queued(model, -1)

    @staticmethod
    def _replacement_coming(info: RequestInfo, snapshot: FleetSnapshot) -> bool:
        """The request's pool should be serving (desired > 0) and has no ready replica now."""
        pool = snapshot.pools.get(info.pool) if info.pool else None
        return pool is not None and pool.desired_replicas > 0 and not pool.routable_replicas

    async def place_when_ready(self, info: RequestInfo, exclude: frozenset[str], trace=None) -> Placement:
        """A replica for a request that lost its own: waits, bounded, for one to be ready (e.g. the lost one's
        replacement, when the pool had no other)."""
        deadline = time.monotonic() + self.spec.ingress.replay_wait_s
        while True:
            try:
                placement, _ = await self.place(info, exclude, trace=trace)
                return placement
            except NoReplicaAvailable:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(REPLACEMENT_POLL_S)

    async def place(self, info: RequestInfo, exclude: frozenset[str], snapshot=None, handles=None,
                    trace=None) -> tuple[Placement, RoutingDecision]:
        if snapshot is None:
            snapshot, handles = await self.fleet_view(fresh=True)
        span = tracing.start_span("routing", trace, attributes={"rayfleet.router": self.spec.policies.router.name,
                                                                "rayfleet.excluded": len(exclude)})
        try:
            decision = self.router.route(dataclasses.replace(info, exclude_replicas=exclude), snapshot)
            handle = handles.get(decision.replica_id)
            if handle is None:
                raise NoReplicaAvailable(f"router chose {decision.replica_id}, which is no longer ready")
        except NoReplicaAvailable as error:
            tracing.end_span(span, error)
            raise
        tracing.end_span(span, **{"rayfleet.pool": decision.pool, "rayfleet.replica": decision.replica_id,
                                  "rayfleet.reason": decision.reason})
        self.telemetry.decided(info, decision)
        handoff = None
        decode = snapshot.replica(decision.handoff_replica_id) if decision.handoff_replica_id else None
        if decode is not None and decode.replica_id in handles:
            handoff = Destination(decode.replica_id, handles[decode.replica_id], decode.node_id)
        return Placement(decision.replica_id, handle, handoff), decision

    def open_ledger(self, call: GenerateCall, placement: Placement | None, owner: Principal, pool: str,
                    client: ClientRequest) -> TokenLedger:
        if call.request_id in self.ledgers:
            raise OpenAIHTTPError(409, f"request id '{call.request_id}' is already in flight; choose another",
                                  "invalid_request_error", param="request_id")
        ledger = TokenLedger(call=call, placement=placement, owner=owner.name,
                             grammar_continues=self.spec.pool(pool).live_migration,
                             started_at=client.started_at, trace=client.trace)
        self.ledgers[call.request_id] = ledger
        return ledger

    def close_ledgers(self, ledgers: list[TokenLedger]) -> None:
        for ledger in ledgers:
            self.ledgers.pop(ledger.request_id, None)

    async def follow(self, ledger: TokenLedger, pool: str) -> AsyncIterator[GenerateTokensStreamChoice]:
        """The request's token choices across migrations and replays (see `ledger.follow`)."""
        info = self.info_from_call(ledger.call, pool)

        async def place(call: GenerateCall, exclude: frozenset[str]) -> Placement:
            return await self.place_when_ready(info, exclude, ledger.trace)

        ingress = self.spec.ingress
        try:
            async for choice in follow(ledger, place, self.replica_streams, ingress.max_replays,
                                       ingress.chunk_timeout_s):
                yield choice
        finally:
            self.ledgers.pop(ledger.request_id, None)
            self.telemetry.finished(ledger, pool)
            if self.learning_router is not None and ledger.done and ledger.hops:
                self.learning_router.observe(RequestOutcome(
                    request_id=ledger.request_id, pool=pool, replica_id=ledger.hops[-1],
                    output_tokens=ledger.output_tokens, latency_s=time.monotonic() - ledger.started_at))
            if ledger.migrations or ledger.replays:
                logger.info("request %s finished after %d migrations and %d replays over %s",
                            ledger.request_id, ledger.migrations, ledger.replays, " -> ".join(ledger.hops))
