"""What every front end of the ingress shares: API keys, the fleet view, admission, placement and ledgers.

The HTTP routes (`openai_api.py`, `admin_api.py`) and the gRPC servicer (`grpc_servicer.py`) are mixins over
one `FleetGateway`; `ingress.py` assembles them into the Serve deployment. The gateway knows the controller
only by name (`controller_api`) and sees the fleet as a `FleetSnapshot`: the controller's view, refreshed at
most every `VIEW_TTL_S`, with this ingress' own in-flight requests laid over it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, AsyncIterator

import ray
from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateTokensStreamChoice

from rayfleet.actors.replica.protocol import Destination, GenerateCall
from rayfleet.control_plane.controller_api import CONTROLLER_NAME, NAMESPACE
from rayfleet.control_plane.serving.errors import OpenAIHTTPError
from rayfleet.control_plane.serving.ledger import Placement, TokenLedger, follow
from rayfleet.control_plane.serving.rendering import PoolRenderer
from rayfleet.control_plane.spec import FleetSpec, parse_spec
from rayfleet.policies import registry
from rayfleet.policies.base import AdmissionVerdict, FleetSnapshot, NoReplicaAvailable, RequestInfo

logger = logging.getLogger("rayfleet.ingress")

VIEW_TTL_S = 0.25  # the routing view is refreshed from the controller at most this often
QUEUE_WAIT_S = 0.05


def overlay_local_load(snapshot: FleetSnapshot, ledgers: dict[str, TokenLedger]) -> FleetSnapshot:
    """The controller's view is up to one tick old; this ingress knows its own in-flight requests now."""
    tokens: dict[str, int] = {}
    requests: dict[str, int] = {}
    for ledger in ledgers.values():
        if ledger.placement is not None:
            rid = ledger.placement.replica_id
            tokens[rid] = tokens.get(rid, 0) + len(ledger.call.prompt_token_ids) + ledger.output_tokens
            requests[rid] = requests.get(rid, 0) + 1
    return snapshot.with_local_load(tokens, requests)


class FleetGateway:
    """The protocol-neutral half of the ingress. Errors are `OpenAIHTTPError`s; the gRPC servicer maps
    their statuses to gRPC codes."""

    def __init__(self, spec: dict[str, Any]):
        self.spec: FleetSpec = parse_spec(spec)
        logging.basicConfig(level=self.spec.log_level)
        policies = self.spec.policies
        self.router = registry.create("router", policies.router.name, policies.router.params)
        self.admission = registry.create("admission", policies.admission.name, policies.admission.params)
        self.api_keys = set(self.spec.ingress.api_keys)
        if self.spec.ingress.api_keys_env:
            self.api_keys |= {k.strip() for k in os.environ.get(self.spec.ingress.api_keys_env, "").split(",")
                              if k.strip()}
        self.controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        self.renderers = {pool.name: PoolRenderer(pool.name, pool.model, pool.engine_args)
                          for pool in self.spec.pools}
        self._renderers_started = asyncio.Lock()
        self._started = False
        self._view: tuple[FleetSnapshot, dict[str, Any]] | None = None
        self._view_at = 0.0
        self.ledgers: dict[str, TokenLedger] = {}

    async def ensure_renderers(self) -> None:
        if self._started:
            return
        async with self._renderers_started:
            if not self._started:
                await asyncio.gather(*(r.start() for r in self.renderers.values()))
                self._started = True

    async def fleet_view(self, fresh: bool = False) -> tuple[FleetSnapshot, dict[str, Any]]:
        if fresh or self._view is None or time.monotonic() - self._view_at > VIEW_TTL_S:
            self._view = await self.controller.fleet_view.remote()
            self._view_at = time.monotonic()
        snapshot, handles = self._view
        return overlay_local_load(snapshot, self.ledgers), handles

    def authenticate(self, authorization: str, how: str) -> None:
        """Check an `Authorization: Bearer <key>` value; `how` tells the client where to send the key."""
        if not self.api_keys:
            return
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.api_keys:
            raise OpenAIHTTPError(401, f"Incorrect API key provided. Send {how}.",
                                  err_type="invalid_request_error", param="authorization")

    @staticmethod
    def unserved_pools(snapshot: FleetSnapshot) -> list[str]:
        """Pools meant to run (desired > 0) with no ready replica: the fleet is degraded."""
        return [name for name, pool in snapshot.pools.items() if pool.desired_replicas and not pool.routable_replicas]

    @staticmethod
    def info_from_call(call: GenerateCall, pool: str) -> RequestInfo:
        return RequestInfo(request_id=call.request_id, pool=pool, prompt_tokens=len(call.prompt_token_ids),
                           max_tokens=call.sampling_params.max_tokens or 0, priority=call.priority,
                           workflow_id=call.workflow_id, prompt_token_ids=tuple(call.prompt_token_ids))

    async def admit_and_place(self, info: RequestInfo) -> tuple[Placement, str]:
        """Admission (queue, 429 or 503) then routing; returns the placement and the chosen pool."""
        deadline = time.monotonic() + self.spec.ingress.request_timeout_s
        while True:
            snapshot, handles = await self.fleet_view()
            decision = self.admission.admit(info, snapshot)
            if decision.verdict is AdmissionVerdict.REJECT:
                status = 503 if "no ready replica" in decision.reason else 429
                raise OpenAIHTTPError(status, f"Request rejected: {decision.reason}.",
                                      err_type="ServiceUnavailableError" if status == 503 else "RateLimitError",
                                      retry_after_s=decision.retry_after_s)
            if decision.verdict is AdmissionVerdict.ADMIT:
                try:
                    return await self.place(info, frozenset(), snapshot, handles)
                except NoReplicaAvailable as error:
                    raise OpenAIHTTPError(503, f"{error}; retry later.", "ServiceUnavailableError",
                                          retry_after_s=5) from None
            if time.monotonic() > deadline:
                raise OpenAIHTTPError(429, "Request queued too long; retry later.", "RateLimitError",
                                      retry_after_s=5)
            await asyncio.sleep(QUEUE_WAIT_S)

    async def place(self, info: RequestInfo, exclude: frozenset[str], snapshot=None, handles=None):
        if snapshot is None:
            snapshot, handles = await self.fleet_view(fresh=True)
        decision = self.router.route(dataclasses.replace(info, exclude_replicas=exclude), snapshot)
        handle = handles.get(decision.replica_id)
        if handle is None:
            raise NoReplicaAvailable(f"router chose {decision.replica_id}, which is no longer ready")
        handoff = None
        decode = snapshot.replica(decision.handoff_replica_id) if decision.handoff_replica_id else None
        if decode is not None and decode.replica_id in handles:
            handoff = Destination(decode.replica_id, handles[decode.replica_id], decode.node_id)
        return Placement(decision.replica_id, handle, handoff), decision.pool

    def open_ledger(self, call: GenerateCall, placement: Placement | None) -> TokenLedger:
        ledger = TokenLedger(call=call, placement=placement)
        self.ledgers[call.request_id] = ledger
        return ledger

    def close_ledgers(self, ledgers: list[TokenLedger]) -> None:
        for ledger in ledgers:
            self.ledgers.pop(ledger.request_id, None)

    async def follow(self, ledger: TokenLedger, pool: str) -> AsyncIterator[GenerateTokensStreamChoice]:
        """The request's token choices across migrations and replays (see `ledger.follow`)."""
        info = self.info_from_call(ledger.call, pool)

        async def place(call: GenerateCall, exclude: frozenset[str]) -> Placement:
            placement, _ = await self.place(info, exclude)
            return placement

        try:
            async for choice in follow(ledger, place):
                yield choice
        finally:
            self.ledgers.pop(ledger.request_id, None)
            if ledger.migrations or ledger.replays:
                logger.info("request %s finished after %d migrations and %d replays over %s",
                            ledger.request_id, ledger.migrations, ledger.replays, " -> ".join(ledger.hops))
