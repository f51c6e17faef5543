"""What the ingress records about each client request: its trace, its metrics, its routing decision.

Every front end (HTTP and gRPC) opens a `ClientRequest` when a request arrives: the root span of its trace
(continuing the client's own `traceparent`) and the start of its latency clock. Admission, routing and each
replica hop become child spans (`gateway.py`, `ledger.py`); when the request ends it is counted by pool and
status, and its ledger's token times give the client-side latencies. Routing decisions are counted and the
latest kept, with whatever the router explains, for the ops dashboard.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from rayfleet.actors.observability import tracing
from rayfleet.control_plane.serving.ledger import TokenLedger
from rayfleet.control_plane.spec import FleetSpec
from rayfleet.control_plane.telemetry import IngressMetrics
from rayfleet.policies.base import RequestInfo, RoutingDecision

ROUTING_LOG_SIZE = 200  # recent routing decisions kept for the ops dashboard


@dataclass
class ClientRequest:
    """One client request: its root span, the pool to count it under, and whether it was counted."""

    span: Any
    pool: str  # metric label: "unknown" until the model is known, then the pool named (or `auto`), then chosen
    started_at: float = field(default_factory=time.monotonic)
    finished: bool = False

    @property
    def trace(self):
        """The tracing context whose children are this request's admission, routing and hops."""
        return tracing.context_of(self.span)


class StageClock:
    """Times one request's consecutive ingress stages into `rayfleet_ingress_stage_seconds` (the stages are in
    its description): each lap is the time since the previous one, or since the clock started."""

    def __init__(self, metrics: IngressMetrics) -> None:
        self.metrics = metrics
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.metrics.stages.observe(now - self.last, tags={"stage": stage})
        self.last = now


class RequestTelemetry:
    def __init__(self, spec: FleetSpec):
        self.router = spec.policies.router.name
        self.metrics = IngressMetrics()
        self.routing_log: collections.deque[dict[str, Any]] = collections.deque(maxlen=ROUTING_LOG_SIZE)
        self._queued: dict[str, int] = {}
        for model in [*(pool.name for pool in spec.pools), "auto"]:  # each series exists from the start
            self.queued(model, 0)

    def begin(self, name: str, headers: Mapping[str, str]) -> ClientRequest:
        span = tracing.start_span(name, tracing.extract(headers), tracing.SpanKind.SERVER)
        return ClientRequest(span=span, pool="unknown")

    def end(self, client: ClientRequest, status: int, error: BaseException | None = None) -> None:
        """Count the request by pool and status and end its root span, once."""
        if client.finished:
            return
        client.finished = True
        self.metrics.requests.inc(tags={"pool": client.pool, "status": str(status)})
        tracing.end_span(client.span, error, **{"rayfleet.pool": client.pool, "http.status_code": status})

    def stage_clock(self) -> "StageClock":
        """A clock for one request's ingress stages, started now."""
        return StageClock(self.metrics)

    def queued(self, model: str, change: int) -> None:
        """A request of `model` starts (+1) or stops (-1) waiting for admission."""
        self._queued[model] = self._queued.get(model, 0) + change
        self.metrics.queue_depth.set(self._queued[model], tags={"model": model})

    def decided(self, info: RequestInfo, decision: RoutingDecision) -> None:
        model = info.pool or "auto"
        self.metrics.routing_decisions.inc(tags={"model": model, "pool": decision.pool, "router": self.router})
        self.routing_log.append({"at": time.time(), "request_id": info.request_id, "model": model,
                                 "router": self.router, **dataclasses.asdict(decision)})

    def finished(self, ledger: TokenLedger, pool: str) -> None:
        """Latencies as the client saw them: arrival to first token, between tokens, arrival to last token."""
        tags = {"pool": pool}
        if ledger.replays:
            self.metrics.replays.inc(ledger.replays, tags=tags)
        if ledger.first_token_at is None:
            return
        self.metrics.output_tokens.inc(ledger.output_tokens, tags=tags)
        self.metrics.ttft.observe(ledger.first_token_at - ledger.started_at, tags=tags)
        self.metrics.duration.observe(ledger.last_token_at - ledger.started_at, tags=tags)
        if ledger.output_tokens > 1:
            self.metrics.tpot.observe((ledger.last_token_at - ledger.first_token_at) / (ledger.output_tokens - 1),
                                      tags=tags)
