"""Built-in admission: a per-replica queue bound (`queue_limit`) and KV-aware admission (`kv_aware`).

Both turn overload into a fast 429 with Retry-After rather than a slow timeout; `kv_aware` also keeps
requests out of engines whose KV cache they would overflow, where vLLM would preempt and recompute.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from rayfleet.policies.base import (
    AdmissionDecision,
    AdmissionVerdict,
    FleetSnapshot,
    ReplicaSnapshot,
    RequestInfo,
)


def no_replica(request: RequestInfo, snapshot: FleetSnapshot) -> AdmissionDecision | None:
    if snapshot.routable_replicas(request.pool):
        return None
    return AdmissionDecision(AdmissionVerdict.REJECT, retry_after_s=5.0,
                             reason="no ready replica; the fleet may be starting or scaling")


class QueueLimitAdmission:
    """Reject when every candidate replica already has `max_waiting_per_replica` requests queued.

    The Retry-After hint grows with the queue: a client backs off longer when the pool is further behind.
    """

    def __init__(self, max_waiting_per_replica: int = 64, max_in_flight_per_replica: int = 512) -> None:
        self.max_waiting_per_replica = max_waiting_per_replica
        self.max_in_flight_per_replica = max_in_flight_per_replica

    def admit(self, request: RequestInfo, snapshot: FleetSnapshot) -> AdmissionDecision:
        refused = no_replica(request, snapshot)
        if refused is not None:
            return refused
        replicas = snapshot.routable_replicas(request.pool)
        has_room = any(
            r.num_waiting < self.max_waiting_per_replica
            and r.num_running + r.num_waiting < self.max_in_flight_per_replica
            for r in replicas
        )
        if has_room:
            return AdmissionDecision(AdmissionVerdict.ADMIT)
        backlog = min(r.num_waiting for r in replicas)
        return AdmissionDecision(AdmissionVerdict.REJECT, retry_after_s=float(min(1 + backlog // 16, 30)),
                                 reason=f"overloaded: {backlog} requests waiting per replica")


@dataclass
class _Pending:
    first_seen: float
    last_seen: float
    demand: int


class KVAwareAdmission:
    """Admit while the predicted KV demand of a pool's requests fits its KV capacity; queue beyond, up to a
    bound; 429 with Retry-After past it.

    From the stability analysis of LLM serving under KV limits (Nie, Si & Zhou, "A Queueing-Theoretic
    Framework for Stability Analysis of LLM Inference with KV Cache Memory Constraints", arXiv 2605.04595):
    a request's KV grows from its prompt to prompt + output and is freed only at its end, and a batch whose
    requests' KV cannot all fit stalls (vLLM preempts and recomputes the newest request, which is work lost).
    So a request is admitted when the pool's predicted demand, every running and queued request at its
    prompt + expected output, plus this one, stays within `target_utilization` of the pool's KV tokens.
    The expected output is the client's prediction, else `max_tokens` capped by the mean output length this
    policy has observed (requests leaving the snapshots), once it has seen `learn_after` of them.

    Requests that do not fit wait in the ingress (verdict QUEUE, asked again), first come first served, at
    most `max_queued_per_replica` per ready replica; past that bound the answer is a 429 whose Retry-After
    is the time the pool needs to finish the queue at its current completion rate. A queued request the
    ingress stops asking about (client gone) is forgotten after `forget_after_s`.
    """

    def __init__(self, target_utilization: float = 0.95, max_queued_per_replica: int = 16,
                 learn_after: int = 20, forget_after_s: float = 2.0, clock=time.monotonic) -> None:
        if not 0 < target_utilization <= 1.5:
            raise ValueError(f"target_utilization must be in (0, 1.5], got {target_utilization}")
        self.target_utilization = target_utilization
        self.max_queued_per_replica = max_queued_per_replica
        self.learn_after = learn_after
        self.forget_after_s = forget_after_s
        self._clock = clock
        self._pending: dict[str, _Pending] = {}  # insertion order = arrival order
        self._last_outputs: dict[str, int] = {}  # request id -> output tokens, as of the last snapshot seen
        self._last_snapshot_at: float | None = None
        self._finished = 0
        self._mean_output = 0.0

    # ---------------------------------------------------------------- the model
    def expected_output(self, max_tokens: int, predicted: int | None) -> int:
        if predicted is not None:
            return predicted
        if self._finished >= self.learn_after:
            return min(max_tokens, math.ceil(self._mean_output)) if max_tokens else math.ceil(self._mean_output)
        return max_tokens

    def replica_demand(self, replica: ReplicaSnapshot) -> int:
        """KV tokens this replica's requests will hold at their ends (predicted)."""
        demand = seen_tokens = 0
        for r in replica.requests:
            demand += r.prompt_tokens + max(self.expected_output(r.max_tokens, r.predicted_output_tokens),
                                            r.output_tokens)
            seen_tokens += r.total_tokens
        # Requests an ingress placed since the controller's snapshot show only in the overlay's counts.
        unseen = max(replica.num_running + replica.num_waiting - len(replica.requests), 0)
        if unseen:
            demand += max(replica.tokens_in_flight - seen_tokens, 0) + unseen * self.expected_output(0, None)
        return demand

    def _learn(self, snapshot: FleetSnapshot) -> None:
        """Requests gone from the fleet since the last snapshot finished: their outputs teach E[output]."""
        if snapshot.taken_at == self._last_snapshot_at:
            return
        self._last_snapshot_at = snapshot.taken_at
        outputs = {r.request_id: r.output_tokens for pool in snapshot.pools.values()
                   for replica in pool.replicas for r in replica.requests}
        for request_id, output in self._last_outputs.items():
            if request_id not in outputs and output > 0:
                self._finished += 1
                self._mean_output += (output - self._mean_output) / min(self._finished, 200)
        self._last_outputs = outputs

    # ---------------------------------------------------------------- decisions
    def admit(self, request: RequestInfo, snapshot: FleetSnapshot) -> AdmissionDecision:
        refused = no_replica(request, snapshot)
        if refused is not None:
            self._pending.pop(request.request_id, None)
            return refused
        self._learn(snapshot)
        now = self._clock()
        for request_id in [k for k, p in self._pending.items() if now - p.last_seen > self.forget_after_s]:
            del self._pending[request_id]
        replicas = snapshot.routable_replicas(request.pool)
        capacity = self.target_utilization * sum(r.kv_tokens_total for r in replicas)
        if not capacity:  # no replica has reported its KV cache yet: nothing to predict with
            return AdmissionDecision(AdmissionVerdict.ADMIT, reason="KV capacity not known yet")
        demand = sum(self.replica_demand(r) for r in replicas)
        mine = request.prompt_tokens + self.expected_output(request.max_tokens, None)
        pending = self._pending.get(request.request_id)
        first_in_line = next(iter(self._pending), request.request_id) == request.request_id
        if demand + mine <= capacity and first_in_line:
            self._pending.pop(request.request_id, None)
            return AdmissionDecision(AdmissionVerdict.ADMIT, reason=f"KV demand {demand + mine} <= {capacity:.0f}")
        if pending is None and len(self._pending) >= self.max_queued_per_replica * len(replicas):
            return AdmissionDecision(AdmissionVerdict.REJECT, retry_after_s=self.retry_after(replicas),
                                     reason=f"overloaded: KV demand {demand} of {capacity:.0f} tokens and "
                                            f"{len(self._pending)} requests queued")
        if pending is None:
            pending = self._pending[request.request_id] = _Pending(now, now, mine)
        pending.last_seen = now
        return AdmissionDecision(AdmissionVerdict.QUEUE, reason=f"KV demand {demand + mine} > {capacity:.0f}")

    def retry_after(self, replicas: tuple[ReplicaSnapshot, ...]) -> float:
        """Seconds for the pool to finish the queued requests at its current completion rate."""
        tokens_per_s = sum(r.decode_tokens_per_s for r in replicas)
        output = self.expected_output(0, None) or 1
        if tokens_per_s <= 0:
            return 1.0
        return float(min(max(math.ceil(len(self._pending) * output / tokens_per_s), 1), 60))
