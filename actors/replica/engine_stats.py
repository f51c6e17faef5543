"""Load signals read from a vLLM engine each step, through vLLM's own stat-logger hook.

vLLM calls every stat logger given to `AsyncLLM(stat_loggers=[...])` once per engine step with the
scheduler's stats (running and waiting requests, KV cache usage) and the iteration's stats (tokens
generated). `EngineLoad` keeps the latest values and a sliding window of decode throughput, which the
replica reports to the controller.

Beside it, vLLM's own `RayPrometheusStatLogger` exports vLLM's engine metrics through Ray. Its gauges are
set on engine steps only, and Ray evicts a gauge nobody set for two report intervals, so an idle engine's
running/waiting/KV-usage series would vanish; `EngineLoad.republish_engine_gauges` sets them again with the
last values whenever the controller reads the replica's load.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase


@dataclass
class EngineLoad:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    steps: int = 0
    last_step_at: float = 0.0  # monotonic time of the engine's last completed step
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    window_s: float = 10.0
    engine_metrics: Any = None  # the engine's RayPrometheusStatLogger, once vLLM has built it
    _generated: collections.deque = field(default_factory=collections.deque)

    def record_generated(self, tokens: int, now: float) -> None:
        if tokens:
            self._generated.append((now, tokens))
        self._trim(now)

    def decode_tokens_per_s(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        if not self._generated:
            return 0.0
        span = max(now - self._generated[0][0], 1.0)
        return sum(tokens for _, tokens in self._generated) / span

    def republish_engine_gauges(self) -> None:
        if self.engine_metrics is not None:
            from vllm.v1.metrics.stats import SchedulerStats

            # Only gauges move: the fresh stats' counters (prefix cache queries, hits) are all zero.
            self.engine_metrics.record(SchedulerStats(num_running_reqs=self.num_running,
                                                      num_waiting_reqs=self.num_waiting,
                                                      kv_cache_usage=self.kv_cache_usage), None)

    def _trim(self, now: float) -> None:
        while self._generated and now - self._generated[0][0] > self.window_s:
            self._generated.popleft()


def stat_logger_factory(load: EngineLoad):
    """A per-engine stat-logger factory (vLLM calls it with `(vllm_config, engine_index)`)."""

    class _EngineLoadLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.load = load

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            now = time.monotonic()
            if scheduler_stats is not None:
                self.load.num_running = scheduler_stats.num_running_reqs
                self.load.num_waiting = scheduler_stats.num_waiting_reqs
                self.load.kv_cache_usage = scheduler_stats.kv_cache_usage
                self.load.steps += 1
                self.load.last_step_at = now
                prefix = scheduler_stats.prefix_cache_stats
                if prefix is not None:
                    self.load.prefix_cache_queries += prefix.queries
                    self.load.prefix_cache_hits += prefix.hits
            if iteration_stats is not None:
                self.load.record_generated(iteration_stats.num_generation_tokens, now)

        def log_engine_initialized(self):
            pass

    return _EngineLoadLogger


def engine_metrics_logger(load: EngineLoad):
    """vLLM's `RayPrometheusStatLogger` (as Ray Serve LLM passes it), made known to `load` when vLLM builds it."""
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    class _EngineMetrics(RayPrometheusStatLogger):
        def __init__(self, vllm_config, engine_indexes=None):
            super().__init__(vllm_config, engine_indexes)
            load.engine_metrics = self

    return _EngineMetrics
