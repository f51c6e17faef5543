"""Built-in routers: random, round robin, least load by tokens in flight, one fixed pool, power of two choices,
and prefill/decode placement.

A router sees the request and a fleet snapshot and names a pool and a replica. `model=auto` (no pool named)
lets it choose the pool too; the built-ins then take every pool as a candidate, which Chimera-style routers
refine with predicted quality and length.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

from rayfleet.policies.base import (
    FleetSnapshot,
    NoReplicaAvailable,
    PoolRole,
    ReplicaSnapshot,
    RequestInfo,
    RoutingDecision,
)


def candidates(request: RequestInfo, snapshot: FleetSnapshot) -> list[ReplicaSnapshot]:
    """Routable replicas of the requested pool (all pools for model=auto), minus excluded ones."""
    found = [
        replica
        for replica in snapshot.routable_replicas(request.pool)
        if replica.replica_id not in request.exclude_replicas
    ]
    if not found:
        where = f"pool '{request.pool}'" if request.pool else "the fleet"
        raise NoReplicaAvailable(f"no ready replica in {where}")
    return found


class RandomRouter:
    """A uniformly random candidate (seeded); the baseline that knows nothing."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def route(self, request: RequestInfo, snapshot: FleetSnapshot) -> RoutingDecision:
        chosen = self._rng.choice(sorted(candidates(request, snapshot), key=lambda r: r.replica_id))
        return RoutingDecision(pool=chosen.pool, replica_id=chosen.replica_id, reason="random")


class RoundRobinRouter:
    """Cycles over the candidates; a baseline that ignores load."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def route(self, request: RequestInfo, snapshot: FleetSnapshot) -> RoutingDecision:
        replicas = sorted(candidates(request, snapshot), key=lambda r: r.replica_id)
        chosen = replicas[next(self._counter) % len(replicas)]
        return RoutingDecision(pool=chosen.pool, replica_id=chosen.replica_id, reason="round_robin")


class LeastLoadRouter:
    """Fewest tokens in flight (the KV footprint of unfinished requests), then fewest waiting requests.

    `waiting_weight` converts a queued request into token-equivalents so that a replica with a queue is
    not preferred just because its queued prompts have not been counted by the engine yet.
    """

    def __init__(self, waiting_weight: int = 256) -> None:
        self.waiting_weight = waiting_weight

    def load(self, replica: ReplicaSnapshot) -> float:
        return replica.tokens_in_flight + self.waiting_weight * replica.num_waiting

    def route(self, request: RequestInfo, snapshot: FleetSnapshot) -> RoutingDecision:
        chosen = min(candidates(request, snapshot), key=lambda r: (self.load(r), r.replica_id))
        return RoutingDecision(pool=chosen.pool, replica_id=chosen.replica_id,
                               reason=f"least_load ({self.load(chosen):.0f} tokens)")


class FixedPoolRouter:
    """`model=auto` always goes to one pool (e.g. the most accurate model: `best_model_only`), least load inside."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self._least_load = LeastLoadRouter()

    def route(self, request: RequestInfo, snapshot: FleetSnapshot) -> RoutingDecision:
        pinned = request if request.pool is not None else dataclasses.replace(request, pool=self.pool)
        decision = self._least_load.route(pinned, snapshot)
        return dataclasses.replace(decision, reason=f"fixed pool {decision.pool}")
class PowerOfTwoRouter:
    """Two candidates at random, the one with fewer requests (running + queued): Ray Serve's default router
    (`pow_2_router.py`), here over the fleet snapshot. O(1) per request at any fleet size."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def route(self, request: RequestInfo, snapshot: FleetSnapshot) -> RoutingDecision:
        replicas = candidates(request, snapshot)
        pair = self._rng.sample(replicas, 2) if len(replicas) > 1 else replicas
        chosen = min(pair, key=lambda r: (r.num_running + r.num_waiting, r.tokens_in_flight))
        return RoutingDecision(pool=chosen.pool, replica_id=chosen.replica_id, reason="power_of_two")


class PrefillDecodeRouter:
    """Prefill/decode disaggregation as placement (DistServe, OSDI'24, on rayfleet's migration).

    A request for a pool that names a `prefill_pool` goes to that pool's replica with the fewest tokens in
    flight (prefill is compute-bound: queued prompt tokens are its load), and the router also names the
    decode replica that takes it over, with its KV, after the first token: the decode pool's replica with
    the most free KV blocks after its requests' remaining growth (decode is memory-bound). Requests for other
    pools are routed by least load.
    """

    def __init__(self, waiting_weight: int = 256) -> None:
        self._least_load = LeastLoadRouter(waiting_weight)

    @staticmethod
    def decode_headroom(replica: ReplicaSnapshot) -> float:
        tokens = replica.kv_tokens_total or 1
        return 1.0 - (replica.tokens_in_flight + replica.predicted_remaining_tokens) / tokens

    def route(self, request: RequestInfo, snapshot: FleetSnapshot) -> RoutingDecision:
        pool = snapshot.pools.get(request.pool) if request.pool else None
        if pool is None or pool.prefill_pool is None or pool.role is not PoolRole.DECODE:
            return self._least_load.route(request, snapshot)
        prefill = self._least_load.route(dataclasses.replace(request, pool=pool.prefill_pool), snapshot)
        decode = max(candidates(request, snapshot), key=lambda r: (self.decode_headroom(r), r.replica_id))
        # `pool` stays the one the client named: its renderer and its ledger; only the first replica differs.
        return RoutingDecision(pool=pool.name, replica_id=prefill.replica_id, handoff_replica_id=decode.replica_id,
                               reason=f"prefill on {prefill.replica_id}, decode on {decode.replica_id}")
