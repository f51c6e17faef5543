"""Request traces for the simulator: bursty Gamma arrivals, long-tailed lengths, diurnal load, replays.

Every generator is seeded and returns `TraceRequest`s sorted by arrival. The shapes follow public traces:
arrivals as a Gamma renewal process (`vllm bench serve --burstiness`; Llumnix §6.1 varies the Gamma CV to set
burstiness), log-normal lengths clipped to a range (ShareGPT and BurstGPT lengths are long-tailed: Llumnix
Table 1 lists BurstGPT inputs mean 830 / p99 3549 and outputs mean 271 / p99 964 tokens).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int  # the request's real length (the engine stops there)
    max_tokens: int  # what the client asked for (what policies see as an upper bound)
    priority: int = 0


def lognormal_tokens(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return min(max(int(rng.lognormvariate(math.log(median), sigma)), low), high)


def gamma_arrivals(rng: random.Random, rate: float, shape: float, count: int, start_s: float = 0.0) -> list[float]:
    """Renewal process with Gamma(shape, 1 / (rate * shape)) gaps: mean rate `rate`, CV 1 / sqrt(shape)."""
    times, now = [], start_s
    for _ in range(count):
        now += rng.gammavariate(shape, 1.0 / (rate * shape))
        times.append(now)
    return times


def bursty(count: int, rate: float, shape: float = 0.25, prompt_median: float = 600, prompt_sigma: float = 1.0,
           prompt_range: tuple[int, int] = (16, 4000), output_median: float = 200, output_sigma: float = 0.9,
           output_range: tuple[int, int] = (8, 1500), exact_max_tokens: bool = False,
           seed: int = 0) -> list[TraceRequest]:
    """Gamma arrivals and log-normal prompt and output lengths (a BurstGPT-shaped trace by default)."""
    rng = random.Random(seed)
    requests = []
    for arrival in gamma_arrivals(rng, rate, shape, count):
        prompt = lognormal_tokens(rng, prompt_median, prompt_sigma, *prompt_range)
        output = lognormal_tokens(rng, output_median, output_sigma, *output_range)
        requests.append(TraceRequest(arrival, prompt, output, output if exact_max_tokens else output_range[1]))
    return requests


def recurring_crowds(duration_s: float, period_s: float, count: int, burst_s: float, jitter_s: float,
                     seed: int) -> list[float]:
    """Start times of `count` flash crowds that recur every period at about the same time of day (a 9 am rush, a
    nightly batch): each crowd's time of day is drawn once, and each period it starts within +-`jitter_s` of it."""
    rng = random.Random(f"recurring-{seed}")  # its own stream: the random crowds and arrivals keep theirs
    phases = [rng.uniform(jitter_s, period_s - burst_s - jitter_s) for _ in range(count)]
    starts = [day * period_s + phase + rng.uniform(-jitter_s, jitter_s)
              for day in range(math.ceil(duration_s / period_s)) for phase in phases]
    return [start for start in starts if start <= duration_s - burst_s]


def diurnal_with_bursts(duration_s: float, base_rate: float, amplitude: float = 0.6, period_s: float = 3600.0,
                        bursts: int = 3, burst_factor: float = 2.5, burst_s: float = 120.0, shape: float = 0.5,
                        seed: int = 0, recurring: int = 0, recurring_jitter_s: float = 60.0,
                        **lengths) -> list[TraceRequest]:
    """A day compressed into `period_s`: rate(t) = base * (1 + amplitude * sin(2 pi t / period)), lowest at 0,
    times up to `burst_factor` during `bursts` flash crowds of `burst_s` at random times (the factor rises
    linearly to its peak at the middle and falls back: crowds build over minutes, as in public traces);
    Gamma arrivals by thinning.

    A `duration_s` of several periods is several days, each the same diurnal shape; `bursts` random crowds fall
    anywhere in the whole trace, and `recurring` more fall each day at about the same time of day
    (`recurring_crowds`): the regularity a seasonal forecast can learn, and a random crowd is not."""
    rng = random.Random(seed)
    windows = sorted(rng.uniform(0, duration_s - burst_s) for _ in range(bursts))
    if recurring:
        windows = sorted(windows + recurring_crowds(duration_s, period_s, recurring, burst_s, recurring_jitter_s,
                                                    seed))

    def crowd(t: float) -> float:
        return max((1 - abs(2 * (t - w) / burst_s - 1) for w in windows if w <= t < w + burst_s), default=0.0)

    def rate(t: float) -> float:
        r = base_rate * (1 + amplitude * math.sin(2 * math.pi * t / period_s - math.pi / 2))
        return r * (1 + (burst_factor - 1) * crowd(t))

    peak = base_rate * (1 + amplitude) * burst_factor
    candidates = gamma_arrivals(rng, peak, shape, int(peak * duration_s * 1.2) + 10)
    shaped = bursty(len(candidates), 1.0, seed=seed + 1, **lengths)
    return [TraceRequest(t, r.prompt_tokens, r.output_tokens, r.max_tokens)
            for t, r in zip(candidates, shaped) if t < duration_s and rng.random() < rate(t) / peak]


def replay_vllm_bench(path: Path) -> list[TraceRequest]:
    """The requests of a `vllm bench serve` result saved with its per-request lists (start times, lengths),
    as the bursty benchmark writes them: the same arrivals and lengths the live fleet served."""
    data = json.loads(Path(path).read_text())
    starts, inputs, outputs = data["start_times"], data["input_lens"], data["output_lens"]
    first = min(starts)
    return sorted((TraceRequest(s - first, i, o, o) for s, i, o in zip(starts, inputs, outputs)),
                  key=lambda r: r.arrival_s)
