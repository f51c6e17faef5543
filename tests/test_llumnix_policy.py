"""The `llumnix` migration policy as a pure function of fleet snapshots."""

from __future__ import annotations

from rayfleet.policies import registry
from rayfleet.policies.base import (
    FleetSnapshot,
    MigrationRecord,
    PoolSnapshot,
    ReplicaSnapshot,
    ReplicaState,
    RequestProgress,
)
from rayfleet.policies.migration import LlumnixMigrationPolicy

BLOCK = 32


def req(rid, tokens, priority=0, running=True, output=10, max_tokens=500):
    return RequestProgress(request_id=rid, prompt_tokens=tokens - output, output_tokens=output,
                           max_tokens=max_tokens, priority=priority, running=running)


def replica(rid, *requests, state=ReplicaState.READY, capacity=100):
    return ReplicaSnapshot(replica_id=rid, pool="p", model="m", state=state, kv_blocks_total=capacity,
                           kv_block_size=BLOCK, requests=tuple(requests))


def fleet(*replicas, migrations=()):
    pool = PoolSnapshot(name="p", model="m", min_replicas=1, max_replicas=4, desired_replicas=len(replicas),
                        replicas=tuple(replicas))
    return FleetSnapshot(pools={"p": pool}, taken_at=100.0, migrations=tuple(migrations))


def test_registered_by_name():
    assert isinstance(registry.create("migration", "llumnix", {"imbalance_threshold": 0.1}), LlumnixMigrationPolicy)


def test_balanced_pool_needs_no_migration():
    snap = fleet(replica("a", req("r1", 640)), replica("b", req("r2", 640)))
    assert LlumnixMigrationPolicy().plan(snap, frozenset()) == []


def test_moves_cheapest_running_request_from_most_to_least_loaded():
    snap = fleet(replica("a", req("big", 1600), req("small", 320), req("mid", 960)), replica("b"))
    [decision] = LlumnixMigrationPolicy(max_migrations_per_tick=1).plan(snap, frozenset())
    assert (decision.request_id, decision.src, decision.dst) == ("small", "a", "b")


def test_queued_demand_counts_so_a_congested_replica_sheds_running_requests():
    """De-fragmentation: a big queued prompt makes its replica look full; a running request moves away."""
    snap = fleet(replica("a", req("running", 640), req("queued-big", 2400, running=False, output=0)),
                 replica("b", req("other", 640)))
    [decision] = LlumnixMigrationPolicy(max_migrations_per_tick=1).plan(snap, frozenset())
    assert (decision.request_id, decision.src) == ("running", "a")


def test_high_priority_requests_stay_and_their_replica_keeps_headroom():
    snap = fleet(replica("a", req("vip", 640, priority=-1)), replica("b", req("r", 640)))
    decisions = LlumnixMigrationPolicy(priority_headroom_blocks=40).plan(snap, frozenset())
    assert all(d.request_id != "vip" for d in decisions)
    loads = LlumnixMigrationPolicy(priority_headroom_blocks=40)
    assert loads.view(snap.pools["p"].replicas[0]).load > loads.view(snap.pools["p"].replicas[1]).load


def test_draining_replica_moves_every_running_request_out():
    snap = fleet(replica("a", req("r1", 320), req("r2", 640), req("q", 100, running=False, output=0),
                         state=ReplicaState.DRAINING),
                 replica("b"), replica("c", req("x", 960)))
    decisions = LlumnixMigrationPolicy().plan(snap, frozenset({"a"}))
    drains = [d for d in decisions if d.reason == "drain"]
    assert {d.request_id for d in drains} == {"r1", "r2"}
    assert all(d.src == "a" and d.dst in {"b", "c"} for d in drains)


def test_recently_migrated_request_is_not_moved_again():
    record = MigrationRecord(migration_id="m", request_id="small", src="b", dst="a", mode="precopy",
                             outcome="migrated", started_at=99.0)
    snap = fleet(replica("a", req("small", 320), req("big", 1600)), replica("b"), migrations=[record])
    [decision] = LlumnixMigrationPolicy(max_migrations_per_tick=1).plan(snap, frozenset())
    assert decision.request_id == "big"


def test_requests_about_to_finish_are_left_alone():
    snap = fleet(replica("a", req("ending", 1600, output=495, max_tokens=500)), replica("b"))
    assert LlumnixMigrationPolicy(min_remaining_tokens=16).plan(snap, frozenset()) == []
