"""Migration policies: which running requests move where, over the fleet snapshot.

- `none`: never migrates on its own (the controller still drains replicas; without migration their requests
  finish in place).
- `llumnix`: the triggers of Llumnix (Sun et al., OSDI'24), each move priced before it is made.

Llumnix reschedules for four reasons: draining, de-fragmentation (a queued request cannot fit), avoiding
preemption, and keeping headroom for high-priority requests (its "virtual usage"). rayfleet's first version
moved the request with the fewest blocks whenever two replicas' virtual usage differed by more than a
threshold; on this project's 2-replica bursty workload that made p99 TTFT 3x worse than routing alone
(docs/benchmarks-migration.md): a move costs a pause (~0.1-0.3 s here) and CPU on both engines, and most
imbalances were gone by the time a move landed. So every trigger here names what the move fixes, estimates
its gain in seconds of someone's latency, and the move is made only if the gain exceeds its cost:

- **drain**: every running request of a draining replica moves out (to a replica with room); always made.
- **queue**: the replica's oldest queued request cannot get its prompt's blocks. Moving a running request whose
  blocks cover the shortfall lets it start after the move instead of after enough running requests finish.
  Gain: that wait minus the move's duration, for it and the queue behind it.
- **preemption**: the running requests' growth over `horizon_s` needs more blocks than are free, so vLLM will
  preempt (and later recompute) its newest request. Gain: the recompute (prefill of its tokens) plus its wait.
- **priority**: a replica serving a high-priority request (`priority < 0`, vLLM: lower runs first) has fewer
  than `priority_headroom_blocks` free; a normal request moves out to make room. Gain: `priority_gain_s`.

Cost of moving request r from S to D (`MigrationCosts`, defaults measured on this project's 2-core CPU; the
simulator passes its calibrated profile's numbers): the pause r sees (`pause_s` plus the last stage's blocks),
plus the slowdown of everything else running on S and D while r's blocks are copied (`interference`: 1 when the
copies take the engines' own cores, as here; ~0 on GPUs with copy engines). The pause moves most with the
hardware, the model and the load (a pre-copy's fell from ~0.3 s to 0.08-0.19 s on this project's CPU within two
weeks as the code and the machine changed), so by default (`learn_pause`) each pool prices its moves at the
median pause of its own last moves (the fleet's migration records: the client's gap less the last stage's copy),
and at the configured `pause_s` until it has made `PAUSE_MIN_SAMPLES`. A move is refused when r would finish
before its pre-copy does, or when D, after its own queue and growth, has no room for r: a move that only shifts
the pressure to D pays nothing. Refusals of the last plan are kept in `refused`, the pause each pool was priced
at in `pauses` (observability). Decisions are pure; the controller (or the simulator) carries them out.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, field

from rayfleet.policies.base import (
    FleetSnapshot,
    MigrationDecision,
    MigrationRecord,
    PoolSnapshot,
    ReplicaSnapshot,
    RequestProgress,
)

TRIGGERS = ("drain", "queue", "preemption", "priority")
PAUSE_WINDOW = 16  # a pool's last moves its learned pause is the median of
PAUSE_MIN_SAMPLES = 3  # moves a pool makes before its own pause replaces the configured one


class NoMigration:
    """`none`: plans nothing."""

    def plan(self, snapshot: FleetSnapshot, draining: frozenset[str]) -> list[MigrationDecision]:
        return []


@dataclass(frozen=True)
class MigrationCosts:
    """What a move costs and what time is worth, in seconds (defaults: tiny-llama-b on the 2-core CPU)."""

    # Fixed downtime of a move (stop, control round trips, the destination's first step): the prior a pool prices
    # its first moves at before it learns its own (80-190 ms on 2026-12-05, docs/benchmarks-migration.md).
    pause_s: float = 0.15
    block_transfer_s: float = 0.0005  # per KV block moved (gather + scatter + staging)
    stage_s: float = 0.05  # per pre-copy stage (an export RPC and a staging call)
    interference: float = 1.0  # share of the copy time the other requests on both engines lose
    default_tpot_s: float = 0.05  # per-token time when a replica reports no decode rate yet
    prefill_s_per_token: float = 0.0005  # recompute cost of a preempted request's tokens
    last_stage_max_blocks: int = 16  # Llumnix's last-stage size (MigrationLimits on the replica)


@dataclass
class _ReplicaView:
    """A replica as the policy reasons about it; `free` and `running` change as moves are planned."""

    replica: ReplicaSnapshot
    free: int  # free KV blocks now
    queued_blocks: int  # blocks the queued requests' prompts need
    running: list[RequestProgress] = field(default_factory=list)
    queued: list[RequestProgress] = field(default_factory=list)
    has_priority: bool = False
    tpot: float = 0.0
    growth: int = 0  # blocks the running requests claim within the horizon

    @property
    def rid(self) -> str:
        return self.replica.replica_id

    @property
    def spare(self) -> int:
        """Blocks left after the queue and the running requests' growth: room for a newcomer."""
        return self.free - self.queued_blocks - self.growth


class LlumnixMigrationPolicy:
    def __init__(self, triggers: list[str] | None = None, max_migrations_per_tick: int = 2,
                 horizon_s: float = 2.0, priority_headroom_blocks: int = 64, priority_gain_s: float = 1.0,
                 min_gain_ratio: float = 1.5, mode: str = "precopy", cooldown_s: float = 5.0,
                 pools: list[str] | None = None, costs: dict | MigrationCosts | None = None,
                 max_destinations: int = 8, learn_pause: bool = True) -> None:
        if mode not in ("precopy", "stop_and_copy"):
            raise ValueError(f"mode must be 'precopy' or 'stop_and_copy', got '{mode}'")
        unknown = set(triggers or ()) - set(TRIGGERS)
        if unknown:
            raise ValueError(f"triggers: unknown {sorted(unknown)}; allowed: {', '.join(TRIGGERS)}")
        self.triggers = frozenset(TRIGGERS if triggers is None else triggers)
        self.max_migrations_per_tick = max_migrations_per_tick
        self.horizon_s = horizon_s
        self.priority_headroom_blocks = priority_headroom_blocks
        self.priority_gain_s = priority_gain_s
        self.min_gain_ratio = min_gain_ratio
        self.mode = mode
        self.cooldown_s = cooldown_s
        self.pools = set(pools) if pools else None
        self.costs = costs if isinstance(costs, MigrationCosts) else MigrationCosts(**(costs or {}))
        self.max_destinations = max_destinations
        self.learn_pause = learn_pause
        self.refused: list[tuple[str, str]] = []  # (request id, why) of the last plan
        self.pauses: dict[str, float] = {}  # pool -> the pause its moves were priced at in the last plan

    def explain(self) -> dict:
        """The last plan's prices and refusals, for `rayfleet status` (the controller shows what a policy explains)."""
        return {"pause_s": dict(self.pauses), "refused": [list(r) for r in self.refused[-10:]]}

    # ---------------------------------------------------------------- the model
    @staticmethod
    def blocks(tokens: int, block_size: int) -> int:
        return math.ceil(tokens / max(block_size, 1))

    def tpot(self, replica: ReplicaSnapshot) -> float:
        """Seconds per output token of one request on this replica (one engine step)."""
        if replica.decode_tokens_per_s > 0 and replica.num_running > 0:
            return replica.num_running / replica.decode_tokens_per_s
        return self.costs.default_tpot_s

    def view(self, replica: ReplicaSnapshot) -> _ReplicaView:
        bs = replica.kv_block_size
        tpot = self.tpot(replica)
        steps = self.horizon_s / tpot
        running, unstarted = [], []
        held = growth = 0
        has_priority = False
        for r in replica.requests:  # one pass: this runs for every replica that may need room, every tick
            has_priority = has_priority or r.priority < 0
            if not r.running:
                unstarted.append(r)
                continue
            running.append(r)
            tokens = r.total_tokens
            blocks = -(-tokens // bs)
            held += blocks
            growth += -(-(tokens + min(steps, r.remaining_tokens)) // bs) - blocks
        # Requests without a first token are queued in the engine or being prefilled (they hold blocks);
        # the engine's waiting count says how many of the newest are still queued (vLLM admits in order).
        unstarted.sort(key=lambda r: r.arrival_time)
        queued = unstarted[len(unstarted) - min(replica.num_waiting, len(unstarted)):]
        # The engine's own count is the truth (it includes blocks of prompts being prefilled); the requests'
        # sum is the floor when the engine's count is stale.
        used = max(held, round(replica.kv_cache_usage * replica.kv_blocks_total))
        return _ReplicaView(replica, max(replica.kv_blocks_total - used, 0),
                            sum(self.blocks(r.prompt_tokens + 1, bs) for r in queued), running, queued,
                            has_priority, tpot, int(growth))

    def footprint(self, request: RequestProgress, view: _ReplicaView) -> int:
        """Blocks `request` holds by the end of the horizon, decoding at `view`'s pace."""
        steps = self.horizon_s / view.tpot
        return self.blocks(request.total_tokens + min(steps, request.remaining_tokens), view.replica.kv_block_size)

    def learned_pause(self, pool: PoolSnapshot, migrations: tuple[MigrationRecord, ...]) -> float | None:
        """Median fixed pause of the pool's last `PAUSE_WINDOW` moves (None: fewer than `PAUSE_MIN_SAMPLES`).

        A record's downtime is the client's gap between its last token on the source and its first on the
        destination; less the last stage's copy at the configured rate it is the pause this model calls fixed."""
        members = {r.replica_id for r in pool.replicas}
        fixed = [m.downtime_s - m.last_stage_blocks * self.costs.block_transfer_s
                 for m in migrations if m.outcome == "migrated" and m.downtime_s > 0 and m.src in members]
        if len(fixed) < PAUSE_MIN_SAMPLES:
            return None
        return max(statistics.median(fixed[-PAUSE_WINDOW:]), 0.0)

    def move_seconds(self, request: RequestProgress, src: _ReplicaView) -> tuple[float, float]:
        """(whole move, pause the request sees) for a request of this size leaving `src`."""
        blocks = self.blocks(request.total_tokens, src.replica.kv_block_size)
        c = self.costs
        last = min(blocks, c.last_stage_max_blocks) if self.mode == "precopy" else blocks
        stages = 1 + (blocks > last)
        pause = self.pauses.get(src.replica.pool, c.pause_s) + last * c.block_transfer_s
        return pause + (blocks - last) * c.block_transfer_s + (stages - 1) * c.stage_s, pause

    def move_cost(self, request: RequestProgress, src: _ReplicaView, dst: _ReplicaView) -> float:
        total, pause = self.move_seconds(request, src)
        others = len(src.running) - 1 + len(dst.running)
        return pause + self.costs.interference * (total - pause) * others

    def natural_wait(self, view: _ReplicaView, shortfall: int) -> float:
        """Seconds until running requests finishing on their own free `shortfall` blocks (inf: never)."""
        tpot, bs = view.tpot, view.replica.kv_block_size
        freed = 0
        for request in sorted(view.running, key=lambda r: r.remaining_tokens):
            freed += self.blocks(request.total_tokens + request.remaining_tokens, bs)
            if freed >= shortfall:
                return request.remaining_tokens * tpot
        return math.inf

    # ---------------------------------------------------------------- decisions
    def plan(self, snapshot: FleetSnapshot, draining: frozenset[str]) -> list[MigrationDecision]:
        recent = {m.request_id for m in snapshot.migrations if snapshot.taken_at - m.started_at < self.cooldown_s}
        self.refused = []
        self.pauses = {}
        decisions: list[MigrationDecision] = []
        for name, pool in snapshot.pools.items():
            if self.pools is not None and name not in self.pools:
                continue
            learned = self.learned_pause(pool, snapshot.migrations) if self.learn_pause else None
            self.pauses[name] = self.costs.pause_s if learned is None else learned
            replicas = [r for r in pool.routable_replicas if r.kv_blocks_total]
            if not replicas:
                continue
            # A full view reads every request of a replica; at 1,000 replicas only the replicas that may
            # need room and the few with the most room (the destinations worth trying) get one.
            roomiest = sorted(replicas, key=lambda r: (r.kv_cache_usage, r.num_waiting))[:self.max_destinations]
            views = {r.replica_id: self.view(r) for r in roomiest}
            for replica in replicas:
                if replica.replica_id not in views and self._may_need_room(replica):
                    views[replica.replica_id] = self.view(replica)
            ready = list(views.values())
            if "drain" in self.triggers:
                for replica in pool.replicas:
                    if replica.replica_id in draining and replica.kv_blocks_total:
                        decisions += self._drain(self.view(replica), ready, recent)
            budget = self.max_migrations_per_tick
            for src in sorted(ready, key=lambda v: v.free - v.queued_blocks):
                if budget <= 0:
                    break
                move = self._relieve(src, ready, recent)
                if move is not None:
                    decisions.append(move)
                    budget -= 1
        return decisions

    def _may_need_room(self, replica: ReplicaSnapshot) -> bool:
        """A cheap upper bound on the triggers, from the replica's counters alone."""
        free = replica.kv_blocks_total * (1.0 - replica.kv_cache_usage)
        steps = self.horizon_s / self.tpot(replica)
        most_growth = replica.num_running * (steps / max(replica.kv_block_size, 1) + 1)
        return ((replica.num_waiting > 0 and "queue" in self.triggers)
                or (free < most_growth and "preemption" in self.triggers)
                or (free < self.priority_headroom_blocks and "priority" in self.triggers))

    def _movable(self, request: RequestProgress, src: _ReplicaView, recent: set[str]) -> str:
        """Why `request` cannot move ("" when it can): it would finish before its pre-copy does."""
        if not request.running or request.request_id in recent:
            return "not running, or moved within the cooldown"
        total, _ = self.move_seconds(request, src)
        if request.remaining_tokens * src.tpot < 2 * total:
            return f"finishes in {request.remaining_tokens} tokens, before a {total:.2f} s move pays"
        return ""

    def _drain(self, src: _ReplicaView, ready: list[_ReplicaView], recent: set[str]) -> list[MigrationDecision]:
        decisions = []
        for request in sorted(src.running, key=lambda r: r.total_tokens):
            if request.request_id in recent:
                continue
            targets = [v for v in ready if v.rid != src.rid]
            dst = max(targets, key=lambda v: v.spare, default=None)
            if dst is None or dst.free < self.blocks(request.total_tokens + 1, src.replica.kv_block_size):
                self.refused.append((request.request_id, "drain: no replica has room now"))
                continue
            self._commit(request, src, dst)
            decisions.append(MigrationDecision(request.request_id, src.rid, dst.rid, self.mode, reason="drain"))
        return decisions

    def _gain(self, src: _ReplicaView) -> tuple[str, int, float]:
        """(trigger, blocks to free on `src`, seconds of latency saved by freeing them) or ("", 0, 0)."""
        bs = src.replica.kv_block_size
        if "queue" in self.triggers and src.queued:
            head = src.queued[0]
            shortfall = self.blocks(head.prompt_tokens + 1, bs) - src.free
            if shortfall > 0:
                # The whole queue waits behind its head (vLLM admits in order).
                return "queue", shortfall, self.natural_wait(src, shortfall) * len(src.queued)
        if "preemption" in self.triggers and src.running:
            shortfall = src.growth - src.free
            if shortfall > 0:
                victim = max(src.running, key=lambda r: (r.priority, r.arrival_time))  # vLLM preempts the newest
                recompute = victim.total_tokens * self.costs.prefill_s_per_token
                return "preemption", shortfall, recompute + self.natural_wait(src, shortfall)
        if "priority" in self.triggers and src.has_priority and src.free < self.priority_headroom_blocks:
            return "priority", self.priority_headroom_blocks - src.free, self.priority_gain_s
        return "", 0, 0.0

    def _relieve(self, src: _ReplicaView, ready: list[_ReplicaView], recent: set[str]) -> MigrationDecision | None:
        trigger, shortfall, gain = self._gain(src)
        if not trigger:
            return None
        bs = src.replica.kv_block_size
        targets = sorted((d for d in ready if d.rid != src.rid), key=lambda d: -d.spare)
        # High-priority requests are what the room is for; smaller requests cost less to move, so the
        # first one that can move and pays is the cheapest.
        candidates = sorted((r for r in src.running if r.priority >= 0 and self.blocks(r.total_tokens, bs) >= shortfall),
                            key=lambda r: r.total_tokens)
        if not candidates:
            self.refused.append((src.rid, f"{trigger}: no movable request frees the {shortfall} blocks needed"))
        for request in candidates:
            why = self._movable(request, src, recent)
            if why:
                self.refused.append((request.request_id, why))
                continue
            need = self.footprint(request, src)
            fitting = list(itertools.takewhile(lambda d: d.spare >= need, targets))
            if not fitting:
                # Every larger candidate needs at least as much room.
                self.refused.append((request.request_id, f"{trigger}: no replica has {need} blocks to spare "
                                                         "beside its own queue and growth"))
                break
            dst = min(fitting, key=lambda d: (len(d.running), -d.spare))
            cost = self.move_cost(request, src, dst)
            if gain < self.min_gain_ratio * cost:
                self.refused.append((request.request_id, f"{trigger}: gain {gain:.2f} s < "
                                                         f"{self.min_gain_ratio:g} x cost {cost:.2f} s"))
                break  # larger requests cost more
            self._commit(request, src, dst)
            return MigrationDecision(request.request_id, src.rid, dst.rid, self.mode,
                                     reason=f"{trigger}: frees {self.blocks(request.total_tokens, bs)} blocks, "
                                            f"gain {gain:.2f} s vs cost {cost:.2f} s")
        return None

    def _commit(self, request: RequestProgress, src: _ReplicaView, dst: _ReplicaView) -> None:
        """Account a planned move so later decisions of the same tick see it."""
        blocks = self.blocks(request.total_tokens, src.replica.kv_block_size)
        grows = self.footprint(request, dst) - blocks
        src.running = [r for r in src.running if r.request_id != request.request_id]
        src.free += blocks
        src.growth -= grows
        dst.running = [*dst.running, request]
        dst.free -= blocks
        dst.growth += grows
