"""Built-in policies are pure functions of snapshots: tested without Ray."""

from __future__ import annotations

import pytest

from rayfleet.policies import registry
from rayfleet.policies.admission import QueueLimitAdmission
from rayfleet.policies.base import (
    AdmissionVerdict,
    FleetSnapshot,
    NoReplicaAvailable,
    PoolSnapshot,
    ReplicaSnapshot,
    ReplicaState,
    RequestInfo,
)
from rayfleet.policies.routing import LeastLoadRouter, RoundRobinRouter
from rayfleet.policies.scaling import TokensInFlightScaler


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


def request(pool="a", exclude=frozenset()):
    return RequestInfo(request_id="r", pool=pool, prompt_tokens=10, max_tokens=10, exclude_replicas=exclude)


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
    with pytest.raises(registry.UnknownPolicy, match="allowed: best_model_only, chimera, least_load, random, round_robin"):
        registry.create("router", "fastest")
    with pytest.raises(registry.UnknownPolicy, match="policies.router.params"):
        registry.create("router", "least_load", {"nonsense": 1})
    assert isinstance(registry.create("router", "round_robin"), RoundRobinRouter)


def test_builtins_are_registered_as_entry_points():
    assert {"round_robin", "least_load"} <= set(registry.available("router"))
    from importlib.metadata import entry_points

    assert {"round_robin", "least_load"} <= {ep.name for ep in entry_points(group="rayfleet.routers")}
