"""The fleet simulator: a small case computed by hand, and the same policy code as the live fleet.

No Ray, no engines: the simulator is pure Python over `rayfleet.policies`.
"""

from __future__ import annotations

import pytest

from rayfleet.control_plane.simulator.fleet import FleetSimulator, SimConfig, SimPool
from rayfleet.control_plane.simulator.profiles import MigrationModel, ReplicaProfile, StepTimeModel
from rayfleet.control_plane.simulator.workload import TraceRequest, bursty
from rayfleet.policies.base import FleetSnapshot, ReplicaSnapshot
from rayfleet.policies.migration import LlumnixMigrationPolicy

# Steps: 10 ms + 1 ms per prefill token + 2 ms per decoding sequence. 10 blocks of 4 tokens, no contention.
HAND = ReplicaProfile(
    name="hand", step=StepTimeModel(base_s=0.010, prefill_token_s=0.001, decode_seq_s=0.002, context_token_s=0.0),
    kv_blocks=10, block_size=4, max_num_seqs=4, max_batched_tokens=64, startup_s=1.0,
    migration=MigrationModel(pause_s=0.1, block_transfer_s=0.0, stage_s=0.0, engine_copy_s_per_block=0.0))


def one_replica(trace: list[TraceRequest], profile: ReplicaProfile = HAND, **policies):
    sim = FleetSimulator(SimConfig(pools=[SimPool("p", profile, 1)], policies=policies))
    return sim.run(trace)


def test_a_small_case_matches_the_hand_computation():
    """A: prompt 8, 3 tokens, at t=0. B: prompt 4, 2 tokens, at t=5 ms.

    step 0  t=0     A prefills 8 tokens (2 blocks)            10 + 8       = 18 ms -> A's 1st token at 18 ms
    step 1  t=18    A decodes (3rd block: 8 % 4 == 0); B prefills 4 tokens   10 + 4 + 2 = 16 ms -> 34 ms:
                    A's 2nd token, B's 1st token
    step 2  t=34    A and B decode (B's 2nd block)                           10 + 2 * 2 = 14 ms -> 48 ms:
                    A's 3rd token (done), B's 2nd token (done)
    """
    result = one_replica([TraceRequest(0.0, 8, 3, 3), TraceRequest(0.005, 4, 2, 2)])
    a, b = sorted(result.records, key=lambda r: r.arrival_s)
    assert a.ttft_s == pytest.approx(0.018, abs=1e-12) and a.latency_s == pytest.approx(0.048, abs=1e-12)
    assert a.tpot_s == pytest.approx(0.015, abs=1e-12)  # (48 - 18) / 2
    assert b.ttft_s == pytest.approx(0.029, abs=1e-12) and b.latency_s == pytest.approx(0.043, abs=1e-12)
    assert b.tpot_s == pytest.approx(0.014, abs=1e-12)
    assert (a.output_tokens, b.output_tokens, result.preemptions) == (3, 2, 0)


def test_a_full_cache_preempts_the_newest_request_and_recomputes_it():
    """A (prompt 16, 8 tokens) and B (prompt 16, 8 tokens) at t=0 share 10 blocks: both prefill (8 blocks),
    then each decode needs a fifth block; 2 are free, then none: B (newest) is preempted, A finishes, B
    restarts from scratch (prompt + the tokens it had) and finishes."""
    result = one_replica([TraceRequest(0.0, 16, 8, 8), TraceRequest(0.0, 16, 8, 8)])
    a, b = result.records
    assert result.preemptions >= 1
    assert (a.preemptions, b.preemptions) == (0, result.preemptions)
    assert a.output_tokens == b.output_tokens == 8
    assert b.latency_s > a.latency_s


def test_the_simulator_runs_the_live_fleets_policy_objects(monkeypatch):
    """Policies come from the same registry by the same spec section as the controller's, and the migration
    policy's `plan` (the very function the controller calls) runs on FleetSnapshots of ReplicaSnapshots."""
    from rayfleet.control_plane.controller import FleetController
    from rayfleet.control_plane.spec import parse_spec

    spec = {"pools": [{"name": "p", "model": "/models/none"}],
            "policies": {"router": {"name": "least_load"}, "migration": {"name": "llumnix"}, "tick_s": 0.5}}
    # The controller's own policy construction, without the rest of its (Ray-bound, async) constructor.
    controller = FleetController.__new__(FleetController)
    controller.spec = parse_spec(spec)
    controller._build_policies()
    sim = FleetSimulator(SimConfig(pools=[SimPool("p", HAND, 2)], policies=spec["policies"]))
    assert type(sim.migration_policy) is type(controller.migration_policy) is LlumnixMigrationPolicy
    assert type(sim.scaler) is type(controller.scaler)
    assert type(sim.migration_policy).plan is LlumnixMigrationPolicy.plan

    seen: list[FleetSnapshot] = []
    original = LlumnixMigrationPolicy.plan

    def spy(self, snapshot, draining):
        seen.append(snapshot)
        return original(self, snapshot, draining)

    monkeypatch.setattr(LlumnixMigrationPolicy, "plan", spy)
    sim.run(bursty(20, rate=20.0, prompt_median=8, prompt_range=(2, 12), output_median=20, output_range=(2, 30)))
    assert seen and all(isinstance(r, ReplicaSnapshot) for s in seen for p in s.pools.values() for r in p.replicas)


def test_a_migration_moves_a_request_and_charges_its_pause():
    """Round robin puts a long request (A: 20 + 30 tokens) and then a 40-token prompt (C) on the first of two
    replicas of 16 blocks: C cannot fit beside A, the second replica is idle. The policy moves A; C starts;
    every request ends with all its tokens, and A's pause is at least the profile's fixed 0.1 s."""
    profile = HAND.scaled(kv_blocks=16)
    trace = [TraceRequest(0.0, 20, 30, 30), TraceRequest(0.01, 4, 2, 2), TraceRequest(0.02, 40, 2, 2)]
    sim = FleetSimulator(SimConfig(pools=[SimPool("p", profile, 2)], policies={
        "router": {"name": "round_robin"}, "tick_s": 0.05,
        "migration": {"name": "llumnix", "params": {"costs": profile.migration_costs().__dict__,
                                                    "cooldown_s": 100}}}))
    result = sim.run(trace)
    moved = [m for m in result.migrations if m.outcome == "migrated"]
    assert all(r.output_tokens == t.output_tokens for r, t in zip(sorted(result.records, key=lambda r: r.arrival_s),
                                                                  trace))
    assert [m.request_id for m in moved] == [sim.migrations[0].request_id] and len(result.downtimes) == 1
    assert result.downtimes[0] >= 0.1  # the profile's fixed pause
    a = min(result.records, key=lambda r: r.arrival_s)
    assert a.migrations == 1
