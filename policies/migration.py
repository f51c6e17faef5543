"""Migration policies: which running requests move where, over the fleet snapshot.

- `none`: never migrates on its own (the controller still drains replicas; without migration their requests
  finish in place).
- `llumnix`: the migration policy of Llumnix (Sun et al., OSDI'24).

Llumnix balances a pool by *virtual usage*: the KV blocks a replica's requests demand, including requests
still queued (their prompts will need blocks) and a headroom reserved on replicas that serve high-priority
requests. Load = virtual usage / capacity. Every tick, within each pool:
- **drain**: every running request of a draining replica moves to the least loaded ready replica;
- **rebalance / de-fragment**: while the most loaded replica's load exceeds the least loaded one's by more
  than `imbalance_threshold`, move its cheapest running request (fewest KV blocks: Llumnix's default choice,
  shortest pause) to the least loaded replica. Queued demand counts in virtual usage, so a replica whose
  queue cannot fit is relieved by moving running requests away: that is Llumnix's de-fragmentation, which
  frees space for a big queued request without preempting it;
- **priorities**: requests with `priority < 0` (vLLM: lower runs first) are never chosen to move out for
  balance, and their replica counts `priority_headroom_blocks` extra, so it keeps room for them.
Decisions are pure; the controller carries them out and records each migration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rayfleet.policies.base import FleetSnapshot, MigrationDecision, ReplicaSnapshot, RequestProgress


class NoMigration:
    """`none`: plans nothing."""

    def plan(self, snapshot: FleetSnapshot, draining: frozenset[str]) -> list[MigrationDecision]:
        return []


@dataclass(frozen=True)
class ReplicaLoadView:
    replica: ReplicaSnapshot
    virtual_blocks: float
    capacity: int

    @property
    def load(self) -> float:
        return self.virtual_blocks / max(self.capacity, 1)


class LlumnixMigrationPolicy:
    def __init__(self, imbalance_threshold: float = 0.2, max_migrations_per_tick: int = 2,
                 priority_headroom_blocks: int = 64, min_remaining_tokens: int = 16, mode: str = "precopy",
                 cooldown_s: float = 5.0, pools: list[str] | None = None) -> None:
        if mode not in ("precopy", "stop_and_copy"):
            raise ValueError(f"mode must be 'precopy' or 'stop_and_copy', got '{mode}'")
        self.imbalance_threshold = imbalance_threshold
        self.max_migrations_per_tick = max_migrations_per_tick
        self.priority_headroom_blocks = priority_headroom_blocks
        self.min_remaining_tokens = min_remaining_tokens
        self.mode = mode
        self.cooldown_s = cooldown_s
        self.pools = set(pools) if pools else None

    # ---------------------------------------------------------------- load model
    @staticmethod
    def blocks(tokens: int, block_size: int) -> int:
        return math.ceil(tokens / max(block_size, 1))

    def view(self, replica: ReplicaSnapshot) -> ReplicaLoadView:
        demand = sum(self.blocks(r.total_tokens, replica.kv_block_size) for r in replica.requests)
        if any(r.priority < 0 for r in replica.requests):
            demand += self.priority_headroom_blocks
        # Blocks in use beyond what the tracked requests explain (e.g. requests from another ingress)
        # still occupy the engine: take the larger of the two.
        used = replica.kv_cache_usage * replica.kv_blocks_total
        return ReplicaLoadView(replica, max(float(demand), used), replica.kv_blocks_total)

    def movable(self, request: RequestProgress, recently_moved: set[str]) -> bool:
        return (request.running and request.priority >= 0 and request.request_id not in recently_moved
                and request.max_tokens - request.output_tokens >= self.min_remaining_tokens)

    # ---------------------------------------------------------------- decisions
    def plan(self, snapshot: FleetSnapshot, draining: frozenset[str]) -> list[MigrationDecision]:
        recent = {m.request_id for m in snapshot.migrations if snapshot.taken_at - m.started_at < self.cooldown_s}
        decisions: list[MigrationDecision] = []
        for name, pool in snapshot.pools.items():
            if self.pools is not None and name not in self.pools:
                continue
            ready = [self.view(r) for r in pool.routable_replicas if r.kv_blocks_total]
            if not ready:
                continue
            for replica in pool.replicas:
                if replica.replica_id in draining:
                    decisions += self._drain(replica, ready, recent)
            decisions += self._rebalance(ready, recent)
        return decisions

    def _drain(self, replica: ReplicaSnapshot, ready: list[ReplicaLoadView], recent: set[str]) -> list[MigrationDecision]:
        decisions = []
        loads = {v.replica.replica_id: v.virtual_blocks for v in ready}
        for request in sorted(replica.requests, key=lambda r: r.total_tokens):
            if not request.running or request.request_id in recent:
                continue
            dst = min(ready, key=lambda v: loads[v.replica.replica_id] / max(v.capacity, 1))
            loads[dst.replica.replica_id] += self.blocks(request.total_tokens, replica.kv_block_size)
            decisions.append(MigrationDecision(request.request_id, replica.replica_id, dst.replica.replica_id,
                                               self.mode, reason="drain"))
        return decisions

    def _rebalance(self, ready: list[ReplicaLoadView], recent: set[str]) -> list[MigrationDecision]:
        if len(ready) < 2:
            return []
        views = {v.replica.replica_id: v for v in ready}
        decisions = []
        for _ in range(self.max_migrations_per_tick):
            src = max(views.values(), key=lambda v: v.load)
            dst = min(views.values(), key=lambda v: v.load)
            if src.load - dst.load <= self.imbalance_threshold:
                break
            candidates = [r for r in src.replica.requests if self.movable(r, recent)]
            if not candidates:
                break
            request = min(candidates, key=lambda r: r.total_tokens)
            moved = self.blocks(request.total_tokens, src.replica.kv_block_size)
            if dst.load + moved / max(dst.capacity, 1) >= src.load:
                break  # the move would only swap the imbalance
            decisions.append(MigrationDecision(request.request_id, src.replica.replica_id, dst.replica.replica_id,
                                               self.mode, reason=f"rebalance {src.load:.2f} -> {dst.load:.2f}"))
            recent.add(request.request_id)
            views[src.replica.replica_id] = ReplicaLoadView(src.replica, src.virtual_blocks - moved, src.capacity)
            views[dst.replica.replica_id] = ReplicaLoadView(dst.replica, dst.virtual_blocks + moved, dst.capacity)
        return decisions
