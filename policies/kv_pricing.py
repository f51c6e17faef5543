"""Whether a KV store lookup or load can pay: the engine's own prefill time against the wait the store costs.

A request that asks the fleet's KV store for its prefix waits for the lookup, and on a hit until its blocks are
loaded (vLLM's `WAITING_FOR_REMOTE_KVS`). A schedule holds its step a little for the lookups it starts (the
grace: `lookup_grace_s`, at most a tenth of a step); a lookup the store answers within it costs its time to
every request of the step it holds, one that is not answered costs the grace to them and a whole step to the
asking request, which the scheduler skips and steps on. Computing those blocks instead costs their prefill,
and not only to that request: a step that prefills them is longer for every request in the batch (prefill
interference), so their prefill time counts once per request in the engine's usual batch. A lookup pays only
when that exceeds the wait, and a load only when it exceeds the load's. Both sides are measured on the engine
that decides: its step time as a line in the tokens a step schedules (the slope is the price of a prefill token,
fitted by exponentially weighted least squares so it follows the load), the requests per step, and the store's
lookup and load latencies as the engine saw them.

Measured (docs/benchmarks-kv-store.md): a small model on a loaded CPU prefills a 32-token block in a few
milliseconds while a lookup costs a step, so most lookups (a chat turn's few new blocks) cannot pay and the
store made the median request slower; a long shared prefix recomputed on another replica still pays. On a GPU
with a large model a block's prefill costs more than a same-node load, and the same rule loads nearly always.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WeightedLine:
    """y ~ intercept + slope * x by exponentially weighted least squares: each new point weighs 1, older ones
    `decay` times less per point (`1 / (1 - decay)` points of memory)."""

    decay: float = 0.98
    weight: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    points: int = 0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.weight = self.weight * d + 1.0
        self.sx = self.sx * d + x
        self.sy = self.sy * d + y
        self.sxx = self.sxx * d + x * x
        self.sxy = self.sxy * d + x * y
        self.points += 1

    @property
    def mean_y(self) -> float:
        return self.sy / self.weight if self.weight else 0.0

    @property
    def slope(self) -> float | None:
        """None while x has not varied enough to tell a slope from the intercept."""
        spread = self.weight * self.sxx - self.sx * self.sx
        if self.weight == 0 or spread <= 1e-9 * self.weight * self.sxx:
            return None
        return max(0.0, (self.weight * self.sxy - self.sx * self.sy) / spread)


@dataclass
class Ewma:
    alpha: float = 0.2
    value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + self.alpha * (sample - self.value)


@dataclass
class StorePricing:
    """One engine's price of a prefill token and of the store's wait; decides lookups and loads.

    Until it has seen `min_steps` steps with a measurable slope it has no price and says yes (the store's
    behaviour without pricing). A load it refuses teaches it nothing about loads, so one in `explore_every`
    refused loads is taken anyway and keeps the load latency current.
    """

    block_size: int
    grace_s: float = 0.0  # the most a schedule waits for its lookups (KVStoreConfig.lookup_grace_s)
    min_steps: int = 32
    explore_every: int = 16
    steps: WeightedLine = field(default_factory=WeightedLine)
    batch: Ewma = field(default_factory=Ewma)  # requests per step
    lookup_s: Ewma = field(default_factory=Ewma)  # of lookups answered within their schedule's grace
    in_schedule: Ewma = field(default_factory=Ewma)  # the share of lookups answered there
    load_s: Ewma = field(default_factory=Ewma)
    refused_loads: int = 0

    def observe_step(self, tokens: int, seconds: float, requests: int) -> None:
        """One engine step that scheduled `tokens` tokens of `requests` requests took `seconds`."""
        self.steps.add(float(tokens), seconds)
        self.batch.add(float(requests))

    def observe_lookup(self, seconds: float, in_schedule: bool) -> None:
        """A lookup the store answered `in_schedule` (within the grace of the schedule that asked) in `seconds`,
        or one the asking request had to wait a step or more for."""
        self.in_schedule.add(1.0 if in_schedule else 0.0)
        if in_schedule:
            self.lookup_s.add(seconds)

    def observe_load(self, seconds: float) -> None:
        """A load of claimed blocks took `seconds` from the claim until the engine could schedule the request."""
        self.load_s.add(seconds)

    def prefill_s(self, blocks: int) -> float | None:
        """What computing `blocks` blocks costs the requests of the batch they join (the usual batch and the
        asking request); None: no price yet."""
        slope = self.steps.slope
        if slope is None or self.steps.points < self.min_steps:
            return None
        return slope * blocks * self.block_size * ((self.batch.value or 0.0) + 1)

    def lookup_pays(self, blocks: int) -> bool:
        """Is asking the store for `blocks` blocks worth a step's wait, plus the load's if they are held?"""
        prefill = self.prefill_s(blocks)
        return prefill is None or prefill > self.lookup_wait_s()

    def schedule_grace_s(self) -> float:
        """How long a schedule waits for its lookups: the grace, at most a tenth of a step (the wait holds up
        every running request)."""
        return min(self.grace_s, self.steps.mean_y / 10) if self.steps.points else self.grace_s

    def lookup_wait_s(self) -> float:
        """What asking costs: the lookup (answered within the grace, its time to every request of the step it
        holds; not, the grace to them and a step to the asking request; weighed by how often each happens, and a
        step while no lookup has been timed), then the load (a step while no load has been timed)."""
        grace, step = self.schedule_grace_s(), self.steps.mean_y
        share = self.in_schedule.value
        if share is None:
            asking = step
        else:
            riders = (self.batch.value or 0.0) + 1
            answered = (self.lookup_s.value or 0.0) * riders  # none yet: no lookup was answered in time
            asking = share * answered + (1 - share) * (grace * riders + step)
        load = self.load_s.value if self.load_s.value is not None else step
        return asking + load

    def break_even_blocks(self) -> int | None:
        """The fewest blocks a lookup must be able to bring to be made; None: no price yet (all are made)."""
        per_block = self.prefill_s(1)
        if not per_block:  # no price yet, or computing is free: every lookup is made, or none pays
            return None
        return int(self.lookup_wait_s() / per_block) + 1

    def describe(self) -> str:
        per_block = self.prefill_s(1)
        if per_block is None:
            return f"no price yet ({self.steps.points} steps timed)"
        lookup = _ms(self.lookup_s.value)
        if self.in_schedule.value is not None:
            lookup += f" ({self.in_schedule.value:.0%} in the asking step)"
        return (f"prefill {per_block * 1e3:.2f} ms per block, step {self.steps.mean_y * 1e3:.1f} ms, lookup "
                f"{lookup}, load {_ms(self.load_s.value)}: lookups of >= {self.break_even_blocks()} blocks pay")

    def load_pays(self, blocks: int) -> bool:
        """Is loading `blocks` blocks the store holds faster than computing them?"""
        prefill = self.prefill_s(blocks)
        if prefill is None or self.load_s.value is None or prefill > self.load_s.value:
            return True
        self.refused_loads += 1
        return self.refused_loads % self.explore_every == 0


def _ms(seconds: float | None) -> str:
    return "not measured" if seconds is None else f"{seconds * 1e3:.1f} ms"
