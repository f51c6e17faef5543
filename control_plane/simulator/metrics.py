"""What a simulation measured: per-request latencies, SLO attainment, goodput, replica-hours, decision times.

TTFT, TPOT and end-to-end latency are defined as `vllm bench serve` defines them (the live benchmarks' load
generator): TTFT from arrival to the first token, TPOT = (latency - TTFT) / (output tokens - 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from rayfleet.policies.base import MigrationRecord

if TYPE_CHECKING:
    from rayfleet.control_plane.simulator.engine import SimReplica, SimRequest


@dataclass(frozen=True)
class RequestRecord:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None  # None: never served (rejected, or still running at the end)
    tpot_s: float | None
    latency_s: float | None
    preemptions: int = 0
    migrations: int = 0
    failure: str = ""


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), so small samples match numpy."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class SimResult:
    records: list[RequestRecord] = field(default_factory=list)
    replica_seconds: float = 0.0
    migrations: list[MigrationRecord] = field(default_factory=list)
    downtimes: list[float] = field(default_factory=list)
    tick_decision_s: list[float] = field(default_factory=list)  # scaler + migration plan, per tick
    tick_parts_s: list[tuple[float, float]] = field(default_factory=list)  # (scaler, migration) per tick
    request_decision_s: list[float] = field(default_factory=list)  # admission + routing, per attempt
    replica_samples: list[tuple[float, int]] = field(default_factory=list)  # (time, replicas alive) per tick
    preemptions: int = 0
    expected: int = 0
    ended: int = 0
    duration_s: float = 0.0

    def finish(self, request: SimRequest) -> None:
        self.ended += 1
        ttft = request.first_token_s - request.arrival_s
        latency = request.finish_s - request.arrival_s
        tpot = (latency - ttft) / (request.generated - 1) if request.generated > 1 else 0.0
        self.records.append(RequestRecord(request.arrival_s, request.prompt, request.generated, ttft, tpot, latency,
                                          request.preemptions, request.migrations))

    def reject(self, request: SimRequest, why: str) -> None:
        self.ended += 1
        self.records.append(RequestRecord(request.arrival_s, request.prompt, 0, None, None, None, failure=why))

    def sample_replicas(self, now: float, replicas: Iterable[SimReplica]) -> None:
        self.replica_samples.append((now, sum(1 for _ in replicas)))

    def close(self, now: float, replicas: Iterable[SimReplica], migrations: list[MigrationRecord]) -> None:
        """End of the run: replicas still alive are paid until now; unfinished requests count as failed."""
        self.duration_s = now
        for replica in replicas:
            self.replica_seconds += now - replica.created_s
            self.preemptions += replica.preemptions
        self.migrations = list(migrations)
        for _ in range(self.expected - self.ended):
            self.records.append(RequestRecord(0.0, 0, 0, None, None, None, failure="unfinished at the end"))

    # ---------------------------------------------------------------- summaries
    def served(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ttft_s is not None]

    def slo_attainment(self, ttft_s: float, tpot_s: float) -> float:
        """Share of all requests (failed ones included) served within both SLOs."""
        if not self.records:
            return 0.0
        ok = sum(1 for r in self.served() if r.ttft_s <= ttft_s and r.tpot_s <= tpot_s)
        return ok / len(self.records)

    def summary(self, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> dict[str, float]:
        served = self.served()
        ttft = [r.ttft_s for r in served]
        tpot = [r.tpot_s for r in served if r.output_tokens > 1]
        latency = [r.latency_s for r in served]
        outcomes: dict[str, int] = {}
        for m in self.migrations:
            outcomes[m.outcome] = outcomes.get(m.outcome, 0) + 1
        out = {
            "requests": len(self.records), "served": len(served), "failed": len(self.records) - len(served),
            "ttft_p50_ms": percentile(ttft, 50) * 1e3, "ttft_p99_ms": percentile(ttft, 99) * 1e3,
            "ttft_mean_ms": sum(ttft) / len(ttft) * 1e3 if ttft else float("nan"),
            "tpot_p50_ms": percentile(tpot, 50) * 1e3, "tpot_p99_ms": percentile(tpot, 99) * 1e3,
            "latency_p99_ms": percentile(latency, 99) * 1e3,
            "output_tokens_per_s": sum(r.output_tokens for r in served) / self.duration_s if self.duration_s else 0.0,
            "preemptions": self.preemptions, "migrated": outcomes.get("migrated", 0),
            "refused": outcomes.get("refused", 0), "downtime_p50_ms": percentile(self.downtimes, 50) * 1e3,
            "replica_hours": self.replica_seconds / 3600,
            "tick_decision_p50_ms": percentile(self.tick_decision_s, 50) * 1e3,
            "tick_decision_max_ms": max(self.tick_decision_s, default=0.0) * 1e3,
            "request_decision_mean_us": (sum(self.request_decision_s) / len(self.request_decision_s) * 1e6
                                         if self.request_decision_s else 0.0),
        }
        if slo_ttft_s is not None and slo_tpot_s is not None:
            out["slo_attainment"] = self.slo_attainment(slo_ttft_s, slo_tpot_s)
            out["slo_violations"] = round(len(self.records) * (1 - out["slo_attainment"]))
            out["goodput_rps"] = out["slo_attainment"] * len(self.records) / self.duration_s if self.duration_s else 0.0
        return out
