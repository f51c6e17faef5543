"""The `llumnix` migration policy as a pure function of fleet snapshots: moves happen when they pay."""

from __future__ import annotations

import pytest

from rayfleet.policies import registry
from rayfleet.policies.base import (
    FleetSnapshot,
    MigrationRecord,
    PoolSnapshot,
    ReplicaSnapshot,
    ReplicaState,
    RequestProgress,
)
from rayfleet.policies.migration import LlumnixMigrationPolicy, MigrationCosts

BLOCK = 32
# Cheap moves, 20 ms per token: a move costs ~0.1 s of pause; decoding 400 more tokens takes 8 s.
CHEAP = MigrationCosts(pause_s=0.1, block_transfer_s=0.0, stage_s=0.0, interference=0.0, default_tpot_s=0.02)


def req(rid, tokens, priority=0, running=True, output=10, max_tokens=500, arrival=0.0):
    return RequestProgress(request_id=rid, prompt_tokens=tokens - output, output_tokens=output, max_tokens=max_tokens,
                           priority=priority, running=running, arrival_time=arrival)


def replica(rid, *requests, state=ReplicaState.READY, capacity=100, used=None, waiting=None):
    """`used`: KV blocks the engine reports in use (default: what the requests hold)."""
    running = [r for r in requests if r.running]
    held = sum(-(-r.total_tokens // BLOCK) for r in running) if used is None else used
    return ReplicaSnapshot(replica_id=rid, pool="p", model="m", state=state, kv_blocks_total=capacity,
                           kv_block_size=BLOCK, kv_cache_usage=held / capacity, requests=tuple(requests),
                           num_running=len(running),
                           num_waiting=len(requests) - len(running) if waiting is None else waiting)


def fleet(*replicas, migrations=()):
    pool = PoolSnapshot(name="p", model="m", min_replicas=1, max_replicas=4, desired_replicas=len(replicas),
                        replicas=tuple(replicas))
    return FleetSnapshot(pools={"p": pool}, taken_at=100.0, migrations=tuple(migrations))


def policy(**kwargs) -> LlumnixMigrationPolicy:
    return LlumnixMigrationPolicy(costs=kwargs.pop("costs", CHEAP), **kwargs)


def queue_blocked():
    """Replica a: 90 of 100 blocks held by two long-running requests, and a queued prompt of 24 blocks that
    cannot start until they finish (~8 s); replica b: nearly empty."""
    a = replica("a", req("long-1", 1600), req("long-2", 1280), req("queued", 760, running=False, output=0))
    b = replica("b", req("short", 320))
    return fleet(a, b)


def test_registered_by_name_with_its_parameters():
    made = registry.create("migration", "llumnix", {"horizon_s": 1.0, "costs": {"pause_s": 0.5}})
    assert isinstance(made, LlumnixMigrationPolicy) and made.costs.pause_s == 0.5
    with pytest.raises(registry.UnknownPolicy, match="triggers"):
        registry.create("migration", "llumnix", {"triggers": ["balance"]})


def test_a_pool_without_pressure_needs_no_migration():
    snap = fleet(replica("a", req("r1", 640)), replica("b", req("r2", 640)))
    assert policy().plan(snap, frozenset()) == []


def test_a_queue_that_cannot_fit_triggers_a_move_of_a_request_that_frees_enough():
    [decision] = policy().plan(queue_blocked(), frozenset())
    # long-2 (40 blocks) is the smallest running request that frees the 14 blocks the queued prompt lacks.
    assert (decision.request_id, decision.src, decision.dst) == ("long-2", "a", "b")
    assert decision.reason.startswith("queue")


def test_a_move_that_cannot_pay_is_refused():
    """The queued prompt lacks 14 blocks, but a running request frees 41 within 0.4 s; a move costs a 1 s pause."""
    costly = MigrationCosts(pause_s=1.0, block_transfer_s=0.0, stage_s=0.0, interference=0.0, default_tpot_s=0.02)
    a = replica("a", req("long", 1600), req("ending", 1280, output=480, max_tokens=500),
                req("queued", 760, running=False, output=0))
    planner = policy(costs=costly)
    assert planner.plan(fleet(a, replica("b")), frozenset()) == []
    assert any(rid == "long" and "gain 0.40 s < 1.5 x cost 1.00 s" in why for rid, why in planner.refused)


def test_a_request_finishing_before_its_move_pays_stays():
    a = replica("a", req("ending", 2880, output=495, max_tokens=500), req("queued", 760, running=False, output=0))
    planner = policy()
    assert planner.plan(fleet(a, replica("b")), frozenset()) == []
    assert any(rid == "ending" and "finishes" in why for rid, why in planner.refused)


def test_a_move_that_only_shifts_the_pressure_is_refused():
    """Both replicas are full: there is no destination with room beside its own queue and growth."""
    a = replica("a", req("long-1", 1600), req("long-2", 1280), req("queued", 760, running=False, output=0))
    b = replica("b", req("other", 2880))
    planner = policy()
    assert planner.plan(fleet(a, b), frozenset()) == []
    assert any("to spare beside its own queue and growth" in why for _, why in planner.refused)


def test_preemption_risk_triggers_a_move():
    """95 of 100 blocks held by requests that grow over the horizon: vLLM would preempt the newest."""
    a = replica("a", req("old", 1600, arrival=1.0), req("new", 1408, arrival=2.0))
    [decision] = policy(horizon_s=4.0).plan(fleet(a, replica("b")), frozenset())
    assert decision.src == "a" and decision.dst == "b" and decision.reason.startswith("preemption")


def test_high_priority_requests_stay_and_their_replica_keeps_headroom():
    a = replica("a", req("vip", 1600, priority=-1), req("normal", 1280))
    [decision] = policy(priority_headroom_blocks=40).plan(fleet(a, replica("b")), frozenset())
    assert decision.request_id == "normal" and decision.reason.startswith("priority")


def test_a_draining_replica_moves_every_running_request_out_whatever_it_costs():
    costly = MigrationCosts(pause_s=30.0, default_tpot_s=0.02)
    snap = fleet(replica("a", req("r1", 320), req("r2", 640), req("q", 100, running=False, output=0),
                         state=ReplicaState.DRAINING),
                 replica("b"), replica("c", req("x", 960)))
    decisions = policy(costs=costly).plan(snap, frozenset({"a"}))
    drains = [d for d in decisions if d.reason == "drain"]
    assert {d.request_id for d in drains} == {"r1", "r2"}
    assert all(d.src == "a" and d.dst in {"b", "c"} for d in drains)


def test_a_recently_migrated_request_is_not_moved_again():
    record = MigrationRecord(migration_id="m", request_id="long-2", src="b", dst="a", mode="precopy",
                             outcome="migrated", started_at=99.0)
    snap = queue_blocked()
    snap = FleetSnapshot(pools=snap.pools, taken_at=snap.taken_at, migrations=(record,))
    [decision] = policy().plan(snap, frozenset())
    assert decision.request_id == "long-1"


def moves(n, downtime_s, src="a", outcome="migrated", blocks=0):
    """`n` earlier moves out of `src`, long past the cooldown, whose clients each waited `downtime_s`."""
    return tuple(MigrationRecord(migration_id=f"m-{src}-{outcome}-{downtime_s}-{i}", request_id=f"old-{i}", src=src,
                                 dst="b", mode="precopy", outcome=outcome, blocks_moved=blocks + 24,
                                 last_stage_blocks=blocks,
                                 downtime_s=downtime_s, started_at=0.0) for i in range(n))


def paying_at_a_short_pause(migrations=()):
    """`test_a_move_that_cannot_pay_is_refused`'s replicas: a queue relieved by a move at a 0.1 s pause (CHEAP's),
    not at a 1 s one."""
    a = replica("a", req("long", 1600), req("ending", 1280, output=480, max_tokens=500),
                req("queued", 760, running=False, output=0))
    return fleet(a, replica("b"), migrations=migrations)


def test_a_pool_prices_its_moves_at_the_pause_its_own_moves_took():
    planner = policy()
    [decision] = planner.plan(paying_at_a_short_pause(moves(2, 1.0)), frozenset())  # too few to learn from
    assert decision.reason.startswith("queue") and planner.pauses == {"p": 0.1}
    assert planner.plan(paying_at_a_short_pause(moves(3, 1.0)), frozenset()) == []
    assert planner.pauses == {"p": 1.0}
    assert any(rid == "long" and "1.5 x cost 1.00 s" in why for rid, why in planner.refused)


def test_the_learned_pause_is_the_median_of_the_pools_last_completed_moves():
    # The pool's last 16 completed moves: 7 of 5 s, then 9 of 50 ms. Any of another pool's or unfinished moves
    # counted in would push 10 s ones into the window and the median to ~5 s.
    history = (moves(16, 5.0) + moves(9, 0.05) + moves(8, 10.0, src="another-pools-replica")
               + moves(8, 10.0, outcome="aborted"))
    planner = policy()
    [decision] = planner.plan(paying_at_a_short_pause(history), frozenset())
    assert decision.reason.startswith("queue") and planner.pauses == {"p": 0.05}


def test_the_learned_pause_leaves_out_the_last_stages_copy():
    """Each move stopped its request for a last stage of 16 blocks: 0.16 s of copy at this rate."""
    costs = MigrationCosts(pause_s=0.1, block_transfer_s=0.01, stage_s=0.0, interference=0.0, default_tpot_s=0.02)
    planner = policy(costs=costs)
    planner.plan(paying_at_a_short_pause(moves(3, 0.5, blocks=16)), frozenset())
    assert planner.pauses["p"] == pytest.approx(0.34)


def test_with_learning_off_the_configured_pause_prices_every_move():
    planner = policy(learn_pause=False)
    [decision] = planner.plan(paying_at_a_short_pause(moves(3, 1.0)), frozenset())
    assert decision.reason.startswith("queue") and planner.pauses == {"p": 0.1}
