"""Built-in scalers: keep the spec's count, follow tokens in flight (reactive), or forecast demand (predictive).

The controller clamps what a scaler wants to the pool's bounds and carries it out: new replicas start (they
serve after their start-up time), surplus ones are drained, and with a migration policy that drains
(`llumnix`) their running requests move out instead of holding the replica: scale-in by drain-by-migration.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from statistics import NormalDist

from rayfleet.policies.base import FleetSnapshot, PoolSnapshot


class StaticScaler:
    """Holds each pool at its desired count (changed only through the API or CLI)."""

    def desired_replicas(self, snapshot: FleetSnapshot) -> dict[str, int]:
        return {name: pool.desired_replicas for name, pool in snapshot.pools.items()}


class TokensInFlightScaler:
    """Replicas = ceil(tokens in flight / target per replica), moved one step per tick.

    One step per tick with a scale-down delay avoids flapping on bursty traffic (Ray Serve's autoscaler and
    Llumnix both damp the same way).
    """

    def __init__(self, target_tokens_per_replica: int = 4096, downscale_ticks: int = 30) -> None:
        self.target = target_tokens_per_replica
        self.downscale_ticks = downscale_ticks
        self._below: dict[str, int] = {}

    def desired_replicas(self, snapshot: FleetSnapshot) -> dict[str, int]:
        desired = {}
        for name, pool in snapshot.pools.items():
            live = [r for r in pool.replicas if r.routable]
            tokens = sum(r.tokens_in_flight for r in live)
            want = max(math.ceil(tokens / self.target), pool.min_replicas)
            current = pool.desired_replicas
            if want > current:
                self._below[name] = 0
                desired[name] = current + 1
            elif want < current:
                self._below[name] = self._below.get(name, 0) + 1
                desired[name] = current - 1 if self._below[name] >= self.downscale_ticks else current
            else:
                self._below[name] = 0
                desired[name] = current
        return desired


@dataclass
class _PoolForecast:
    """A pool's arrival rate: a sliding-window rate, its Holt's linear smoothing, and the errors of the
    forecasts it made one lead time ago (their spread is the forecast's uncertainty)."""

    level: float | None = None
    trend: float = 0.0
    error_variance: float | None = None  # of lead-time forecasts, measured when their time came
    last_at: float | None = None
    arrivals: deque = field(default_factory=deque)  # (time, requests that arrived since the previous look)
    pending: deque = field(default_factory=deque)  # (time it is for, forecast mean) not yet checked
    started: dict[str, int] = field(default_factory=dict)  # replica id -> requests_started last seen
    below_since: float | None = None  # when the forecast first allowed fewer replicas (scale-in delay)
    finished_g: float = 0.0  # mean KV token-steps of a finished request, E[g(s, o)]
    finished: int = 0
    outputs: dict[str, tuple[int, int]] = field(default_factory=dict)  # request id -> (prompt, output) last seen

    def window_rate(self, now: float, window_s: float) -> float:
        while self.arrivals and now - self.arrivals[0][0] >= window_s:
            self.arrivals.popleft()
        return sum(count for _, count in self.arrivals) / window_s


class PredictiveScaler:
    """Scale each pool ahead of its forecast demand, at an upper quantile of the forecast (HARMONY-style).

    HARMONY's point (uncertainty-aware forecasting and decisions for cloud resources) is to provision for a
    quantile of the forecast demand over the time a decision takes to act, not for its mean and not for what
    is already here. Per pool, every tick:

    - **arrival rate** from the replicas' `requests_started` counters over a sliding `window_s`, smoothed
      with Holt's linear method (level and trend);
    - **forecast** at the lead time `startup_s` (a replica started now serves only then): mean
      `level + trend * startup_s`; its spread is measured, not assumed: each forecast is checked against the
      rate observed when its time comes, and the mean squared error of those checks is the variance (a
      Poisson count's until the first forecast comes due). The `quantile` of that normal is the rate to
      provision for;
    - **service rate of one replica** from the stability condition of LLM serving under KV limits (Nie, Si &
      Zhou, arXiv 2605.04595): mu = M / (b * E[g]), M the replica's KV tokens, b the engine's step time,
      g(s, o) = o*s + o(o+1)/2 the KV token-steps a request of prompt s and output o holds over its life;
    - **replicas** = ceil(rate / (mu * target_utilization)), never fewer than today's tokens in flight need.
      The utilization target is where the pool still meets its latency SLO (the simulator's sweeps measure
      it). Scale-out is immediate; scale-in waits until the forecast has allowed fewer replicas for
      `downscale_delay_s`, then removes one per tick (the controller drains it by migration).

    Until `learn_after` requests have finished in a pool, E[g] is unknown and the scaler falls back to
    tokens in flight per replica (the reactive rule, without its damping).
    """

    def __init__(self, startup_s: float = 60.0, quantile: float = 0.9, target_utilization: float = 0.7,
                 downscale_delay_s: float = 120.0, window_s: float = 30.0, level_smoothing: float = 0.2,
                 trend_smoothing: float = 0.05, default_step_s: float = 0.05, learn_after: int = 20,
                 target_tokens_per_replica: int | None = None) -> None:
        self.startup_s = startup_s
        self.window_s = window_s
        self.z = NormalDist().inv_cdf(quantile)
        self.target_utilization = target_utilization
        self.downscale_delay_s = downscale_delay_s
        self.alpha = level_smoothing
        self.beta = trend_smoothing
        self.default_step_s = default_step_s
        self.learn_after = learn_after
        self.target_tokens = target_tokens_per_replica
        self._pools: dict[str, _PoolForecast] = {}

    def desired_replicas(self, snapshot: FleetSnapshot) -> dict[str, int]:
        return {name: self._decide(pool, self._pools.setdefault(name, _PoolForecast()), snapshot.taken_at)
                for name, pool in snapshot.pools.items()}

    # ---------------------------------------------------------------- observations
    def _observe(self, pool: PoolSnapshot, state: _PoolForecast, now: float) -> None:
        arrivals = 0
        started = {}
        for replica in pool.replicas:
            started[replica.replica_id] = replica.requests_started
            arrivals += max(replica.requests_started - state.started.get(replica.replica_id, 0), 0)
        state.started = started
        self._learn_requests(pool, state)
        if state.last_at is None:  # the counters so far are history, not this tick's arrivals
            state.last_at = now
            return
        elapsed = now - state.last_at
        if elapsed <= 0:
            return
        state.last_at = now
        state.arrivals.append((now, arrivals))
        rate = state.window_rate(now, self.window_s)
        while state.pending and state.pending[0][0] <= now:
            _, forecast = state.pending.popleft()
            error = (rate - forecast) ** 2
            state.error_variance = error if state.error_variance is None else (
                state.error_variance + self.alpha * (error - state.error_variance))
        if state.level is None:
            state.level = rate
        else:
            predicted = state.level + state.trend * elapsed
            level, state.level = state.level, max(predicted + self.alpha * (rate - predicted), 0.0)
            state.trend += self.beta * ((state.level - level) / elapsed - state.trend)
        state.pending.append((now + self.startup_s, self.mean_forecast(state)))

    @staticmethod
    def _learn_requests(pool: PoolSnapshot, state: _PoolForecast) -> None:
        seen = {r.request_id: (r.prompt_tokens, r.output_tokens) for replica in pool.replicas for r in replica.requests}
        for request_id, (s, o) in state.outputs.items():
            if request_id not in seen and o > 0:
                state.finished += 1
                g = o * s + o * (o + 1) / 2
                state.finished_g += (g - state.finished_g) / min(state.finished, 500)
        state.outputs = seen

    # ---------------------------------------------------------------- decisions
    def mean_forecast(self, state: _PoolForecast) -> float:
        return max(state.level + state.trend * self.startup_s, 0.0) if state.level is not None else 0.0

    def forecast(self, state: _PoolForecast) -> float:
        """Upper-quantile arrival rate one lead time ahead (requests per second)."""
        mean = self.mean_forecast(state)
        # Until forecasts have come due, the spread of a Poisson count over the window.
        variance = state.error_variance if state.error_variance is not None else mean / self.window_s
        return mean + self.z * math.sqrt(variance)

    def service_rate(self, pool: PoolSnapshot, state: _PoolForecast) -> float:
        """Requests per second one replica sustains (mu); 0 while E[g] is not known yet."""
        if state.finished < self.learn_after or state.finished_g <= 0:
            return 0.0
        live = [r for r in pool.replicas if r.routable and r.kv_tokens_total]
        if not live:
            return 0.0
        kv_tokens = sum(r.kv_tokens_total for r in live) / len(live)
        steps = [r.num_running / r.decode_tokens_per_s for r in live if r.decode_tokens_per_s > 0 and r.num_running]
        step_s = max(steps) if steps else self.default_step_s
        return kv_tokens / (step_s * state.finished_g)

    def _decide(self, pool: PoolSnapshot, state: _PoolForecast, now: float) -> int:
        self._observe(pool, state, now)
        live = [r for r in pool.replicas if r.routable]
        per_replica_tokens = self.target_tokens or (
            self.target_utilization * max((r.kv_tokens_total for r in live), default=0))
        tokens = sum(r.tokens_in_flight for r in live)
        floor = math.ceil(tokens / per_replica_tokens) if per_replica_tokens else pool.desired_replicas
        mu = self.service_rate(pool, state)
        want = math.ceil(self.forecast(state) / (mu * self.target_utilization)) if mu else floor
        want = min(max(want, floor, pool.min_replicas), pool.max_replicas)
        current = pool.desired_replicas
        if want >= current:
            state.below_since = None
            return want
        state.below_since = now if state.below_since is None else state.below_since
        if now - state.below_since >= self.downscale_delay_s:
            state.below_since = now  # one replica per delay: drains are migrations, spread them out
            return current - 1
        return current
