"""A simulated replica: vLLM v1's scheduler over a calibrated step-time model, one event per engine step.

What it keeps from vLLM (v1/core/sched/scheduler.py): continuous batching; a token budget per step
(`max_num_batched_tokens`) filled first by running requests (one token per decoding request, prompt chunks
for the rest: chunked prefill), then by waiting requests in FCFS order while their blocks fit; KV in blocks of
`block_size`, allocated as tokens are scheduled; when a running request needs a block and none is free, the
newest running request is preempted (its blocks freed, its tokens recomputed later from the front of the
queue), and no waiting request is admitted in that step. A request that arrives with KV (a migration, a
prefill-to-decode handoff) waits in the queue like any other and computes exactly one token.

Decoding requests are tracked in aggregate so a step costs O(1) plus the requests that finish, need a block or
change phase in it: a decoding request's progress is a line in the step index (`join_step`), and heaps hold
the steps at which it needs its next block and produces its last token. That is what lets 1,000 replicas run.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from rayfleet.control_plane.simulator.profiles import ReplicaProfile
from rayfleet.control_plane.simulator.workload import TraceRequest
from rayfleet.policies.base import PoolRole, ReplicaSnapshot, ReplicaState, RequestProgress

WAITING, PREFILL, DECODING, MOVING, DONE = "waiting", "prefill", "decoding", "moving", "done"
RATE_WINDOW_S = 10.0  # the replica's decode rate window (actors/replica/engine_stats.py uses the same)


class ReplicaHost(Protocol):
    """What a simulated replica needs from the simulation around it (the fleet simulator)."""

    now: float

    def at(self, when: float, action: Callable[[], None]) -> None: ...

    def contention(self) -> float: ...

    def import_cost(self, request: SimRequest) -> float: ...

    def count_tokens(self, tokens: int, now: float) -> None: ...

    def moved(self, downtime_s: float) -> None: ...

    def finished(self, request: SimRequest) -> None: ...

    def hand_off(self, request: SimRequest, src: SimReplica) -> None: ...

    def replica_idle_check(self, replica: SimReplica) -> None: ...


@dataclass(eq=False)
class SimRequest:
    rid: str
    trace: TraceRequest
    arrival_s: float
    state: str = WAITING
    computed: int = 0  # tokens with KV (materialized unless DECODING)
    generated: int = 0  # output tokens produced (materialized unless DECODING)
    blocks: int = 0
    scheduled: int = 0  # tokens scheduled in the current step (prefill chunk)
    join_step: int = 0  # DECODING: the step index it started decoding at, with these counts
    join_computed: int = 0
    join_generated: int = 0
    version: int = 0  # bumped whenever heap entries about it become stale
    first_token_s: float | None = None
    last_token_s: float | None = None
    finish_s: float | None = None
    placed_s: float | None = None
    preemptions: int = 0
    migrations: int = 0
    downtime_s: float = 0.0
    moving_to: SimReplica | None = None  # a migration is under way (it keeps decoding until the stop)
    last_stage_blocks: int = 0  # blocks of its last migration stage (scattered inside the resume's step)
    paused_at: float | None = None  # its last token before a move: the move's downtime runs from here
    handoff_to: str | None = None  # P/D: the decode replica after the first token
    replica: SimReplica | None = None

    @property
    def prompt(self) -> int:
        return self.trace.prompt_tokens

    @property
    def output(self) -> int:
        return self.trace.output_tokens


@dataclass
class SimReplica:
    sim: ReplicaHost
    replica_id: str
    pool: str
    model: str
    profile: ReplicaProfile
    created_s: float
    role: PoolRole = PoolRole.BOTH
    state: ReplicaState = ReplicaState.STARTING
    stopped_s: float | None = None
    waiting: deque = field(default_factory=deque)
    running: dict = field(default_factory=dict)  # SimRequest -> None, in admission order (last = newest)
    prefilling: dict = field(default_factory=dict)
    busy: bool = False
    k: int = 0  # engine steps completed
    n_dec: int = 0
    dec_ctx: int = 0  # sum of `computed` over decoding requests, at the start of step k
    finish_heap: list = field(default_factory=list)
    block_heap: list = field(default_factory=list)
    pending_copy_s: float = 0.0  # KV gathers/scatters the engine runs before its next step (CPU hosts)
    at_boundary: list = field(default_factory=list)  # callables to run between steps
    requests_started: int = 0
    preemptions: int = 0
    _tokens: deque = field(default_factory=deque)  # (time, tokens generated in a step)
    _tokens_sum: int = 0
    last_step_end_s: float = 0.0
    _scheduled: list = field(default_factory=list)
    _kicked: bool = False
    _preempted_now: bool = False

    def __post_init__(self) -> None:
        self.free = self.profile.kv_blocks
        self.bs = self.profile.block_size

    # ---------------------------------------------------------------- the outside
    @property
    def accepting(self) -> bool:
        return self.state is ReplicaState.READY

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting and not self.busy

    def enqueue(self, request: SimRequest) -> None:
        """A request reaches this engine (new, or carrying KV from a migration: `computed` > 0)."""
        request.replica = self
        request.state = WAITING
        self.waiting.append(request)
        self.kick()

    def between_steps(self, action: Callable[[], None]) -> None:
        """Run `action` at the next step boundary (now, when idle): engines change state only there."""
        if self.busy:
            self.at_boundary.append(action)
        else:
            action()
            self.kick()

    def kick(self) -> None:
        if not self.busy and not self._kicked and (self.running or self.waiting):
            self._kicked = True
            self.sim.at(self.sim.now, self._step)

    def progress(self, request: SimRequest) -> tuple[int, int]:
        """(computed, generated) of a request on this replica, as of the last step boundary."""
        if request.state == DECODING:
            done = self.k - request.join_step
            return request.join_computed + done, request.join_generated + done
        return request.computed, request.generated

    def detach(self, request: SimRequest) -> None:
        """Take a request out between steps (it moves elsewhere with its KV); frees its blocks."""
        if request.state == DECODING and self.k > request.join_step:  # it decoded in the step that just ended
            request.last_token_s = self.last_step_end_s
        request.computed, request.generated = self._drop(request)
        request.state = MOVING

    def _drop(self, request: SimRequest) -> tuple[int, int]:
        """Out of every table of this engine, its blocks freed; returns its (computed, generated)."""
        computed, generated = self.progress(request)
        if request.state == DECODING:
            self.n_dec -= 1
            self.dec_ctx -= computed
        self.running.pop(request, None)
        self.prefilling.pop(request, None)
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self._scheduled:
            self._scheduled.remove(request)
        self.free += request.blocks
        request.blocks = 0
        request.version += 1
        return computed, generated

    def tokens_in_flight(self) -> int:
        decoded = self.dec_ctx + self.n_dec  # each decoding request also holds its sampled, uncomputed token
        others = sum(r.prompt + r.generated for r in self.waiting) + sum(r.prompt + r.generated for r in self.prefilling)
        return decoded + others

    def decode_rate(self, now: float) -> float:
        """Tokens per second over the last RATE_WINDOW_S, as the live replica's EngineLoad reports it."""
        while self._tokens and now - self._tokens[0][0] > RATE_WINDOW_S:
            self._tokens_sum -= self._tokens.popleft()[1]
        if not self._tokens:
            return 0.0
        return self._tokens_sum / max(now - self._tokens[0][0], 1.0)

    def snapshot(self, now: float) -> ReplicaSnapshot:
        requests = []
        remaining = 0
        for request in (*self.running, *self.waiting):
            computed, generated = self.progress(request)
            progress = RequestProgress(
                request_id=request.rid, prompt_tokens=request.prompt, output_tokens=generated,
                max_tokens=request.trace.max_tokens, priority=request.trace.priority, arrival_time=request.arrival_s,
                running=request.first_token_s is not None)  # as the live replica reports it
            remaining += progress.remaining_tokens
            requests.append(progress)
        used = self.profile.kv_blocks - self.free
        return ReplicaSnapshot(
            replica_id=self.replica_id, pool=self.pool, model=self.model, state=self.state,
            num_running=len(self.running), num_waiting=len(self.waiting),
            kv_cache_usage=used / self.profile.kv_blocks, kv_blocks_total=self.profile.kv_blocks,
            kv_block_size=self.bs, tokens_in_flight=self.tokens_in_flight(), predicted_remaining_tokens=remaining,
            decode_tokens_per_s=self.decode_rate(now), requests_started=self.requests_started,
            requests=tuple(requests), updated_at=now)

    # ---------------------------------------------------------------- one step
    def _step(self) -> None:
        self._kicked = False
        if self.busy or not (self.running or self.waiting):
            return
        prefill_tokens, prefill_ctx = self._schedule()
        if not self._scheduled and not self.n_dec and self.waiting and not self.running:
            prefill_tokens, prefill_ctx = self._schedule()  # a step that only preempted admits nothing
        if not self._scheduled and not self.n_dec:
            return  # nothing fits (all blocked on memory); a finish or an arrival kicks again
        self.busy = True
        seconds = self.profile.step.step_s(prefill_tokens, self.n_dec, self.dec_ctx + prefill_ctx)
        seconds = seconds * self.sim.contention() + self.pending_copy_s
        self.pending_copy_s = 0.0
        self.sim.at(self.sim.now + seconds, self._end_step)

    def _schedule(self) -> tuple[int, int]:
        self._scheduled = []
        budget = self.profile.max_batched_tokens - self.n_dec
        k = self.k
        preempted = False
        # Decoding requests that need their next block in this step.
        while self.block_heap and self.block_heap[0][0] <= k:
            step, version, _, request = heapq.heappop(self.block_heap)
            if version != request.version or request.state != DECODING or request.replica is not self:
                continue
            if not self._make_room(1, request):
                preempted = True
                continue
            self.free -= 1
            request.blocks += 1
            heapq.heappush(self.block_heap, (step + self.bs, request.version, id(request), request))
            preempted = preempted or self._preempted_now
        prefill_tokens = prefill_ctx = 0
        for request in list(self.prefilling):
            n = min(request.prompt + request.generated - request.computed, budget)
            if n <= 0:
                break
            need = math.ceil((request.computed + n) / self.bs) - request.blocks
            if not self._make_room(need, request):
                preempted = True
                continue
            preempted = preempted or self._preempted_now
            self.free -= need
            request.blocks += need
            request.scheduled = n
            budget -= n
            prefill_tokens += n
            prefill_ctx += request.computed + n
            self._scheduled.append(request)
        while (not preempted and self.waiting and budget > 0 and len(self.running) < self.profile.max_num_seqs
               and self.state is not ReplicaState.STOPPED):
            request = self.waiting[0]
            n = min(request.prompt + request.generated - request.computed, budget)
            need = math.ceil((request.computed + n) / self.bs) - request.blocks
            if need > self.free:
                break  # vLLM admits in order: the queue waits behind its head
            self.waiting.popleft()
            self.free -= need
            request.blocks += need
            request.scheduled = n
            request.state = PREFILL
            self.running[request] = None
            self.prefilling[request] = None
            budget -= n
            prefill_tokens += n
            prefill_ctx += request.computed + n
            self._scheduled.append(request)
            if request.computed:  # KV that arrived with it: the engine scatters it inside this step
                self.pending_copy_s += self.sim.import_cost(request)
        return prefill_tokens, prefill_ctx

    def _make_room(self, blocks: int, requester: SimRequest) -> bool:
        """Preempt newest running requests until `blocks` are free; False if the requester itself went."""
        self._preempted_now = False
        while self.free < blocks:
            victim = next(reversed(self.running), None)
            if victim is None:
                return False
            self._preempt(victim)
            self._preempted_now = True
            if victim is requester:
                return False
        return True

    def _preempt(self, request: SimRequest) -> None:
        _, request.generated = self._drop(request)
        request.computed = 0  # vLLM recomputes a preempted request from scratch (prompt + outputs so far)
        request.state = WAITING
        request.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(request)

    def _end_step(self) -> None:
        now = self.sim.now
        k = self.k
        produced = self.n_dec
        self.dec_ctx += self.n_dec
        while self.finish_heap and self.finish_heap[0][0] <= k:
            _, version, _, request = heapq.heappop(self.finish_heap)
            if version == request.version and request.state == DECODING and request.replica is self:
                request.last_token_s = now
                self._complete(request, now)
        for request in self._scheduled:
            request.computed += request.scheduled
            request.scheduled = 0
            if request.computed < request.prompt + request.generated:
                continue  # more prompt chunks to go
            produced += 1
            request.generated += 1
            request.last_token_s = now
            if request.first_token_s is None:
                request.first_token_s = now
            if request.paused_at is not None:  # its first token after a move
                request.downtime_s += now - request.paused_at
                self.sim.moved(now - request.paused_at)
                request.paused_at = None
            self.prefilling.pop(request, None)
            if request.generated >= request.output:
                request.state = DONE  # not decoding: _complete must not touch the aggregates
                self._complete(request, now)
                continue
            self._start_decoding(request, k + 1)
            if request.handoff_to is not None and self.role is PoolRole.PREFILL:
                self.sim.hand_off(request, self)
        self._scheduled = []
        self._tokens.append((now, produced))
        self._tokens_sum += produced
        self.sim.count_tokens(produced, now)
        self.k += 1
        self.last_step_end_s = now
        self.busy = False
        actions, self.at_boundary = self.at_boundary, []
        for action in actions:
            action()
        self.sim.replica_idle_check(self)
        self.kick()

    def _start_decoding(self, request: SimRequest, step: int) -> None:
        request.state = DECODING
        request.join_step, request.join_computed, request.join_generated = step, request.computed, request.generated
        self.n_dec += 1
        self.dec_ctx += request.computed
        first_block = step + (-request.computed) % self.bs
        heapq.heappush(self.block_heap, (first_block, request.version, id(request), request))
        last = step + request.output - request.generated - 1
        heapq.heappush(self.finish_heap, (last, request.version, id(request), request))

    def _complete(self, request: SimRequest, now: float) -> None:
        if request.state == DECODING:
            request.computed, request.generated = self.progress(request)
            request.computed += 1  # this step computed its last decode token too
            request.generated += 1
            self.n_dec -= 1
            self.dec_ctx -= request.computed
        self.running.pop(request, None)
        self.free += request.blocks
        request.blocks = 0
        request.version += 1
        request.state = DONE
        request.finish_s = now
        self.sim.finished(request)
