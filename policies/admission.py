"""Built-in admission: bound the queue per pool, so overload is a fast 429 rather than a slow timeout."""

from __future__ import annotations

from rayfleet.policies.base import AdmissionDecision, AdmissionVerdict, FleetSnapshot, RequestInfo


class QueueLimitAdmission:
    """Reject when every candidate replica already has `max_waiting_per_replica` requests queued.

    The Retry-After hint grows with the queue: a client backs off longer when the pool is further behind.
    """

    def __init__(self, max_waiting_per_replica: int = 64, max_in_flight_per_replica: int = 512) -> None:
        self.max_waiting_per_replica = max_waiting_per_replica
        self.max_in_flight_per_replica = max_in_flight_per_replica

    def admit(self, request: RequestInfo, snapshot: FleetSnapshot) -> AdmissionDecision:
        replicas = snapshot.routable_replicas(request.pool)
        if not replicas:
            return AdmissionDecision(AdmissionVerdict.REJECT, retry_after_s=5.0,
                                     reason="no ready replica; the fleet may be starting or scaling")
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
