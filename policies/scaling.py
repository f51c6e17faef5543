"""Built-in scalers: keep the spec's count, or follow tokens in flight per replica."""

from __future__ import annotations

import math

from rayfleet.policies.base import FleetSnapshot


class StaticScaler:
    """Holds each pool at its desired count (changed only through the API or CLI)."""

    def desired_replicas(self, snapshot: FleetSnapshot) -> dict[str, int]:
        return {name: pool.desired_replicas for name, pool in snapshot.pools.items()}


class TokensInFlightScaler:
    """Replicas = ceil(tokens in flight / target per replica), moved one step per tick.

    One step per tick with a scale-down delay avoids flapping on bursty traffic (Ray Serve's autoscaler and
    Llumnix both damp the same way).
    """

    def __init__(self, target_tokens_per_replica: int = 4096, downscale_ticks: int = 30) -> None:
        self.target = target_tokens_per_replica
        self.downscale_ticks = downscale_ticks
        self._below: dict[str, int] = {}

    def desired_replicas(self, snapshot: FleetSnapshot) -> dict[str, int]:
        desired = {}
        for name, pool in snapshot.pools.items():
            live = [r for r in pool.replicas if r.routable]
            tokens = sum(r.tokens_in_flight for r in live)
            want = max(math.ceil(tokens / self.target), pool.min_replicas)
            current = pool.desired_replicas
            if want > current:
                self._below[name] = 0
                desired[name] = current + 1
            elif want < current:
                self._below[name] = self._below.get(name, 0) + 1
                desired[name] = current - 1 if self._below[name] >= self.downscale_ticks else current
            else:
                self._below[name] = 0
                desired[name] = current
        return desired
