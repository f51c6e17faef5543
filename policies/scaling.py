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
class _Forecast:
    """Holt's linear smoothing of one series, and the spread of its own forecasts one lead time ahead,
    measured when their time comes (so the uncertainty is the forecaster's real error, not an assumption)."""

    alpha: float
    beta: float
    lead_s: float
    level: float | None = None
    trend: float = 0.0
    error_variance: float | None = None
    last_at: float | None = None
    pending: deque = field(default_factory=deque)  # (time it is for, forecast made then)

    def observe(self, value: float, now: float) -> None:
        while self.pending and self.pending[0][0] <= now:
            _, forecast = self.pending.popleft()
            error = (value - forecast) ** 2
            self.error_variance = error if self.error_variance is None else (
                self.error_variance + self.alpha * (error - self.error_variance))
        if self.level is None:
            self.level = value
        elif now > self.last_at:
            elapsed = now - self.last_at
            predicted = self.level + self.trend * elapsed
            level, self.level = self.level, max(predicted + self.alpha * (value - predicted), 0.0)
            self.trend += self.beta * ((self.level - level) / elapsed - self.trend)
        self.last_at = now
        self.pending.append((now + self.lead_s, self.mean()))

    def mean(self) -> float:
        return max(self.level + self.trend * self.lead_s, 0.0) if self.level is not None else 0.0

    def upper(self, z: float, floor_variance: float = 0.0) -> float:
        """The forecast's `z`-quantile one lead time ahead (normal errors)."""
        variance = self.error_variance if self.error_variance is not None else floor_variance
        return self.mean() + z * math.sqrt(max(variance, floor_variance))


@dataclass
class _Season:
    """Arrivals per bin of time over the last `seasons` periods (days), to look up what came at the same time of
    day before: the regularity (a daily rush, a nightly batch) that a short-term forecast cannot see coming and a
    seasonal one can (AWS predictive scaling learns the same from the past days' load). Cheap at any scale: a tick
    adds to one bin, and a forecast, which changes only when a bin is complete, is a few dozen look-ups a bin."""

    season_s: float
    bin_s: float
    seasons: int
    jitter_s: float
    counts: dict[int, int] = field(default_factory=dict)  # bin (time // bin_s) -> arrivals counted in it
    now_bin: int | None = None
    cached: tuple[int, float | None] | None = None  # (bin, forecast made in it)

    LEVEL_BINS = 10  # complete bins that compare today's level with a past season's (5 min at 30 s bins)

    @property
    def period(self) -> int:
        return round(self.season_s / self.bin_s)

    def observe(self, arrivals: int, now: float) -> None:
        self.now_bin = int(now // self.bin_s)
        if self.now_bin not in self.counts:  # a new bin: forget the ones no season looks back to
            oldest = self.now_bin - (self.seasons + 1) * self.period - self.LEVEL_BINS
            while self.counts and next(iter(self.counts)) < oldest:
                del self.counts[next(iter(self.counts))]
        self.counts[self.now_bin] = self.counts.get(self.now_bin, 0) + arrivals

    def forecast(self, lead_s: float) -> float | None:
        """Arrivals per second to expect one `lead_s` ahead, from the past seasons; None without history."""
        if self.now_bin is None:
            return None
        if self.cached is None or self.cached[0] != self.now_bin:
            past = [self._from_season(back * self.period, lead_s) for back in range(1, self.seasons + 1)]
            known = [rate for rate in past if rate is not None]
            # The lowest over the seasons remembered: a crowd is provisioned for once it came in each of them (a
            # one-off crowd yesterday is not a pattern), and the day-to-day jitter is covered by each one's window.
            self.cached = (self.now_bin, min(known) if known else None)
        return self.cached[1]

    def _from_season(self, back: int, lead_s: float) -> float | None:
        """The highest rate `back` bins ago within +-jitter of now + lead (a recurring crowd drifts by minutes),
        scaled by how the last LEVEL_BINS complete bins compare with the same bins then (today's level)."""
        recent = [(self.counts[b], self.counts[b - back]) for b in range(self.now_bin - self.LEVEL_BINS, self.now_bin)
                  if b in self.counts and b - back in self.counts]
        then = sum(count for _, count in recent)
        if not then:
            return None
        target = self.now_bin * self.bin_s + lead_s
        window = range(int((target - self.jitter_s) // self.bin_s) - back,
                       int((target + self.jitter_s) // self.bin_s) - back + 1)
        rates = [self.counts[b] for b in window if b in self.counts]
        if not rates:
            return None
        return max(rates) / self.bin_s * sum(today for today, _ in recent) / then


@dataclass
class _PoolForecast:
    rate: _Forecast  # arrivals per second, over a sliding window
    held: _Forecast  # tokens in flight, for the scale-in guard
    tokens: float = 0.0  # tokens in flight now (the KV the pool's requests hold)
    arrivals: deque = field(default_factory=deque)  # (time, requests that arrived since the previous look)
    started: dict[str, int] = field(default_factory=dict)  # replica id -> requests_started last seen
    below_since: float | None = None  # when the forecast first allowed fewer replicas (scale-in delay)
    finished_g: float = 0.0  # mean KV token-steps of a finished request, E[g(s, o)]
    finished: int = 0
    outputs: dict[str, tuple[int, int]] = field(default_factory=dict)  # request id -> (prompt, output) last seen
    season: _Season | None = None  # arrivals by time of day, with `season_s`

    def window_rate(self, now: float, window_s: float) -> float:
        while self.arrivals and now - self.arrivals[0][0] >= window_s:
            self.arrivals.popleft()
        return sum(count for _, count in self.arrivals) / window_s


class PredictiveScaler:
    """Scale each pool ahead of its forecast demand, at an upper quantile of the forecast (HARMONY-style).

    HARMONY's point (uncertainty-aware forecasting and decisions for cloud resources) is to provision for a
    quantile of the forecast demand over the time a decision takes to act, not for its mean and not for what
    is already here. Demand is the KV the pool's requests hold (tokens in flight: what exhausts a replica).
    What is forecast is the arrival rate, the demand's exogenous driver (tokens in flight also depend on the
    capacity serving them: extrapolating them chases the scaler's own effect). Per pool, every tick:

    - **arrival rate** from the replicas' `requests_started` counters over a sliding `window_s`, forecast one
      lead time (`startup_s`: a replica started now serves only then) ahead with Holt's linear method (level
      and trend), with its measured uncertainty (every forecast is checked against the rate observed when its
      time comes; the mean squared error is the variance) and taken at the `quantile`;
    - turned into the KV demand it implies once enough requests have finished to know their size: by Little's
      law a pool receiving lambda requests per second holds lambda * b * E[g] tokens, where g(s, o) = o*s +
      o(o+1)/2 is the KV token-steps a request of prompt s and output o holds over its life and b the engine's
      step time. This is the stability condition of LLM serving under KV limits (Nie, Si & Zhou, arXiv
      2605.04595): a replica of M KV tokens sustains at most mu = M / (b * E[g]) requests per second;
    - never below the **tokens in flight** now.

    The pool gets ceil(demand / (target_utilization * M)) replicas. The utilization target is where the pool
    still meets its latency SLO (the simulator's sweeps measure it). Scale-out is immediate; scale-in waits until
    the forecast has allowed fewer replicas for `downscale_delay_s`, then removes one per tick (the controller
    drains each by migration).

    Defaults: the mean forecast (`quantile` 0.5) at 40% of the KV. Over ten simulated diurnal-with-flash-crowd
    traces the replicas the 0.9 quantile added avoided fewer SLO violations than the same replica-hours spent on
    a lower utilization target: the measured forecast error swells after a flash crowd has passed, when the
    capacity is no longer needed, and is small before the next one (`docs/benchmarks-simulator.md`).

    **Seasonality** (`season_s`, off by default): where load repeats with a period (a day), the scaler counts
    arrivals in bins of `season_bin_s` and also forecasts the rate one lead time ahead from the past `seasons`
    periods: each one's highest bin within +-`season_jitter_s` of that time of day, scaled by today's level
    against that period's, the lowest over the periods, provisioned for when above the Holt forecast. A crowd
    that comes every day at about the same time is provisioned for before it starts, which no short-term
    forecast can do (a flash crowd reaches its peak in about a start-up time); without history (the first
    period) the scaler is the Holt one alone. Over the simulator's three-day traces (one of each day's three
    crowds recurring, five seeds) days 2 and 3 had 23-48% fewer SLO violations than the reactive scaler at
    2-4% fewer replica-hours, at each utilization tried; counting the first day too, two of the three settings
    still had 23-27% fewer (`docs/benchmarks-simulator.md`).

    Scale-in is also guarded (`guard_scale_in`): a replica removed now takes `startup_s` to come back, so the
    pool keeps it while tokens in flight one start-up time ahead, at the same quantile of their own Holt
    forecast and measured error, would still fill the replicas it has. Without the guard, a lull between
    the swings of a bursty load drained replicas the next swing needed (each drain also migrates requests),
    and SLO violations came from that churn more than from a lack of replicas: in the simulator's
    diurnal-with-bursts traces the guard cut violations 1.7-3.0x summed over 5 seeds (1.1-16x seed by seed)
    for 2-3% more replica-hours (`docs/benchmarks-simulator.md`).
    """

    def __init__(self, startup_s: float = 60.0, quantile: float = 0.5, target_utilization: float = 0.4,
                 downscale_delay_s: float = 30.0, window_s: float = 30.0, level_smoothing: float = 0.2,
                 trend_smoothing: float = 0.05, default_step_s: float = 0.05, learn_after: int = 20,
                 signals: list[str] | None = None, guard_scale_in: bool = True, season_s: float | None = None,
                 season_bin_s: float = 30.0, season_jitter_s: float = 60.0, seasons: int = 2) -> None:
        unknown = set(signals or ()) - {"tokens", "rate"}
        if unknown:
            raise ValueError(f"signals: unknown {sorted(unknown)}; allowed: tokens, rate")
        if season_s is not None and (season_s <= 0 or season_bin_s <= 0 or seasons < 1 or
                                     abs(season_s / season_bin_s - round(season_s / season_bin_s)) > 1e-9):
            raise ValueError(f"season_s: {season_s} must be a positive multiple of season_bin_s ({season_bin_s}), "
                             f"with seasons ({seasons}) >= 1")
        self.startup_s = startup_s
        self.window_s = window_s
        self.z = NormalDist().inv_cdf(quantile)
        self.target_utilization = target_utilization
        self.downscale_delay_s = downscale_delay_s
        self.alpha = level_smoothing
        self.beta = trend_smoothing
        self.default_step_s = default_step_s
        self.learn_after = learn_after
        self.signals = frozenset(signals or ("tokens", "rate"))
        self.guard_scale_in = guard_scale_in
        self.season = (dict(season_s=season_s, bin_s=season_bin_s, seasons=seasons, jitter_s=season_jitter_s)
                       if season_s is not None else None)
        self._pools: dict[str, _PoolForecast] = {}

    def desired_replicas(self, snapshot: FleetSnapshot) -> dict[str, int]:
        for gone in self._pools.keys() - snapshot.pools.keys():  # a removed pool's history (restored ones too)
            del self._pools[gone]
        return {name: self._decide(pool, self._state(name), snapshot.taken_at) for name, pool in snapshot.pools.items()}

    # ---------------------------------------------------------------- history kept across controller restarts
    def state_dict(self) -> dict:
        """The seasonal history (arrivals per bin of wall-clock time, each pool's last `seasons` periods): what
        takes days to learn. The Holt forecasts relearn in minutes and are not kept."""
        if self.season is None:
            return {}
        return {"bin_s": self.season["bin_s"],
                "pools": {name: [[b, n] for b, n in state.season.counts.items()]
                          for name, state in self._pools.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Take back a `state_dict()` (after a controller restart); ignored when the bins were of another size or
        seasonality is off. Bins counted since this process started are added to the restored ones."""
        if self.season is None or state.get("bin_s") != self.season["bin_s"]:
            return
        for name, bins in state.get("pools", {}).items():
            season = self._state(name).season
            merged = {int(b): int(n) for b, n in bins}
            for b, n in season.counts.items():
                merged[b] = merged.get(b, 0) + n
            season.counts = dict(sorted(merged.items()))  # oldest first: `observe` forgets from the front
            season.cached = None

    def _state(self, pool: str) -> _PoolForecast:
        if pool not in self._pools:
            self._pools[pool] = _PoolForecast(rate=_Forecast(self.alpha, self.beta, self.startup_s),
                                              held=_Forecast(self.alpha, self.beta, self.startup_s),
                                              season=_Season(**self.season) if self.season else None)
        return self._pools[pool]

    # ---------------------------------------------------------------- observations
    def _observe(self, pool: PoolSnapshot, state: _PoolForecast, now: float) -> None:
        arrivals = 0
        started = {}
        for replica in pool.replicas:
            started[replica.replica_id] = replica.requests_started
            arrivals += max(replica.requests_started - state.started.get(replica.replica_id, 0), 0)
        first = not state.started and state.rate.last_at is None
        state.started = started
        self._learn_requests(pool, state)
        state.tokens = float(sum(r.tokens_in_flight for r in pool.replicas))
        state.held.observe(state.tokens, now)
        if first:  # the counters so far are history, not this tick's arrivals
            state.rate.last_at = now
            return
        state.arrivals.append((now, arrivals))
        if state.season is not None:
            state.season.observe(arrivals, now)
        state.rate.observe(state.window_rate(now, self.window_s), now)

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
    def _needed_within_startup(self, state: _PoolForecast, per_replica: float, current: int) -> bool:
        """The scale-in guard: tokens in flight one start-up time ahead, at the upper quantile of their own
        forecast, would still fill `current` replicas (a replica removed now takes that long to come back)."""
        return self.guard_scale_in and math.ceil(state.held.upper(self.z) / per_replica) >= current

    def step_seconds(self, pool: PoolSnapshot) -> float:
        """The pool's engine step time: running requests over tokens per second, summed over replicas (one
        replica's ratio is noisy: one that just got busy reports a rate averaged over a mostly idle window)."""
        live = [r for r in pool.replicas if r.routable and r.decode_tokens_per_s > 0]
        running = sum(r.num_running for r in live)
        rate = sum(r.decode_tokens_per_s for r in live)
        return running / rate if running and rate else self.default_step_s

    def service_rate(self, pool: PoolSnapshot, state: _PoolForecast) -> float:
        """Requests per second one replica sustains (mu = M / (b * E[g])); 0 while E[g] is not known yet."""
        kv = [r.kv_tokens_total for r in pool.replicas if r.routable and r.kv_tokens_total]
        if state.finished < self.learn_after or state.finished_g <= 0 or not kv:
            return 0.0
        return (sum(kv) / len(kv)) / (self.step_seconds(pool) * state.finished_g)

    def demand(self, pool: PoolSnapshot, state: _PoolForecast) -> float:
        """KV demand (tokens) to provision for: the upper-quantile forecast of what the arrival rate one lead
        time ahead implies (or the seasonal forecast, if higher), and never less than what the pool holds now."""
        forecasts = []
        if "tokens" in self.signals:
            forecasts.append(state.tokens)
        kv = [r.kv_tokens_total for r in pool.replicas if r.routable and r.kv_tokens_total]
        mu = self.service_rate(pool, state)
        if "rate" in self.signals and mu:
            # Until forecasts come due, the spread of a Poisson count over the window.
            rate = state.rate.upper(self.z, floor_variance=state.rate.mean() / self.window_s)
            seasonal = state.season.forecast(self.startup_s) if state.season is not None else None
            rate = max(rate, seasonal or 0.0)
            forecasts.append(rate / mu * (sum(kv) / len(kv)))
        return max(forecasts, default=0.0)

    def _decide(self, pool: PoolSnapshot, state: _PoolForecast, now: float) -> int:
        self._observe(pool, state, now)
        kv = [r.kv_tokens_total for r in pool.replicas if r.routable and r.kv_tokens_total]
        if not kv:
            return pool.desired_replicas  # nothing reported yet: nothing to size against
        per_replica = self.target_utilization * sum(kv) / len(kv)
        want = min(max(math.ceil(self.demand(pool, state) / per_replica), pool.min_replicas), pool.max_replicas)
        current = pool.desired_replicas
        if want >= current or self._needed_within_startup(state, per_replica, current):
            state.below_since = None
            return max(want, current)
        state.below_since = now if state.below_since is None else state.below_since
        # One replica per tick once the forecast has stayed below for the delay: each removal is a drain.
        return current - 1 if now - state.below_since >= self.downscale_delay_s else current
