"""The fleet simulator: the live fleet's control loop over simulated replicas, with the live policy objects.

Policies come from `rayfleet.policies.registry` by the names and parameters of a fleet spec's `policies`
section (`control_plane.spec.PoliciesSpec`): the same classes, the same code, the same `FleetSnapshot`s the
controller and the ingress give them. What the simulator plays:

- **the ingress** (`serving/gateway.py`): each request passes its fixed front-end latency, then admission
  (QUEUE: asked again every `QUEUE_WAIT_S` until `request_timeout_s`; REJECT: a 429, counted as failed) and
  the router, on the controller's snapshot refreshed at most every `VIEW_TTL_S` with the ingress' own
  in-flight requests laid over it (`FleetSnapshot.with_local_load`, as the gateway does);
- **the controller** (`controller.py`): replica loads probed every `health_period_s`; every `tick_s` the
  scaler (clamped to the pool's bounds; new replicas serve after the profile's start-up time, surplus ones
  drain: starting ones first, then the least loaded), then the migration policy over the draining set; a
  drained replica stops once it holds no request;
- **migrations** as `actors/replica/live_migration.py` runs them: the destination must have room for the
  request's blocks plus one, pre-copy stages while the source keeps decoding, the stop, the last stage, and
  the resume as a new request in the destination's queue that computes one token; the engines spend the
  profile's copy time per block (gather at the source; at the destination the scatter of every staged block
  at resume, or of the last stage only with `write_ahead`);
- **prefill/decode handoffs** when the router names a `handoff_replica_id`: a stop-and-copy migration at the
  first token.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rayfleet.control_plane.simulator.engine import DONE, SimReplica, SimRequest
from rayfleet.control_plane.simulator.metrics import SimResult
from rayfleet.control_plane.simulator.profiles import ReplicaProfile
from rayfleet.control_plane.simulator.workload import TraceRequest
from rayfleet.control_plane.spec import PoliciesSpec
from rayfleet.policies import registry
from rayfleet.policies.base import (
    AdmissionVerdict,
    FleetSnapshot,
    MigrationDecision,
    MigrationRecord,
    NoReplicaAvailable,
    PoolRole,
    PoolSnapshot,
    ReplicaState,
    RequestInfo,
)

# The ingress' constants (control_plane/serving/gateway.py).
VIEW_TTL_S = 0.25
QUEUE_WAIT_S = 0.05


@dataclass(frozen=True)
class SimPool:
    name: str
    profile: ReplicaProfile
    replicas: int
    min_replicas: int | None = None
    max_replicas: int | None = None
    role: PoolRole = PoolRole.BOTH
    prefill_pool: str | None = None
    model: str = "model"


@dataclass
class SimConfig:
    pools: list[SimPool]
    policies: dict[str, Any] = field(default_factory=dict)  # a fleet spec's `policies` section
    target_pool: str | None = None  # the pool clients name (default: the first that is not a prefill pool)
    health_period_s: float = 0.5
    request_timeout_s: float = 600.0
    write_ahead: bool = True
    host_replicas_share_cores: bool = True  # contention (CPU profiles): every replica is on one host


class FleetSimulator:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.policies = PoliciesSpec.model_validate(config.policies)
        p = self.policies
        self.router = registry.create("router", p.router.name, p.router.params)
        self.admission = registry.create("admission", p.admission.name, p.admission.params)
        self.scaler = registry.create("scaler", p.scaler.name, p.scaler.params)
        self.migration_policy = registry.create("migration", p.migration.name, p.migration.params)
        self.pools = {pool.name: pool for pool in config.pools}
        self.target = config.target_pool or next(p.name for p in config.pools if p.role is not PoolRole.PREFILL)
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()
        self.replicas: dict[str, SimReplica] = {}
        self.desired = {pool.name: pool.replicas for pool in config.pools}
        self.result = SimResult()
        self.migrations: list[MigrationRecord] = []
        self._ids = itertools.count()
        self._probed: FleetSnapshot | None = None
        self._view: FleetSnapshot | None = None
        self._view_at = -math.inf
        self._in_flight: dict[str, SimRequest] = {}
        self._token_times: list = []
        self._token_rate = 0.0
        self._rate_at = 0.0
        self._rate_tokens = 0
        for pool in config.pools:
            for _ in range(pool.replicas):
                self._start_replica(pool, ready=True)

    # ---------------------------------------------------------------- the event loop
    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), action))

    def run(self, trace: list[TraceRequest], until_s: float | None = None, drain_s: float = 600.0) -> SimResult:
        """Serve `trace`; stop at `until_s`, or once every request ended (at most `drain_s` after the last)."""
        self.at(0.0, self._probe)
        self.at(self.policies.tick_s, self._tick)
        for request in trace:
            self.at(request.arrival_s, lambda r=request: self._arrive(r))
        end = until_s if until_s is not None else (trace[-1].arrival_s + drain_s if trace else 0.0)
        pending = len(trace)
        self.result.expected = pending
        while self._events:
            when, _, action = heapq.heappop(self._events)
            if when > end:
                break
            self.now = when
            action()
            if until_s is None and self.result.ended == pending and not self._in_flight:
                break
        self.result.close(self.now, self.replicas.values(), self.migrations)
        return self.result

    # ---------------------------------------------------------------- host contention
    def contention(self) -> float:
        """Slowdown of engine steps on a shared CPU host: demand (busy engines + front-end CPU) / cores."""
        profile = self.pools[self.target].profile
        if not profile.host_cores or not self.config.host_replicas_share_cores:
            return 1.0
        busy = sum(1 for r in self.replicas.values() if r.busy) + 1  # the engine asking is about to be busy
        front_end = profile.front_end_cpu_s_per_token * self._token_rate
        return max(1.0, (busy * profile.engine_cores + front_end) / profile.host_cores)

    def count_tokens(self, tokens: int, now: float) -> None:
        self._rate_tokens += tokens
        if now - self._rate_at >= 0.5:
            self._token_rate = self._rate_tokens / (now - self._rate_at)
            self._rate_at, self._rate_tokens = now, 0

    # ---------------------------------------------------------------- replicas
    def _start_replica(self, pool: SimPool, ready: bool = False) -> SimReplica:
        replica = SimReplica(self, f"{pool.name}-{next(self._ids):04d}", pool.name, pool.model, pool.profile,
                             created_s=self.now, role=pool.role)
        self.replicas[replica.replica_id] = replica
        if ready:
            replica.state = ReplicaState.READY
        else:
            self.at(self.now + pool.profile.startup_s, lambda: self._ready(replica))
        return replica

    def _ready(self, replica: SimReplica) -> None:
        if replica.state is ReplicaState.STARTING:
            replica.state = ReplicaState.READY

    def _stop(self, replica: SimReplica) -> None:
        replica.state = ReplicaState.STOPPED
        replica.stopped_s = self.now
        self.result.replica_seconds += self.now - replica.created_s
        self.result.preemptions += replica.preemptions
        del self.replicas[replica.replica_id]

    def replica_idle_check(self, replica: SimReplica) -> None:
        if replica.state is ReplicaState.DRAINING and replica.idle and not self._inbound(replica):
            self._stop(replica)

    def _inbound(self, replica: SimReplica) -> bool:
        return any(r.moving_to is replica for r in self._in_flight.values())

    def import_cost(self, request: SimRequest) -> float:
        """Engine time to scatter the KV a request brought (all of it, or only the last stage)."""
        m = self.pools[self.target].profile.migration
        blocks = math.ceil(request.computed / request.replica.bs)
        if self.config.write_ahead:
            blocks = min(blocks, request.last_stage_blocks)
        return blocks * m.engine_copy_s_per_block

    # ---------------------------------------------------------------- views
    def snapshot(self) -> FleetSnapshot:
        pools = {}
        for name, pool in self.pools.items():
            replicas = tuple(r.snapshot(self.now) for r in self.replicas.values() if r.pool == name)
            pools[name] = PoolSnapshot(
                name=name, model=pool.model, min_replicas=pool.min_replicas if pool.min_replicas is not None
                else pool.replicas, max_replicas=pool.max_replicas or pool.replicas,
                desired_replicas=self.desired[name], replicas=replicas, role=pool.role,
                prefill_pool=pool.prefill_pool)
        return FleetSnapshot(pools=pools, taken_at=self.now, migrations=tuple(self.migrations[-50:]))

    def _probe(self) -> None:
        self._probed = self.snapshot()
        self.at(self.now + self.config.health_period_s, self._probe)

    def _local_load(self, only: SimReplica | None = None) -> tuple[dict[str, int], dict[str, int]]:
        replicas = [only] if only is not None else self.replicas.values()
        tokens = {r.replica_id: r.tokens_in_flight() for r in replicas}
        counts = {r.replica_id: len(r.running) + len(r.waiting) for r in replicas}
        return tokens, counts

    def view(self) -> FleetSnapshot:
        if self.now - self._view_at > VIEW_TTL_S:
            self._view = self._probed.with_local_load(*self._local_load())
            self._view_at = self.now
        return self._view

    # ---------------------------------------------------------------- the ingress
    def _arrive(self, trace: TraceRequest) -> None:
        request = SimRequest(f"req-{next(self._ids)}", trace, self.now)
        capacity = self.pools[self.target].profile.kv_blocks * self.pools[self.target].profile.block_size
        if trace.prompt_tokens + trace.output_tokens > capacity:
            self.result.reject(request, "longer than a replica's KV cache")
            return
        self._in_flight[request.rid] = request
        delay = self.pools[self.target].profile.ingress_s * self.contention()
        self.at(self.now + delay, lambda: self._admit(request))

    def _info(self, request: SimRequest, exclude: frozenset[str] = frozenset()) -> RequestInfo:
        return RequestInfo(request_id=request.rid, pool=self.target, prompt_tokens=request.prompt,
                           max_tokens=request.trace.max_tokens, priority=request.trace.priority,
                           arrival_time=request.arrival_s, exclude_replicas=exclude)

    def _admit(self, request: SimRequest) -> None:
        began = time.perf_counter()
        view = self.view()
        info = self._info(request)
        decision = self.admission.admit(info, view)
        if decision.verdict is AdmissionVerdict.ADMIT:
            routed = self._route(info, view)
            self.result.request_decision_s.append(time.perf_counter() - began)
            if routed is None:
                self._end_unserved(request, "no replica available (503)")
                return
            self._place(request, routed.replica_id, routed.handoff_replica_id)
            return
        self.result.request_decision_s.append(time.perf_counter() - began)
        if decision.verdict is AdmissionVerdict.REJECT or self.now - request.arrival_s > self.config.request_timeout_s:
            self._end_unserved(request, f"rejected (429): {decision.reason}")
            return
        self.at(self.now + QUEUE_WAIT_S, lambda: self._admit(request))

    def _route(self, info: RequestInfo, view: FleetSnapshot):
        """The router's choice; a replica the view still shows but that stopped accepting (drained, stopped)
        refuses the call and the ledger places the request again without it, at most twice (as live)."""
        excluded: set[str] = set()
        for _ in range(3):
            try:
                routed = self.router.route(dataclasses.replace(info, exclude_replicas=frozenset(excluded)), view)
            except NoReplicaAvailable:
                return None
            replica = self.replicas.get(routed.replica_id)
            if replica is not None and replica.accepting:
                return routed
            excluded.add(routed.replica_id)
        return None

    def _end_unserved(self, request: SimRequest, why: str) -> None:
        self._in_flight.pop(request.rid, None)
        self.result.reject(request, why)

    def _place(self, request: SimRequest, replica_id: str, handoff: str | None) -> None:
        replica = self.replicas[replica_id]
        request.placed_s = self.now
        request.handoff_to = handoff
        replica.requests_started += 1
        replica.enqueue(request)
        # The ingress knows where it just sent a request: the next route sees it at once.
        self._view = self._view.with_local_load(*self._local_load(replica))

    def moved(self, downtime_s: float) -> None:
        self.result.downtimes.append(downtime_s)

    def finished(self, request: SimRequest) -> None:
        self._in_flight.pop(request.rid, None)
        self.result.finish(request)

    # ---------------------------------------------------------------- the controller
    def _tick(self) -> None:
        snapshot = self.snapshot()
        began = time.perf_counter()
        wanted = self.scaler.desired_replicas(snapshot)
        scaled = time.perf_counter()
        draining = frozenset(r.replica_id for r in self.replicas.values() if r.state is ReplicaState.DRAINING)
        decisions = self.migration_policy.plan(snapshot, draining)
        planned = time.perf_counter()
        self.result.tick_decision_s.append(planned - began)
        self.result.tick_parts_s.append((scaled - began, planned - scaled))
        for pool, want in wanted.items():
            spec = self.pools[pool]
            low = spec.min_replicas if spec.min_replicas is not None else spec.replicas
            self.desired[pool] = min(max(want, low), spec.max_replicas or spec.replicas)
        self._reconcile()
        for decision in decisions:
            self._migrate(decision)
        self.result.sample_replicas(self.now, self.replicas.values())
        self.at(self.now + self.policies.tick_s, self._tick)

    def _reconcile(self) -> None:
        for name, pool in self.pools.items():
            live = [r for r in self.replicas.values()
                    if r.pool == name and r.state in (ReplicaState.STARTING, ReplicaState.READY)]
            missing = self.desired[name] - len(live)
            for _ in range(max(missing, 0)):
                self._start_replica(pool)
            # Remove the least useful first: still starting, then least tokens in flight (as the controller).
            for replica in sorted(live, key=lambda r: (r.state is ReplicaState.READY, r.tokens_in_flight()))[
                    :max(-missing, 0)]:
                if replica.state is ReplicaState.STARTING:
                    self._stop(replica)
                else:
                    replica.state = ReplicaState.DRAINING
                    self.replica_idle_check(replica)

    # ---------------------------------------------------------------- migrations
    def _record(self, decision: MigrationDecision, outcome: str, reason: str = "", **numbers) -> None:
        self.migrations.append(MigrationRecord(
            migration_id=f"mig-{len(self.migrations)}", request_id=decision.request_id, src=decision.src,
            dst=decision.dst, mode=decision.mode, outcome=outcome, reason=reason, started_at=self.now, **numbers))

    def _migrate(self, decision: MigrationDecision) -> None:
        request = self._in_flight.get(decision.request_id)
        src, dst = self.replicas.get(decision.src), self.replicas.get(decision.dst)
        if request is None or src is None or request.replica is not src or request.moving_to is not None:
            self._record(decision, "failed", "the request is not (or no longer) on the source")
            return
        if dst is None or dst.state is not ReplicaState.READY:
            self._record(decision, "failed", "destination not ready")
            return
        computed, _ = src.progress(request)
        needed = math.ceil((computed + 1) / dst.bs) + 1  # the source's headroom check (MigrationLimits)
        if dst.free < needed:
            self._record(decision, "refused", f"{dst.replica_id} has {dst.free} free KV blocks, needs {needed}")
            return
        request.moving_to = dst
        m = src.profile.migration
        started = self.now
        seconds, sent = 0.0, 0
        if decision.mode == "precopy":
            for _ in range(m.max_stages):
                blocks = computed // src.bs - sent  # complete blocks only
                stage = m.stage_s + blocks * m.block_transfer_s
                src.pending_copy_s += blocks * m.engine_copy_s_per_block
                seconds += stage
                sent += blocks
                computed += int(stage / self._tpot(src))  # the source decodes meanwhile
                if math.ceil(computed / src.bs) - sent <= m.last_stage_max_blocks:
                    break
        self.at(self.now + seconds, lambda: src.between_steps(
            lambda: self._stop_and_copy(request, src, dst, decision, sent, started)))

    def _tpot(self, replica: SimReplica) -> float:
        return replica.profile.step.step_s(0, max(replica.n_dec, 1), replica.dec_ctx) * self.contention()

    def _stop_and_copy(self, request: SimRequest, src: SimReplica, dst: SimReplica, decision: MigrationDecision,
                       sent_blocks: int, started: float) -> None:
        if request.state == DONE or request.replica is not src:
            request.moving_to = None
            self._record(decision, "finished_on_source", "the request finished during pre-copy")
            return
        src.detach(request)
        last = max(math.ceil(request.computed / src.bs) - sent_blocks, 0)
        m = src.profile.migration
        src.pending_copy_s += last * m.engine_copy_s_per_block
        request.last_stage_blocks = last
        request.paused_at = request.last_token_s or self.now

        def resume() -> None:
            request.moving_to = None
            target = dst if dst.accepting else src  # a destination gone: the source takes it back
            request.migrations += target is dst
            target.enqueue(request)
            # The modelled stop, which a policy that learns its pause reads (a live record's gap also holds the
            # destination's first step).
            self._record(decision, "migrated" if target is dst else "aborted",
                         stages=1 + (sent_blocks > 0), blocks_moved=sent_blocks + last, last_stage_blocks=last,
                         total_s=self.now - started, downtime_s=pause)
            self.replica_idle_check(src)

        pause = m.pause_s + last * m.block_transfer_s
        self.at(self.now + pause, resume)

    def hand_off(self, request: SimRequest, src: SimReplica) -> None:
        """P/D: a stop-and-copy migration at the first token to the decode replica the router named."""
        dst = self.replicas.get(request.handoff_to)
        request.handoff_to = None
        decision = MigrationDecision(request.rid, src.replica_id, dst.replica_id if dst else "?", "stop_and_copy",
                                     reason="prefill/decode handoff")
        if dst is None or not dst.accepting or dst.free < math.ceil((request.computed + 1) / dst.bs) + 1:
            self._record(decision, "refused", "decode replica has no room: the request decodes here")
            return
        request.moving_to = dst
        src.between_steps(lambda: self._stop_and_copy(request, src, dst, decision, 0, self.now))
