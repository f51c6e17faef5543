"""The control plane's Prometheus metrics, exported through Ray's metrics endpoint (`ray.util.metrics`).

Ray serves every process's metrics on each node's metrics export port, next to vLLM's engine metrics (the
replicas pass vLLM's `RayPrometheusStatLogger`) and the KV store's (`actors/kv/store_metrics.py`), so one
Prometheus scrape config and the Grafana dashboards in `dashboards/grafana/` cover engines, replicas, the
store and the control plane.

Names follow Prometheus conventions: a `rayfleet_` prefix, base units in the name (`_seconds`, `_bytes`),
counters ending in `_total`, latencies as histograms. Ray puts its own `ray_` namespace in front of every
application metric, so `rayfleet_requests_total` is scraped as `ray_rayfleet_requests_total`, and vLLM's
`vllm:time_to_first_token_seconds` as `ray_vllm_time_to_first_token_seconds` (':' is not allowed in
OpenTelemetry names; vLLM's Ray wrapper replaces it). The Grafana panels query those scraped names, and
`tests/test_observability_metrics.py` checks each one against a running fleet.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from rayfleet.actors.observability.metrics import SteadyGauge
from rayfleet.policies.base import FleetSnapshot, MigrationRecord

DOWNTIME_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
# Time to first token includes rendering, admission and queueing in the engine: up to tens of seconds.
TTFT_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TPOT_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28]
DURATION_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
STAGE_BUCKETS_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]


class FleetMetrics:
    """What the FleetController sees: replicas per state, their load, failures, live migrations."""

    def __init__(self) -> None:
        replica = ("pool", "replica")
        self.replicas = Gauge("rayfleet_replicas", "Replicas per pool and state", tag_keys=("pool", "state"))
        self.kv_usage = Gauge("rayfleet_replica_kv_cache_usage_ratio", "KV cache usage (0-1)", tag_keys=replica)
        self.running = Gauge("rayfleet_replica_running_requests", "Running requests", tag_keys=replica)
        self.waiting = Gauge("rayfleet_replica_waiting_requests", "Requests waiting in the engine's queue",
                             tag_keys=replica)
        self.tokens_in_flight = Gauge("rayfleet_replica_tokens_in_flight", "Prompt + generated tokens of "
                                      "unfinished requests", tag_keys=replica)
        self.decode_tps = Gauge("rayfleet_replica_decode_tokens_per_second", "Recent decode throughput",
                                tag_keys=replica)
        self.replica_failures = Counter("rayfleet_replica_failures_total", "Replicas found dead",
                                        tag_keys=("pool",))
        # Starts exist from the fleet's first replica on, so a panel of replacements is never missing data.
        self.replica_starts = Counter("rayfleet_replica_starts_total", "Replicas started, by reason: scale "
                                      "(reconciling to the desired count) or replacement (of a dead one)",
                                      tag_keys=("pool", "reason"))
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


class IngressMetrics:
    """What the ingress sees of each request: its outcome, latencies as the client sees them, admission
    queueing, routing decisions and replays. Labels stay bounded: pool names from the spec (or `auto`),
    HTTP status codes."""

    def __init__(self) -> None:
        pool = ("pool",)
        self.requests = Counter("rayfleet_requests_total", "Requests by pool and HTTP status (in-band stream "
                                "errors count as their error status)", tag_keys=("pool", "status"))
        self.ttft = Histogram("rayfleet_time_to_first_token_seconds", "Request arrival at the ingress to its "
                              "first token", boundaries=TTFT_BUCKETS_S, tag_keys=pool)
        self.tpot = Histogram("rayfleet_time_per_output_token_seconds", "Mean time between output tokens of "
                              "a request after its first", boundaries=TPOT_BUCKETS_S, tag_keys=pool)
        self.duration = Histogram("rayfleet_request_duration_seconds", "Request arrival to its last token",
                                  boundaries=DURATION_BUCKETS_S, tag_keys=pool)
        self.output_tokens = Counter("rayfleet_output_tokens_total", "Tokens sent to clients", tag_keys=pool)
        self.queue_depth = SteadyGauge("rayfleet_admission_queue_depth", "Requests waiting in this ingress for "
                                 "admission", tag_keys=("model",))
        self.replays = Counter("rayfleet_replays_total", "Requests replayed on another replica after theirs "
                               "was lost", tag_keys=pool)
        self.stages = Histogram(
            "rayfleet_ingress_stage_seconds", "Time of a request in each ingress stage before its engine: render "
            "(body, checks, vLLM's renderer; the router's prompt embedding starts beside it), embedding_wait (what "
            "the router then waited for that embedding), admission_and_routing (queueing for admission included), "
            "rerender (the chosen pool renders differently from the first)", boundaries=STAGE_BUCKETS_S,
            tag_keys=("stage",))
        self.routing_decisions = Counter("rayfleet_routing_decisions_total", "Routing decisions by the model "
                                         "asked for and the pool chosen", tag_keys=("model", "pool", "router"))
