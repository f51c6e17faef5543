"""The KV store's Prometheus metrics, exported by each shard through Ray's metrics endpoint.

Hits are counted by the tier that served them (a disk hit is also promoted to memory), misses once per
block asked for and not found, evictions by the tier a block left. Usage and capacity are gauges per tier
and shard. Names follow `control_plane/telemetry.py`'s conventions (scraped with Ray's `ray_` prefix).
"""

from __future__ import annotations

from ray.util.metrics import Counter

from rayfleet.actors.kv.store_tiers import KVStoreStats
from rayfleet.actors.observability.metrics import SteadyGauge

TIERS = ("memory", "disk")


class StoreMetrics:
    """One shard's metrics; `observe` turns the shard's running counters into counter increments."""

    def __init__(self, store: str, shard: int) -> None:
        self.tags = {"store": store, "shard": str(shard)}
        tier = ("store", "shard", "tier")
        self.hits = Counter("rayfleet_kv_store_hits_total", "Blocks served, by the tier that held them",
                            tag_keys=tier)
        self.misses = Counter("rayfleet_kv_store_misses_total", "Blocks asked for and not held",
                              tag_keys=("store", "shard"))
        self.evictions = Counter("rayfleet_kv_store_evictions_total", "Blocks that left a tier for lack of room",
                                 tag_keys=tier)
        self.used = SteadyGauge("rayfleet_kv_store_used_bytes", "Bytes held per tier", tag_keys=tier)
        self.capacity = SteadyGauge("rayfleet_kv_store_capacity_bytes", "Capacity per tier", tag_keys=tier)
        self._seen: dict[str, int] = {}

    def observe(self, stats: KVStoreStats) -> None:
        for tier in TIERS:
            tags = {**self.tags, "tier": tier}
            self._count(self.hits, f"hits_{tier}", getattr(stats, f"hits_{tier}"), tags)
            self._count(self.evictions, f"evictions_{tier}", getattr(stats, f"evictions_{tier}"), tags)
            self.used.set(getattr(stats, f"{tier}_bytes"), tags=tags)
            self.capacity.set(getattr(stats, f"{tier}_capacity_bytes"), tags=tags)
        self._count(self.misses, "misses", stats.misses, self.tags)

    def _count(self, counter: Counter, key: str, total: int, tags: dict[str, str]) -> None:
        delta = total - self._seen.get(key, 0)
        if delta > 0:
            counter.inc(delta, tags=tags)
            self._seen[key] = total
