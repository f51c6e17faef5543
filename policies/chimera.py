"""The `chimera` router: model and replica together, by predicted quality, length and congestion.

After Chimera (Ni et al. 2026, arXiv 2603.22206; its code is not public), for a fleet of pools serving different
models. For a request it predicts, per pool:
- **quality**: the probability that the pool's model answers correctly, from a kNN head over prompt embeddings
  (all-MiniLM-L6-v2, computed outside the policy) of labelled outcomes: an offline table of verifier scores,
  then every `feedback(request_id, score)` (client feedback, verifier rewards); a pool whose weights are
  replaced (a promoted RL version) restarts from the new weights' verifier scores (`relearn`);
- **length**: output tokens, from the same neighbours' finished requests (updated by every `observe`), and for
  workflows the remaining output of the whole workflow (this stage plus the learned length of later stages);
and per replica:
- **congestion**: predicted latency = the pool's idle latency for that length (fitted from the table) plus the
  replica's predicted decode backlog (tokens still expected from its unfinished requests, plus the ingress' own)
  over its measured decode throughput. CPU replicas on one node share its cores (`cpu_replicas_share_node`): a
  request sent to an idle one there still waits for the others' work, so their congestion is the node's, their
  backlogs summed over their throughputs summed, and moving a request between them buys no latency (measured on
  the demo fleet: spreading its three engines over two cores was slower than one engine batching everything).
It picks the (pool, replica) maximising `quality - latency_weight * latency`, or, with a latency SLO, the best
quality among the candidates predicted within it (the fastest when none is). A request that names a pool gets
the replica of that pool with the lowest predicted latency. Every decision is kept with each candidate's
predictions for `explain()` (`rayfleet status --routing`).

Pure decision code: embeddings arrive in `RequestInfo.embedding`, the table as rows; nothing here does I/O
beyond reading the table file named in the spec. A request whose embedding is not back within `embedding_wait_s`
(0.1 s) is routed on the pools' priors and congestion alone; its embedding, when it comes, is attached so its
outcome and feedback still teach, or, if the request still waits in admission, routes it (`attach_embedding`).
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rayfleet.policies.base import (
    FleetSnapshot,
    LabelledOutcome,
    NoReplicaAvailable,
    ReplicaSnapshot,
    RequestInfo,
    RequestOutcome,
    RoutingDecision,
)
from rayfleet.policies.routing import candidates


def read_table(path: str | Path) -> list[LabelledOutcome]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(LabelledOutcome(**json.loads(line)))
            except (TypeError, ValueError) as error:
                raise ValueError(f"{path}:{number}: not a table row ({error})") from None
    return rows


class KnnTable:
    """A bounded table of (unit embedding, value) with a kNN estimate; the oldest rows go first when full."""

    def __init__(self, dim: int, capacity: int):
        self.vectors = np.zeros((capacity, dim), dtype=np.float32)
        self.values = np.zeros(capacity, dtype=np.float32)
        self.size = 0
        self.next = 0

    def add(self, vector: np.ndarray, value: float) -> None:
        self.vectors[self.next] = vector
        self.values[self.next] = value
        self.next = (self.next + 1) % len(self.values)
        self.size = min(self.size + 1, len(self.values))

    def estimate(self, vector: np.ndarray, k: int, prior: float, prior_weight: float) -> float:
        """Similarity-weighted mean of the k nearest values, shrunk toward `prior` (few or far neighbours)."""
        if self.size == 0:
            return prior
        sims = self.vectors[: self.size] @ vector
        k = min(k, self.size)
        nearest = np.argpartition(-sims, k - 1)[:k]
        weights = np.clip(sims[nearest], 0.0, None) ** 4  # sharpen: near-duplicates dominate far neighbours
        return float((weights @ self.values[: self.size][nearest] + prior * prior_weight)
                     / (weights.sum() + prior_weight))

    def mean(self, default: float) -> float:
        return float(self.values[: self.size].mean()) if self.size else default


@dataclass(frozen=True)
class IdleLatency:
    """Latency of one request on an idle replica of a pool: `overhead_s + tokens * per_token_s`."""

    overhead_s: float
    per_token_s: float

    @classmethod
    def fit(cls, rows: list[LabelledOutcome]) -> IdleLatency:
        """Expected seconds per output token (total latency over total tokens): a line fitted to short, noisy
        outputs (a few tokens each, on a shared machine) extrapolates worse than this ratio."""
        if not rows:
            return cls(0.0, 0.01)
        tokens = sum(max(r.output_tokens, 1) for r in rows)
        return cls(0.0, max(sum(r.latency_s for r in rows) / tokens, 1e-4))

    def seconds(self, tokens: float) -> float:
        return self.overhead_s + tokens * self.per_token_s


@dataclass(frozen=True)
class CandidatePrediction:
    pool: str
    replica_id: str
    quality: float
    output_tokens: float
    workflow_remaining_tokens: float
    latency_s: float
    backlog_tokens: int
    objective: float


@dataclass
class PendingRequest:
    """What the router remembers of a routed request until its outcome and feedback arrive."""

    embedding: np.ndarray | None
    pool: str
    stage: tuple[int, int] | None


def parse_stage(stage: str | None) -> tuple[int, int] | None:
    """`"2/3"` -> (2, 3): this is stage 2 of a 3-stage workflow (1-based); anything else -> None."""
    if not stage:
        return None
    index, _, total = stage.partition("/")
    try:
        i, n = int(index), int(total)
    except ValueError:
        return None
    return (i, n) if 1 <= i <= n else None


class ChimeraRouter:
    """See the module docstring. Parameters come from the spec's `policies.router.params`."""

    needs_embeddings = True

    def __init__(self, table: str | None = None, rows: list[LabelledOutcome] | None = None,
                 latency_weight: float = 0.05, k: int = 16,
                 prior_weight: float = 0.1, capacity: int = 4096, embedding_dim: int = 384,
                 max_decisions: int = 200, max_pending: int = 20_000, default_output_tokens: int = 16,
                 embedding_wait_s: float = 0.1, cpu_replicas_share_node: bool = True):
        if latency_weight < 0:
            raise ValueError("latency_weight must be >= 0")
        if embedding_wait_s < 0:
            raise ValueError("embedding_wait_s must be >= 0")
        self.latency_weight = latency_weight
        # How long a request waits for its prompt's embedding before it is routed on the pools' priors: an
        # embedding takes ~20 ms on an idle core, and an overloaded embedder must not hold every request up.
        self.embedding_wait_s = embedding_wait_s
        # False where CPU replicas of one node are pinned to disjoint cores (each then congests alone).
        self.cpu_replicas_share_node = cpu_replicas_share_node
        self.k = k
        self.prior_weight = prior_weight
        self.capacity = capacity
        self.dim = embedding_dim
        self.default_output_tokens = default_output_tokens
        self.rows = (read_table(table) if table else []) + list(rows or [])
        self.quality: dict[str, KnnTable] = {}
        self.length: dict[str, KnnTable] = {}
        self.prior: dict[str, float] = {}
        self.idle: dict[str, IdleLatency] = {}
        for pool in sorted({r.pool for r in self.rows}):
            pool_rows = [r for r in self.rows if r.pool == pool]
            self.prior[pool] = float(np.mean([r.score for r in pool_rows]))
            self.idle[pool] = IdleLatency.fit(pool_rows)
        # Mean output tokens of each workflow stage per pool (1-based stage index), from finished requests.
        self.stage_tokens: dict[tuple[str, int], float] = {}
        self.decisions: collections.deque[dict] = collections.deque(maxlen=max_decisions)
        self.pending: collections.OrderedDict[str, PendingRequest] = collections.OrderedDict()
        # Embeddings that came after the wait but before their request was routed (it was still queued in
        # admission): the request routes with them when its turn comes.
        self.unrouted_embeddings: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.max_pending = max_pending

    # --- learning -------------------------------------------------------------------------------------------

    def table_prompts(self) -> list[str]:
        """Prompts of the offline table, to embed once before `fit_table`."""
        return [r.prompt for r in self.rows]

    def fit_table(self, embeddings) -> None:
        """Load the offline table's rows with their prompts' embeddings (same order as `table_prompts`)."""
        self._add_rows(self.rows, embeddings)

    def observe(self, outcome: RequestOutcome) -> None:
        """A finished request: its length teaches the length predictor (and the workflow stage lengths)."""
        pending = self.pending.get(outcome.request_id)
        if pending is None:
            return
        if pending.embedding is not None:
            self._tables(outcome.pool)[1].add(pending.embedding, outcome.output_tokens)
        if pending.stage is not None:
            key = (outcome.pool, pending.stage[0])
            previous = self.stage_tokens.get(key)
            self.stage_tokens[key] = outcome.output_tokens if previous is None else (
                0.8 * previous + 0.2 * outcome.output_tokens)

    def feedback(self, request_id: str, score: float) -> bool:
        """A verdict on a routed request (client feedback or a verifier reward); False if it is unknown."""
        if not 0.0 <= score <= 1.0:
            raise ValueError("score must be in [0, 1]")
        pending = self.pending.get(request_id)
        if pending is None or pending.embedding is None:
            return False
        self._tables(pending.pool)[0].add(pending.embedding, score)
        return True

    def relearn(self, pool: str, rows: list[LabelledOutcome], embeddings) -> None:
        """The pool's weights changed (a promoted RL version): what was learned of the old ones (table rows,
        feedback, finished lengths) no longer describes the pool. Its estimates restart from `rows`, the new
        weights' verifier scores and lengths on labelled prompts (same order as `embeddings`). Its idle latency
        stays: same architecture, same hardware."""
        if not rows or any(row.pool != pool for row in rows):
            raise ValueError(f"relearn: every row must be a labelled outcome of pool '{pool}'")
        self.quality.pop(pool, None)  # _add_rows starts the pool on empty tables
        self.length.pop(pool, None)
        self._add_rows(rows, embeddings)
        self.prior[pool] = float(np.mean([row.score for row in rows]))
        self.stage_tokens = {key: tokens for key, tokens in self.stage_tokens.items() if key[0] != pool}

    def attach_embedding(self, request_id: str, embedding) -> None:
        """A late embedding. A request routed without it still teaches with it (outcome and feedback); one not
        routed yet (waiting in admission) is routed with it."""
        vector = self._unit(np.asarray(embedding, np.float32))
        pending = self.pending.get(request_id)
        if pending is None:
            self.unrouted_embeddings[request_id] = vector
            while len(self.unrouted_embeddings) > self.max_pending:  # requests admission turned away
                self.unrouted_embeddings.popitem(last=False)
        elif pending.embedding is None:
            pending.embedding = vector

    def explain(self, limit: int = 20) -> list[dict]:
        """The most recent decisions, newest last, each with every candidate's predictions."""
        return list(self.decisions)[-limit:]

    # --- predicting -----------------------------------------------------------------------------------------

    def predict(self, pool: str, embedding: np.ndarray | None) -> tuple[float, float]:
        """(success probability, output tokens) of the pool's model on this prompt."""
        prior = self.prior.get(pool, 0.5)
        quality_table, length_table = self._tables(pool)
        default_length = length_table.mean(self.default_output_tokens)
        if embedding is None:
            return prior, default_length
        return (quality_table.estimate(embedding, self.k, prior, self.prior_weight),
                length_table.estimate(embedding, self.k, default_length, self.prior_weight))

    def workflow_remaining(self, pool: str, stage: tuple[int, int] | None, this_stage: float) -> float:
        if stage is None:
            return this_stage
        later = (self.stage_tokens.get((pool, j), self.default_output_tokens)
                 for j in range(stage[0] + 1, stage[1] + 1))
        return this_stage + sum(later)

    def latency(self, replica: ReplicaSnapshot, tokens: float, shared: tuple[int, float] | None = None
                ) -> tuple[float, int]:
        """Predicted seconds for `tokens` output tokens on this replica now, and the decode backlog it waits
        behind: its own, or `shared`, the (backlog, throughput) of the replicas sharing its compute."""
        backlog, throughput = shared or self._congestion((replica,))
        return self._idle(replica.pool).seconds(tokens) + backlog / throughput, backlog

    def shared_congestion(self, snapshot: FleetSnapshot) -> dict[str, tuple[int, float]]:
        """Replica id -> (backlog, throughput) of its node's CPU replicas (routable or not: a draining one still
        takes cycles), when CPU replicas share their node's cores; replicas absent here congest alone (an
        accelerator each)."""
        by_node: dict[str, list[ReplicaSnapshot]] = collections.defaultdict(list)
        if self.cpu_replicas_share_node:
            for pool in snapshot.pools.values():
                for r in pool.replicas:
                    if r.accelerator == "CPU" and r.node_id:
                        by_node[r.node_id].append(r)
        shared = {}
        for members in by_node.values():
            figure = self._congestion(members)
            shared.update((r.replica_id, figure) for r in members)
        return shared

    def _congestion(self, members) -> tuple[int, float]:
        """Decode backlog of `members` and the throughput that drains it: the busy members' measured rates,
        at least the single-stream rate of an idle one."""
        backlog = sum(r.predicted_remaining_tokens for r in members)
        throughput = max(sum(r.decode_tokens_per_s for r in members),
                         max(1.0 / self._idle(r.pool).per_token_s for r in members))
        return backlog, throughput

    def _idle(self, pool: str) -> IdleLatency:
        return self.idle.get(pool, IdleLatency(0.0, 0.01))

    def route(self, request: RequestInfo, snapshot: FleetSnapshot) -> RoutingDecision:
        replicas = candidates(request, snapshot)
        embedding = self.unrouted_embeddings.pop(request.request_id, None)
        if request.embedding is not None:
            embedding = self._unit(np.asarray(request.embedding, np.float32))
        weight = self.latency_weight if request.latency_weight is None else request.latency_weight
        stage = parse_stage(request.workflow_stage)
        per_pool = {pool: self.predict(pool, embedding) for pool in {r.pool for r in replicas}}
        shared = self.shared_congestion(snapshot)
        scored = []
        for replica in replicas:
            quality, tokens = per_pool[replica.pool]
            seconds, backlog = self.latency(replica, tokens, shared.get(replica.replica_id))
            scored.append(CandidatePrediction(
                pool=replica.pool, replica_id=replica.replica_id, quality=quality, output_tokens=tokens,
                workflow_remaining_tokens=self.workflow_remaining(replica.pool, stage, tokens), latency_s=seconds,
                backlog_tokens=backlog, objective=quality - weight * seconds))
        chosen, why = self._choose(scored, request)
        self._remember(request, embedding, chosen, stage, scored, weight, why)
        return RoutingDecision(pool=chosen.pool, replica_id=chosen.replica_id,
                               reason=f"chimera: {why}; quality {chosen.quality:.2f}, {chosen.output_tokens:.0f} "
                                      f"tokens, {1e3 * chosen.latency_s:.0f} ms predicted",
                               predicted_output_tokens=max(1, round(chosen.output_tokens)))

    @staticmethod
    def _choose(scored: list[CandidatePrediction], request: RequestInfo) -> tuple[CandidatePrediction, str]:
        if not scored:
            raise NoReplicaAvailable("no candidate")
        if request.pool is not None:
            return min(scored, key=lambda c: (c.latency_s, c.replica_id)), "fastest replica of the named pool"
        if request.latency_slo_s is not None:
            within = [c for c in scored if c.latency_s <= request.latency_slo_s]
            if within:
                return (max(within, key=lambda c: (c.quality, -c.latency_s)),
                        f"best quality within the {1e3 * request.latency_slo_s:.0f} ms SLO")
            return min(scored, key=lambda c: c.latency_s), "no candidate within the SLO: fastest"
        return max(scored, key=lambda c: (c.objective, -c.latency_s)), "max quality - lambda x latency"

    def _remember(self, request: RequestInfo, embedding, chosen: CandidatePrediction, stage, scored, weight,
                  why: str) -> None:
        self.pending[request.request_id] = PendingRequest(embedding, chosen.pool, stage)
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)
        best_per_pool = {}
        for c in sorted(scored, key=lambda c: -c.objective):
            best_per_pool.setdefault(c.pool, c)
        self.decisions.append({
            "request_id": request.request_id, "at": time.time(), "pool": chosen.pool,
            "replica_id": chosen.replica_id, "why": why, "latency_weight": weight,
            "latency_slo_s": request.latency_slo_s, "workflow_id": request.workflow_id,
            "workflow_stage": request.workflow_stage, "embedded": embedding is not None,
            "candidates": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(c).items()}
                           for c in best_per_pool.values()],
        })

    def _add_rows(self, rows: list[LabelledOutcome], embeddings) -> None:
        """Labelled outcomes into their pools' quality and length tables (embeddings in the same order)."""
        vectors = self._unit(np.asarray(embeddings, dtype=np.float32))
        for row, vector in zip(rows, vectors, strict=True):
            quality, length = self._tables(row.pool)
            quality.add(vector, row.score)
            length.add(vector, row.output_tokens)

    def _tables(self, pool: str) -> tuple[KnnTable, KnnTable]:
        if pool not in self.quality:
            self.quality[pool] = KnnTable(self.dim, self.capacity)
            self.length[pool] = KnnTable(self.dim, self.capacity)
        return self.quality[pool], self.length[pool]

    @staticmethod
    def _unit(vectors: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
        return vectors / np.where(norms == 0, 1.0, norms)

