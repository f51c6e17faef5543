"""Pricing the KV store against the engine's own prefill (`policies/kv_pricing.py`): the line it fits, and the
lookups and loads it lets through or refuses. Pure policy code: no engine, no store."""

from __future__ import annotations

import pytest

from rayfleet.policies.kv_pricing import StorePricing, WeightedLine

BLOCK = 32


def test_the_weighted_line_recovers_a_steps_intercept_and_per_token_slope():
    line = WeightedLine(decay=0.98)
    for i in range(200):
        tokens = (i * 37) % 512
        line.add(tokens, 0.005 + 0.0001 * tokens)
    assert line.slope == pytest.approx(0.0001, rel=1e-6)


def test_the_weighted_line_has_no_slope_until_the_token_counts_vary():
    line = WeightedLine()
    for _ in range(50):
        line.add(64, 0.01)  # decode-only steps of one size: intercept and slope cannot be told apart
    assert line.slope is None
    line.add(512, 0.05)
    assert line.slope is not None


def test_the_weighted_line_follows_a_change_of_price():
    line = WeightedLine(decay=0.9)
    for i in range(100):
        line.add(i % 10 * 50, 0.001 * (i % 10 * 50))
    for i in range(100):
        line.add(i % 10 * 50, 0.004 * (i % 10 * 50))  # the engine got 4x slower per token (a busier machine)
    assert line.slope == pytest.approx(0.004, rel=0.01)


def priced(step_s: float, per_token_s: float, steps: int = 64, batch: int = 1) -> StorePricing:
    pricing = StorePricing(block_size=BLOCK)
    for i in range(steps):
        tokens = 16 + (i % 8) * 64
        pricing.observe_step(tokens, step_s + per_token_s * tokens, batch)
    return pricing


def test_without_a_price_every_lookup_and_load_goes_ahead():
    pricing = priced(0.01, 0.0001, steps=5)  # fewer steps than min_steps
    assert pricing.prefill_s(1) is None
    assert pricing.lookup_pays(1) and pricing.load_pays(1)


def test_a_lookup_pays_only_for_blocks_that_prefill_longer_than_the_wait():
    # 0.1 ms per token: a 32-token block prefills in 3.2 ms, for the asking request and the one it runs beside;
    # a step takes ~25 ms on average here.
    pricing = priced(0.005, 0.0001)
    wait = pricing.steps.mean_y * 2  # a step for the lookup and, with no load measured yet, one for the load
    few = int(wait / (0.0001 * BLOCK * 2)) - 1  # blocks whose prefill is under the wait
    assert not pricing.lookup_pays(few)
    assert pricing.lookup_pays(few + 2)
    pricing.observe_load(0.5)  # a slow store: loads take half a second
    assert not pricing.lookup_pays(few + 2)


def test_a_prefill_is_priced_for_every_request_of_the_batch_it_slows():
    alone, busy = priced(0.005, 0.0001, batch=0), priced(0.005, 0.0001, batch=7)
    assert busy.prefill_s(3) == pytest.approx(8 * alone.prefill_s(3))


def test_a_load_pays_only_when_it_is_faster_than_computing_its_blocks_and_refusals_still_explore():
    pricing = priced(0.005, 0.0001, batch=0)
    pricing.observe_load(0.010)  # 10 ms per load: 4 blocks (12.8 ms of prefill) pay, 2 (6.4 ms) do not
    assert pricing.load_pays(4)
    answers = [pricing.load_pays(2) for _ in range(pricing.explore_every * 2)]
    assert answers.count(True) == 2  # one in explore_every refused loads is taken to keep the latency current


def test_a_lookup_answered_within_the_grace_is_priced_at_its_time_for_the_step_it_holds_not_at_a_step():
    """29 ms steps of two requests, 4 ms loads, a block prefilling in 6.4 ms for the batch: a lookup priced at
    a step needs 6 blocks to pay; one answered in 2 ms (inside the grace, a tenth of a step) holds the step for
    both requests, 4 ms, and 2 blocks pay; one answered after the grace costs the grace to both and a step: 7."""
    pricing = priced(0.005, 0.0001, batch=1)
    pricing.grace_s = 0.010
    pricing.observe_load(0.004)
    step, grace = pricing.steps.mean_y, pricing.schedule_grace_s()
    assert grace == pytest.approx(step / 10)
    untimed = pricing.break_even_blocks()
    assert pricing.lookup_wait_s() == pytest.approx(step + 0.004)
    pricing.observe_lookup(0.002, in_schedule=True)
    assert pricing.lookup_wait_s() == pytest.approx(0.002 * 2 + 0.004)
    fast = pricing.break_even_blocks()
    for _ in range(30):
        pricing.observe_lookup(0.050, in_schedule=False)  # the store slowed down: answers come after the grace
    assert pricing.lookup_wait_s() == pytest.approx(grace * 2 + step + 0.004, rel=0.01)
    slow = pricing.break_even_blocks()
    assert (fast, untimed, slow) == (2, 6, 7)


def test_lookups_answered_in_the_asking_step_half_the_time_are_priced_between_the_two():
    pricing = priced(0.005, 0.0001, batch=1)
    pricing.grace_s = 0.010
    step, grace = pricing.steps.mean_y, pricing.schedule_grace_s()
    for _ in range(200):
        pricing.observe_lookup(0.002, in_schedule=True)
        pricing.observe_lookup(0.2, in_schedule=False)
    half = pricing.in_schedule.value
    assert 0.4 < half < 0.6
    answered, late = 0.002 * 2, grace * 2 + step
    assert pricing.lookup_wait_s() == pytest.approx(half * answered + (1 - half) * late + step)  # no load timed
