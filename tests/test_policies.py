"""Built-in policies are pure functions of snapshots: tested without Ray."""

from __future__ import annotations

import json

import pytest

from rayfleet.policies import registry
from rayfleet.policies.admission import KVAwareAdmission, QueueLimitAdmission
from rayfleet.policies.base import (
    AdmissionVerdict,
    FleetSnapshot,
    NoReplicaAvailable,
    PoolRole,
    PoolSnapshot,
    ReplicaSnapshot,
    ReplicaState,
    RequestInfo,
    RequestProgress,
)
from rayfleet.policies.routing import LeastLoadRouter, PowerOfTwoRouter, PrefillDecodeRouter, RoundRobinRouter
from rayfleet.policies.scaling import PredictiveScaler, TokensInFlightScaler


def replica(rid, pool="a", state=ReplicaState.READY, tokens=0, waiting=0, running=0):
    return ReplicaSnapshot(replica_id=rid, pool=pool, model="m", state=state, tokens_in_flight=tokens,
                           num_waiting=waiting, num_running=running)


def snapshot(*replicas, desired=None):
    pools = {}
    for r in replicas:
        pools.setdefault(r.pool, []).append(r)
    return FleetSnapshot(pools={name: PoolSnapshot(name=name, model="m", min_replicas=1, max_replicas=4,
                                                   desired_replicas=(desired or {}).get(name, len(rs)),
                                                   replicas=tuple(rs)) for name, rs in pools.items()})


def request(pool="a", exclude=frozenset(), rid="r", prompt=10, max_tokens=10):
    return RequestInfo(request_id=rid, pool=pool, prompt_tokens=prompt, max_tokens=max_tokens,
                       exclude_replicas=exclude)


def test_least_load_picks_fewest_tokens_in_flight():
    snap = snapshot(replica("a1", tokens=500), replica("a2", tokens=100), replica("a3", tokens=300))
    assert LeastLoadRouter().route(request(), snap).replica_id == "a2"


def test_least_load_counts_queued_requests():
    snap = snapshot(replica("a1", tokens=100, waiting=2), replica("a2", tokens=300))
    assert LeastLoadRouter(waiting_weight=256).route(request(), snap).replica_id == "a2"


def test_routers_skip_draining_dead_and_excluded_replicas():
    snap = snapshot(replica("a1", state=ReplicaState.DRAINING), replica("a2", state=ReplicaState.DEAD),
                    replica("a3", tokens=900), replica("a4"))
    assert LeastLoadRouter().route(request(exclude=frozenset({"a4"})), snap).replica_id == "a3"
    with pytest.raises(NoReplicaAvailable, match="pool 'a'"):
        RoundRobinRouter().route(request(exclude=frozenset({"a3", "a4"})), snap)


def test_round_robin_cycles_over_ready_replicas():
    snap = snapshot(replica("a1"), replica("a2"), replica("a3"))
    router = RoundRobinRouter()
    assert [router.route(request(), snap).replica_id for _ in range(6)] == ["a1", "a2", "a3"] * 2


def test_auto_considers_every_pool():
    snap = snapshot(replica("a1", tokens=900), replica("b1", pool="b", tokens=10))
    decision = LeastLoadRouter().route(request(pool=None), snap)
    assert (decision.pool, decision.replica_id) == ("b", "b1")


def test_admission_rejects_when_every_replica_is_full():
    policy = QueueLimitAdmission(max_waiting_per_replica=4, max_in_flight_per_replica=10)
    assert policy.admit(request(), snapshot(replica("a1", running=5), replica("a2", running=9))).verdict \
        is AdmissionVerdict.ADMIT
    decision = policy.admit(request(), snapshot(replica("a1", running=6, waiting=4), replica("a2", running=10)))
    assert decision.verdict is AdmissionVerdict.REJECT and decision.retry_after_s >= 1


def test_admission_rejects_pool_without_ready_replicas():
    decision = QueueLimitAdmission().admit(request(), snapshot(replica("a1", state=ReplicaState.STARTING)))
    assert decision.verdict is AdmissionVerdict.REJECT and "no ready replica" in decision.reason


def test_tokens_scaler_steps_up_at_once_and_down_after_a_delay():
    scaler = TokensInFlightScaler(target_tokens_per_replica=100, downscale_ticks=3)
    busy = snapshot(replica("a1", tokens=350))
    assert scaler.desired_replicas(busy) == {"a": 2}
    quiet = snapshot(replica("a1"), replica("a2"), desired={"a": 2})
    assert [scaler.desired_replicas(quiet)["a"] for _ in range(3)] == [2, 2, 1]


def test_registry_names_allowed_choices_and_bad_params():
    with pytest.raises(registry.UnknownPolicy,
                       match="allowed: best_model_only, chimera, least_load, power_of_two, prefill_decode, random, round_robin"):
        registry.create("router", "fastest")
    with pytest.raises(registry.UnknownPolicy, match="policies.router.params"):
        registry.create("router", "least_load", {"nonsense": 1})
    assert isinstance(registry.create("router", "round_robin"), RoundRobinRouter)


def test_builtins_are_registered_as_entry_points():
    assert {"round_robin", "least_load"} <= set(registry.available("router"))
    from importlib.metadata import entry_points

    assert {"round_robin", "least_load"} <= {ep.name for ep in entry_points(group="rayfleet.routers")}


def test_power_of_two_takes_the_less_busy_of_its_two_picks():
    snap = snapshot(replica("a1", running=9, waiting=3), replica("a2", running=2))
    router = PowerOfTwoRouter(seed=0)
    assert {router.route(request(), snap).replica_id for _ in range(5)} == {"a2"}


def test_prefill_decode_prefills_on_the_prefill_pool_and_names_the_decode_replica():
    def kv(rid, pool, tokens=0, remaining=0):
        return ReplicaSnapshot(replica_id=rid, pool=pool, model="m", state=ReplicaState.READY, kv_blocks_total=100,
                               kv_block_size=16, tokens_in_flight=tokens, predicted_remaining_tokens=remaining)

    pools = {
        "p": PoolSnapshot(name="p", model="m", min_replicas=1, max_replicas=2, desired_replicas=2,
                          role=PoolRole.PREFILL, replicas=(kv("p1", "p", tokens=900), kv("p2", "p", tokens=100))),
        "d": PoolSnapshot(name="d", model="m", min_replicas=1, max_replicas=2, desired_replicas=2,
                          role=PoolRole.DECODE, prefill_pool="p",
                          replicas=(kv("d1", "d", tokens=800), kv("d2", "d", tokens=300, remaining=800))),
    }
    decision = PrefillDecodeRouter().route(request(pool="d"), FleetSnapshot(pools=pools))
    # p2 has less prefill work queued; d1 keeps more KV free (800 < 300 + 800 tokens of demand).
    assert (decision.pool, decision.replica_id, decision.handoff_replica_id) == ("d", "p2", "d1")
    assert PrefillDecodeRouter().route(request(pool="p"), FleetSnapshot(pools=pools)).handoff_replica_id is None


def kv_replica(rid, *requests, blocks=10, block_size=100, decode_rate=0.0):
    running = [r for r in requests if r.running]
    return ReplicaSnapshot(replica_id=rid, pool="a", model="m", state=ReplicaState.READY, kv_blocks_total=blocks,
                           kv_block_size=block_size, requests=tuple(requests), num_running=len(running),
                           num_waiting=len(requests) - len(running),
                           tokens_in_flight=sum(r.total_tokens for r in requests), decode_tokens_per_s=decode_rate)


def progress(rid, prompt, max_tokens, output=0):
    return RequestProgress(request_id=rid, prompt_tokens=prompt, output_tokens=output, max_tokens=max_tokens)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_kv_aware_admission_admits_while_predicted_demand_fits():
    """Capacity 2 x 1000 tokens; the running requests will hold 600 + 800 at their ends."""
    snap = snapshot(kv_replica("a1", progress("x", 100, 500)), kv_replica("a2", progress("y", 200, 600)))
    policy = KVAwareAdmission(target_utilization=1.0)
    assert policy.admit(request(prompt=300, max_tokens=300), snap).verdict is AdmissionVerdict.ADMIT  # 2000
    assert policy.admit(request(prompt=300, max_tokens=301), snap).verdict is AdmissionVerdict.QUEUE  # 2001


def test_kv_aware_admission_queues_first_come_first_served_and_rejects_past_its_bound():
    full = snapshot(kv_replica("a1", progress("x", 900, 100), decode_rate=50.0))
    clock = Clock()
    policy = KVAwareAdmission(target_utilization=1.0, max_queued_per_replica=2, clock=clock)
    verdicts = [policy.admit(request(rid=f"q{i}", prompt=50, max_tokens=50), full).verdict for i in range(2)]
    assert verdicts == [AdmissionVerdict.QUEUE] * 2
    rejected = policy.admit(request(rid="q2", prompt=50, max_tokens=50), full)
    assert rejected.verdict is AdmissionVerdict.REJECT and rejected.retry_after_s >= 1
    room = snapshot(kv_replica("a1"))
    # Room again: the second in line waits for the first, which then goes.
    assert policy.admit(request(rid="q1", prompt=50, max_tokens=50), room).verdict is AdmissionVerdict.QUEUE
    assert policy.admit(request(rid="q0", prompt=50, max_tokens=50), room).verdict is AdmissionVerdict.ADMIT
    assert policy.admit(request(rid="q1", prompt=50, max_tokens=50), room).verdict is AdmissionVerdict.ADMIT


def test_kv_aware_admission_forgets_a_queued_request_nobody_asks_for():
    full = snapshot(kv_replica("a1", progress("x", 900, 100)))
    clock = Clock()
    policy = KVAwareAdmission(target_utilization=1.0, forget_after_s=2.0, clock=clock)
    assert policy.admit(request(rid="gone", prompt=50, max_tokens=50), full).verdict is AdmissionVerdict.QUEUE
    clock.now = 3.0  # its client left: the ingress stopped asking
    room = snapshot(kv_replica("a1"))
    assert policy.admit(request(rid="next", prompt=50, max_tokens=50), room).verdict is AdmissionVerdict.ADMIT


def test_kv_aware_admission_learns_output_lengths_from_finished_requests():
    """After requests that asked for 900 tokens finish with 100, a new one is predicted at 100, not 900."""
    policy = KVAwareAdmission(target_utilization=1.0, learn_after=3)
    for i in range(3):
        running = snapshot(kv_replica("a1", progress(f"f{i}", 100, 900, output=100), blocks=20))
        policy.admit(request(rid=f"probe{i}a"), FleetSnapshot(pools=running.pools, taken_at=2.0 * i))
        policy.admit(request(rid=f"probe{i}b"), FleetSnapshot(pools=snapshot(kv_replica("a1")).pools,
                                                             taken_at=2.0 * i + 1))
    assert policy.expected_output(900, None) == 100
    snap = snapshot(kv_replica("a1", blocks=3))  # 300 tokens
    assert policy.admit(request(rid="new", prompt=150, max_tokens=900), snap).verdict is AdmissionVerdict.ADMIT


def started(rid, count, tokens=0, requests=()):
    return ReplicaSnapshot(replica_id=rid, pool="a", model="m", state=ReplicaState.READY, requests_started=count,
                           tokens_in_flight=tokens, kv_blocks_total=100, kv_block_size=16, requests=tuple(requests))


def pool_at(t, *replicas, desired=1, max_replicas=20):
    pool = PoolSnapshot(name="a", model="m", min_replicas=1, max_replicas=max_replicas, desired_replicas=desired,
                        replicas=replicas)
    return FleetSnapshot(pools={"a": pool}, taken_at=t)


def test_predictive_scaler_scales_ahead_of_a_rising_arrival_rate():
    """Arrivals ramp up (0.2 t req/s at second t), each request 100 prompt + 100 output tokens. One replica
    (1,600 KV tokens, 50 ms steps) sustains mu = 1600 / (0.05 * (100*100 + 100*101/2)) = 2.13 req/s, 1.49 at
    the 0.7 target: at t = 29 today's 5.8 req/s need 4 replicas. With a 10 s start-up the scaler provisions
    for the rate it forecasts 10 s ahead (~7.3 req/s: 5), while tokens in flight would keep one replica."""
    scaler = PredictiveScaler(startup_s=10.0, window_s=3.0, quantile=0.9, level_smoothing=0.5,
                              trend_smoothing=0.3, target_utilization=0.7, learn_after=5)
    desired = 1
    for t in range(30):
        # Each second's requests show up in one snapshot and are gone (finished) in the next.
        finished_now = [progress(f"t{t}-{i}", 100, 100, output=100) for i in range(3)]
        snap = pool_at(float(t), started("a1", round(0.1 * t * t), tokens=500, requests=finished_now),
                       desired=desired)
        desired = scaler.desired_replicas(snap)["a"]
    reactive = TokensInFlightScaler(target_tokens_per_replica=1000)
    assert reactive.desired_replicas(pool_at(30.0, started("a1", 90, tokens=500)))["a"] == 1
    assert desired >= 5


def test_predictive_scaler_scales_in_only_after_its_delay_and_one_at_a_time():
    scaler = PredictiveScaler(startup_s=5.0, window_s=5.0, downscale_delay_s=10.0)
    wanted = [scaler.desired_replicas(pool_at(float(t), started("a1", 0), desired=4))["a"] for t in range(25)]
    assert wanted[:10] == [4] * 10  # idle, but the delay has not passed
    assert 3 in wanted and min(wanted) >= 1
    assert all(later >= earlier - 1 for earlier, later in zip(wanted, wanted[1:]))


def test_predictive_scaler_keeps_replicas_its_forecast_still_needs_and_sheds_them_once_demand_is_gone():
    """Tokens in flight swing between 1,600 (two seconds) and 0 (two seconds) on 4 replicas of 1,600 KV
    tokens at 0.5 utilization (800 tokens each): a tick alone wants 2 or 1 replicas, and the unguarded scaler
    drains to 2; the swings' forecast one start-up (2 s) ahead, at its 0.95 quantile, still fills 4, so the
    guarded scaler keeps them. Once the load is gone for good, the forecast and its error decay and the
    guarded scaler scales in too, one replica per tick after the delay."""
    def run(guard: bool) -> list[int]:
        scaler = PredictiveScaler(startup_s=2.0, window_s=5.0, downscale_delay_s=3.0, quantile=0.95,
                                  target_utilization=0.5, guard_scale_in=guard)
        desired, wanted = 4, []
        for t in range(100):
            tokens = 1600 if t < 40 and t % 4 < 2 else 0
            desired = scaler.desired_replicas(pool_at(float(t), started("a1", 0, tokens=tokens), desired=desired))["a"]
            wanted.append(desired)
        return wanted

    unguarded, guarded = run(False), run(True)
    assert unguarded[5:40] == [2] * 35  # drained during the swings
    assert guarded[:40] == [4] * 40  # kept: the next swing needs them
    assert guarded[-1] == 1 and all(later >= earlier - 1 for earlier, later in zip(guarded, guarded[1:]))


def seasonal_days(scaler: PredictiveScaler, crowds: list[float], days: int = 2, day_s: int = 200,
                  first_day: int = 0) -> list[int]:
    """Days of `day_s` ticks: 2 requests a second, 10 during a 20 s crowd starting at each of `crowds` (absolute
    seconds); each request 100 prompt + 100 output tokens, started in one snapshot and finished by the next.
    The scaler sees the days from `first_day` on (the counters count from day 0). Returns the replicas it wants
    at each second it sees."""
    total, desired, wanted = 0, 2, []
    for t in range((first_day + days) * day_s):
        rate = 10 if any(start <= t < start + 20 for start in crowds) else 2
        total += rate
        if t < first_day * day_s:
            continue
        finished_now = [progress(f"t{t}-{i}", 100, 100, output=100) for i in range(3)]
        snap = pool_at(float(t), started("a1", total, requests=finished_now), desired=desired)
        desired = scaler.desired_replicas(snap)["a"]
        wanted.append(desired)
    return wanted


def seasonal_scaler(**season) -> PredictiveScaler:
    """mu = 2.13 req/s a replica (as above) at 0.5 utilization: 2 req/s want 2 replicas, 10 req/s want 10."""
    return PredictiveScaler(startup_s=10.0, window_s=3.0, target_utilization=0.5, learn_after=5, **season)


def test_seasonal_scaler_provisions_a_recurring_crowd_before_it_starts_on_the_second_day_not_the_first():
    """A crowd at 120 s of a 200 s day, and 5 s earlier the next day (within the 10 s jitter). On the first day
    the scaler has no history and behaves exactly as without a season; on the second it has what came at that
    time of day before, and wants the crowd's 10 replicas a start-up time (10 s) before it comes."""
    crowds = [120.0, 315.0]
    seasonal = seasonal_days(seasonal_scaler(season_s=200.0, season_bin_s=10.0, season_jitter_s=10.0), crowds)
    plain = seasonal_days(seasonal_scaler(), crowds)
    assert seasonal[:200] == plain[:200]  # no history: the Holt forecast alone
    assert seasonal[110] == 2 and seasonal[119] == 2  # day 1: nothing seen coming
    assert plain[305] == 2  # day 2 without a season: still nothing
    assert min(seasonal[305:315]) >= 9  # day 2: ready when the crowd comes


def test_seasonal_history_survives_a_restart_through_its_state_dict():
    """The controller keeps `state_dict()` in its store (JSON) and gives it to the new scaler after a restart: on
    the second day, a scaler restarted at midnight with yesterday's history provisions the recurring crowd ahead;
    restarted without it, it sees nothing coming."""
    crowds = [120.0, 315.0]
    season = dict(season_s=200.0, season_bin_s=10.0, season_jitter_s=10.0)
    before_restart = seasonal_scaler(**season)
    seasonal_days(before_restart, crowds, days=1)
    kept = json.loads(json.dumps(before_restart.state_dict()))

    restored = seasonal_scaler(**season)
    restored.load_state_dict(kept)
    with_history = seasonal_days(restored, crowds, days=1, first_day=1)
    without_history = seasonal_days(seasonal_scaler(**season), crowds, days=1, first_day=1)
    assert min(with_history[105:115]) >= 9  # ready before the crowd at 315 s
    assert without_history[105] == 2

    other_bins = seasonal_scaler(season_s=200.0, season_bin_s=20.0)
    other_bins.load_state_dict(kept)  # bins of another size do not line up: not taken
    assert other_bins.state_dict() == {"bin_s": 20.0, "pools": {}}


def test_the_history_of_a_pool_no_longer_in_the_fleet_is_dropped_at_the_next_decision():
    """A restored history may name pools since removed from the spec: kept, it would be saved again forever."""
    season = dict(season_s=200.0, season_bin_s=10.0, season_jitter_s=10.0)
    scaler = seasonal_scaler(**season)
    scaler.load_state_dict({"bin_s": 10.0, "pools": {"a": [[3, 5]], "removed": [[3, 7]]}})
    assert set(scaler.state_dict()["pools"]) == {"a", "removed"}
    seasonal_days(scaler, crowds=[], days=1)  # snapshots of pool "a" alone
    assert set(scaler.state_dict()["pools"]) == {"a"}
    assert dict(map(tuple, scaler.state_dict()["pools"]["a"]))[3] == 5 + 20  # restored, then 10 s at 2 req/s


def test_seasonal_scaler_forgets_what_no_season_looks_back_to():
    scaler = seasonal_scaler(season_s=200.0, season_bin_s=10.0, seasons=2)
    seasonal_days(scaler, crowds=[], days=6)
    season = scaler._pools["a"].season
    assert len(season.counts) <= 3 * 20 + season.LEVEL_BINS + 1  # this day's bins and two days before


def test_a_season_that_is_not_a_whole_number_of_bins_is_refused_naming_the_field():
    with pytest.raises(registry.UnknownPolicy, match="season_s"):
        registry.create("scaler", "predictive", {"season_s": 1801.0, "season_bin_s": 30.0})
