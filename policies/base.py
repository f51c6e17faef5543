"""What policies see and what they decide: the fleet snapshot, request descriptions, and the four protocols.

Policies are pure decision code (DESIGN.md): they get immutable data and return a decision; the ingress or
the controller carries it out. The types here are shaped for the policies to come as well as the built-ins:
- Llumnix migration needs per-replica KV capacity and usage and per-request progress and priority
  (`ReplicaSnapshot.kv_*`, `RequestProgress`).
- Chimera routing needs the prompt (text and tokens), the workflow id and stage, and per-replica predicted
  load (`RequestInfo`, `ReplicaSnapshot.predicted_remaining_tokens`), plus pool tags (quality, cost).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class ReplicaState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"  # takes no new requests; in-flight ones finish or migrate out
    DEAD = "dead"
    STOPPED = "stopped"


@dataclass(frozen=True)
class RequestProgress:
    """One unfinished request on a replica, as seen from the fleet."""

    request_id: str
    prompt_tokens: int
    output_tokens: int
    max_tokens: int
    priority: int = 0
    arrival_time: float = 0.0
    running: bool = True  # False: still waiting in the engine's queue
    workflow_id: str | None = None
    predicted_output_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    @property
    def remaining_tokens(self) -> int:
        expected = self.predicted_output_tokens or self.max_tokens
        return max(expected - self.output_tokens, 0)


@dataclass(frozen=True)
class MigrationRecord:
    """One finished or failed live migration (observability, and history for policies)."""

    migration_id: str
    request_id: str
    src: str
    dst: str
    mode: str
    outcome: str  # "migrated", "refused", "aborted", "finished_on_source", "failed"
    reason: str = ""
    stages: int = 0
    blocks_moved: int = 0
    last_stage_blocks: int = 0  # of blocks_moved, those copied while the request was stopped
    bytes_moved: int = 0
    downtime_s: float = 0.0
    total_s: float = 0.0
    recomputed_tokens: int = 0  # tokens the destination computed before its first output (1 = no recompute)
    started_at: float = 0.0


@dataclass(frozen=True)
class ReplicaSnapshot:
    replica_id: str
    pool: str
    model: str
    state: ReplicaState
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of the engine's KV blocks in use
    kv_blocks_total: int = 0
    kv_block_size: int = 0
    tokens_in_flight: int = 0  # prompt + generated tokens of unfinished requests (their KV footprint)
    predicted_remaining_tokens: int = 0  # decode work still expected (predicted length, else max_tokens)
    decode_tokens_per_s: float = 0.0  # recent decode throughput
    requests_started: int = 0  # requests this replica has taken since it started (arrival-rate signal)
    requests: tuple[RequestProgress, ...] = ()
    node_id: str = ""
    accelerator: str = ""
    restarts: int = 0
    last_error: str = ""
    updated_at: float = 0.0

    @property
    def routable(self) -> bool:
        return self.state is ReplicaState.READY

    @property
    def kv_blocks_free(self) -> int:
        return int(round(self.kv_blocks_total * (1.0 - self.kv_cache_usage)))

    @property
    def kv_tokens_total(self) -> int:
        return self.kv_blocks_total * self.kv_block_size


class PoolRole(str, enum.Enum):
    """What a pool's replicas do with a request (prefill/decode disaggregation, DistServe-style)."""

    BOTH = "both"  # prefill and decode (colocated)
    PREFILL = "prefill"  # compute the first token, then hand the request with its KV to a decode pool
    DECODE = "decode"  # decode requests a prefill pool handed over (and serve requests sent directly)


@dataclass(frozen=True)
class PoolSnapshot:
    name: str
    model: str
    min_replicas: int
    max_replicas: int
    desired_replicas: int
    tags: dict[str, str] = field(default_factory=dict)
    replicas: tuple[ReplicaSnapshot, ...] = ()
    max_model_len: int = 0
    role: PoolRole = PoolRole.BOTH
    prefill_pool: str | None = None  # the pool that prefills this (decode) pool's requests
    # Counts the promotions that brought verifier scores for this pool (0: none; a counter of the controller's,
    # not a weight version: each RL run numbers its versions from 0). A learning router relearns the pool from
    # the scores when it changes.
    quality_labels_revision: int = 0

    @functools.cached_property
    def routable_replicas(self) -> tuple[ReplicaSnapshot, ...]:
        # Cached: routers ask once per request, and a 1,000-replica pool is scanned once per snapshot.
        return tuple(replica for replica in self.replicas if replica.routable)


@dataclass(frozen=True)
class FleetSnapshot:
    pools: dict[str, PoolSnapshot]
    taken_at: float = field(default_factory=time.time)
    migrations: tuple[MigrationRecord, ...] = ()

    def replica(self, replica_id: str) -> ReplicaSnapshot | None:
        for pool in self.pools.values():
            for replica in pool.replicas:
                if replica.replica_id == replica_id:
                    return replica
        return None

    def routable_replicas(self, pool: str | None = None) -> tuple[ReplicaSnapshot, ...]:
        if pool is not None:
            return self.pools[pool].routable_replicas if pool in self.pools else ()
        return tuple(replica for p in self.pools.values() for replica in p.routable_replicas)

    def with_local_load(self, tokens: dict[str, int], requests: dict[str, int],
                        remaining: dict[str, int] | None = None) -> FleetSnapshot:
        """This view with an ingress' own in-flight requests laid over it (per replica id: their tokens, count
        and the decode tokens still expected of them). The controller's view is up to one tick old; an ingress
        knows what it placed just now, so each replica shows at least that load. The live ingress and the
        simulator both route on this."""
        remaining = remaining or {}
        pools = {}
        for name, pool in self.pools.items():
            replicas = tuple(
                r if r.replica_id not in requests else dataclasses.replace(
                    r,
                    tokens_in_flight=max(r.tokens_in_flight, tokens.get(r.replica_id, 0)),
                    predicted_remaining_tokens=max(r.predicted_remaining_tokens, remaining.get(r.replica_id, 0)),
                    num_running=max(r.num_running + r.num_waiting, requests[r.replica_id]) - r.num_waiting,
                )
                for r in pool.replicas
            )
            pools[name] = dataclasses.replace(pool, replicas=replicas)
        return dataclasses.replace(self, pools=pools)


@dataclass(frozen=True)
class RequestInfo:
    """A request as a router or admission policy sees it, before it runs anywhere."""

    request_id: str
    pool: str | None  # the pool the client named; None when it asked for model="auto"
    prompt_tokens: int
    max_tokens: int
    prompt_text: str = ""
    prompt_token_ids: tuple[int, ...] = ()
    priority: int = 0
    workflow_id: str | None = None
    workflow_stage: str | None = None
    arrival_time: float = field(default_factory=time.time)
    exclude_replicas: frozenset[str] = frozenset()  # e.g. the replica that just failed this request
    embedding: tuple[float, ...] | None = None  # prompt embedding, for routers with `needs_embeddings`
    latency_weight: float | None = None  # lambda: quality points one second of latency is worth (None: spec's)
    latency_slo_s: float | None = None  # best quality within this predicted latency, instead of lambda


@dataclass(frozen=True)
class RoutingDecision:
    pool: str
    replica_id: str
    reason: str = ""
    predicted_output_tokens: int | None = None  # the router's length prediction (the replica's backlog uses it)
    # Prefill/decode disaggregation: the replica that takes the request over, with its KV, after the first
    # token (a migration at the first token). None: the chosen replica serves the request to its end.
    handoff_replica_id: str | None = None


@dataclass(frozen=True)
class RequestOutcome:
    """A finished request, as the ingress tells a learning router."""

    request_id: str
    pool: str
    replica_id: str
    output_tokens: int
    latency_s: float


class NoReplicaAvailable(RuntimeError):
    """No routable replica fits the request (all draining, dead or excluded)."""


class AdmissionVerdict(str, enum.Enum):
    ADMIT = "admit"
    QUEUE = "queue"  # wait and ask again (backpressure inside the ingress)
    REJECT = "reject"  # 429 to the client, with Retry-After


@dataclass(frozen=True)
class AdmissionDecision:
    verdict: AdmissionVerdict
    retry_after_s: float = 1.0
    reason: str = ""


@dataclass(frozen=True)
class MigrationDecision:
    request_id: str
    src: str
    dst: str
    mode: str = "precopy"  # or "stop_and_copy"
    reason: str = ""


@runtime_checkable
class Router(Protocol):
    def route(self, request: RequestInfo, snapshot: FleetSnapshot) -> RoutingDecision:
        """Pick a pool and a routable replica; raise NoReplicaAvailable when none fits."""


@dataclass(frozen=True)
class LabelledOutcome:
    """One row of a RouterBench-style table: a query answered by one pool, scored by its verifier."""

    prompt: str
    pool: str
    score: float
    output_tokens: int
    latency_s: float
    query_id: str = ""


@runtime_checkable
class LearningRouter(Router, Protocol):
    """A router that learns from outcomes (Chimera). With `needs_embeddings` the ingress embeds each `auto`
    request's prompt into `RequestInfo.embedding`, and the offline table's prompts once at start."""

    needs_embeddings: bool
    embedding_wait_s: float  # how long a request waits for its embedding before it is routed without one

    def table_prompts(self) -> list[str]: ...

    def fit_table(self, embeddings) -> None: ...

    def observe(self, outcome: RequestOutcome) -> None: ...

    def feedback(self, request_id: str, score: float) -> bool:
        """Learn a verdict on a routed request; False when the request is unknown to the router."""

    def relearn(self, pool: str, rows: list[LabelledOutcome], embeddings) -> None:
        """The pool's weights changed (a promoted RL version): its estimates restart from `rows`, labelled
        outcomes of the new weights, with their prompts' embeddings (same order)."""

    def attach_embedding(self, request_id: str, embedding) -> None:
        """An embedding that came after the wait: a request routed without it learns from it (outcome and
        feedback); one not routed yet (still in admission) is routed with it."""

    def explain(self, limit: int = 20) -> list[dict]: ...


@runtime_checkable
class AdmissionPolicy(Protocol):
    def admit(self, request: RequestInfo, snapshot: FleetSnapshot) -> AdmissionDecision: ...


@runtime_checkable
class Scaler(Protocol):
    def desired_replicas(self, snapshot: FleetSnapshot) -> dict[str, int]:
        """Desired replica count per pool; the controller clamps it to the pool's bounds."""


@runtime_checkable
class RemembersHistory(Protocol):
    """Optional for a scaler or migration policy that learns from a long history (the seasonal forecast's past
    days): the controller keeps `state_dict()` in its state store and hands it to `load_state_dict` after a
    restart, so the history survives the controller. JSON-serializable, and small enough to write every
    half minute."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class MigrationPolicy(Protocol):
    def plan(self, snapshot: FleetSnapshot, draining: frozenset[str]) -> list[MigrationDecision]:
        """Migrations to start now; `draining` names replicas whose requests must move out."""
