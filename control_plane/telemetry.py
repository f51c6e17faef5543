"""Fleet metrics exported through Ray's Prometheus endpoint (`ray.util.metrics`).

Ray aggregates these with vLLM's own engine metrics on each node's metrics export port, so one Prometheus
scrape config (and the Grafana dashboards in `dashboards/`) covers engines, replicas and the control plane.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from rayfleet.policies.base import FleetSnapshot, MigrationRecord

DOWNTIME_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


class FleetMetrics:
    def __init__(self) -> None:
        replica = ("pool", "replica")
        self.replicas = Gauge("rayfleet_replicas", "Replicas per pool and state", tag_keys=("pool", "state"))
        self.kv_usage = Gauge("rayfleet_replica_kv_cache_usage", "KV cache usage fraction", tag_keys=replica)
        self.running = Gauge("rayfleet_replica_running_requests", "Running requests", tag_keys=replica)
        self.waiting = Gauge("rayfleet_replica_waiting_requests", "Waiting requests", tag_keys=replica)
        self.tokens_in_flight = Gauge("rayfleet_replica_tokens_in_flight", "Tokens in flight", tag_keys=replica)
        self.decode_tps = Gauge("rayfleet_replica_decode_tokens_per_s", "Recent decode throughput",
                                tag_keys=replica)
        self.replica_failures = Counter("rayfleet_replica_failures_total", "Replicas found dead",
                                        tag_keys=("pool",))
        self.migrations = Counter("rayfleet_migrations_total", "Live migrations by outcome and mode",
                                  tag_keys=("outcome", "mode"))
        self.migration_downtime = Histogram("rayfleet_migration_downtime_seconds",
                                            "Last source token to first destination token",
                                            boundaries=DOWNTIME_BUCKETS_S, tag_keys=("mode",))
        self.migration_bytes = Counter("rayfleet_migration_bytes_total", "KV bytes moved by migrations",
                                       tag_keys=("mode",))

    def observe(self, snapshot: FleetSnapshot) -> None:
        for pool in snapshot.pools.values():
            states: dict[str, int] = {}
            for r in pool.replicas:
                states[r.state.value] = states.get(r.state.value, 0) + 1
                tags = {"pool": pool.name, "replica": r.replica_id}
                self.kv_usage.set(r.kv_cache_usage, tags=tags)
                self.running.set(r.num_running, tags=tags)
                self.waiting.set(r.num_waiting, tags=tags)
                self.tokens_in_flight.set(r.tokens_in_flight, tags=tags)
                self.decode_tps.set(r.decode_tokens_per_s, tags=tags)
            for state in ("starting", "ready", "draining"):
                self.replicas.set(states.get(state, 0), tags={"pool": pool.name, "state": state})

    def observe_migration(self, record: MigrationRecord) -> None:
        self.migrations.inc(tags={"outcome": record.outcome, "mode": record.mode})
        if record.outcome == "migrated":
            self.migration_downtime.observe(record.downtime_s, tags={"mode": record.mode})
            self.migration_bytes.inc(record.bytes_moved, tags={"mode": record.mode})
