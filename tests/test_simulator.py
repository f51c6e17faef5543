"""The fleet simulator: a small case computed by hand, and the same policy code as the live fleet.

No Ray, no engines: the simulator is pure Python over `rayfleet.policies`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayfleet.control_plane.simulator.fleet import FleetSimulator, SimConfig, SimPool
from rayfleet.control_plane.simulator.profiles import (
    GpuRoofline,
    MigrationModel,
    ReplicaProfile,
    StepTimeModel,
    profile,
    tensor_parallel,
)
from rayfleet.control_plane.simulator.workload import TraceRequest, bursty, diurnal_with_bursts, recurring_crowds
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


def test_tensor_parallel_splits_the_rooflines_work_and_adds_two_all_reduces_per_layer():
    """A roofline of 2 layers x 1000, 10 GB of weights on GPUs of 40 GB used at 0.5 (20 GB each, 1 GB reserved), 1 MB
    of KV per token, all-reduces at 1 GB/s of bus bandwidth and 1 ms per call. Two shards: each step's fixed part
    halves and gains 2 layers x 2 all-reduces x 1 ms; every token pays half its work plus the ring's
    2 x (2 - 1) / 2 of its 2 x 2 x 1000 x 2 bytes of activations = 8 us; the KV is what both GPUs hold beside one
    copy of the weights: 2 x (20 - 1) - 10 = 28 GB = 28,000 tokens = 7,000 blocks of 4 (one GPU: 9 GB, 2,250 blocks).
    One replica takes two GPUs."""
    roofline = GpuRoofline(gpu_memory_bytes=40e9, memory_utilization=0.5, weights_bytes=10e9, activation_bytes=1e9,
                           kv_bytes_per_token=1e6, hidden=1000, layers=2, allreduce_bus_bytes_s=1e9,
                           allreduce_latency_s=1e-3)
    one = HAND.scaled(roofline=roofline, kv_blocks=roofline.kv_blocks(1, 4))
    two = tensor_parallel(one, 2)
    assert two.step.base_s == pytest.approx(0.005 + 0.004)
    assert two.step.prefill_token_s == pytest.approx(0.0005 + 8e-6)
    assert two.step.decode_seq_s == pytest.approx(0.001 + 8e-6)
    assert (two.kv_blocks, two.gpus, one.kv_blocks, one.gpus) == (7000, 2, 2250, 1)
    assert tensor_parallel(one, 1) is one


def test_a_profile_without_a_roofline_cannot_be_sharded_and_the_error_names_those_that_can():
    with pytest.raises(ValueError, match="a100-llama-13b"):
        tensor_parallel(profile("cpu-tiny-llama-b"), 2)
    with pytest.raises(ValueError, match="must be >= 1"):
        tensor_parallel(profile("a100-llama-13b"), 0)


@pytest.mark.parametrize("name, model", [("h100-llama-13b", "llama-13b"), ("h100-llama3-8b", "llama3-8b")])
def test_the_measured_h100_profiles_reproduce_the_steps_they_were_measured_from(name, model):
    """The H100 profiles' step times are fits of steps measured on an H100 (`calibrate_gpu_profile.py`): every
    measured step within the fit's largest error (30%), 13% on average, and the same model's KV size."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "sim_calibration_h100.json"
    measured = json.loads(results.read_text())[model]
    step = profile(name).step
    errors = [abs(step.step_s(p["prefill_tokens"], 0, 0) - p["seconds"]) / p["seconds"]
              for p in measured["points"]["prefill"]]
    errors += [abs(step.step_s(0, p["batch"], p["batch"] * p["context"]) - p["seconds"]) / p["seconds"]
               for p in measured["points"]["decode"]]
    assert max(errors) < 0.31 and sum(errors) / len(errors) < 0.13, errors
    assert profile(name).roofline.kv_bytes_per_token == measured["kv_bytes_per_token"]
    assert tensor_parallel(profile(name), 2).kv_blocks > 2 * profile(name).kv_blocks  # one copy of the weights


def test_a_model_too_large_for_its_gpus_is_refused_with_what_it_needs():
    roofline = GpuRoofline(gpu_memory_bytes=24e9, memory_utilization=0.9, weights_bytes=26e9, activation_bytes=2e9,
                           kv_bytes_per_token=819_200, hidden=5120, layers=40)
    with pytest.raises(ValueError, match="26 GB of weights do not fit 1 GPU"):
        roofline.kv_blocks(1, 16)
    assert roofline.kv_blocks(2, 16) > 0


def test_a_sharded_replica_prefills_a_long_prompt_faster_and_holds_more_kv():
    """Through the simulator: one 4,000-token prompt alone on an A100 13B replica and on one sharded over two GPUs."""
    ttft = {}
    for degree in (1, 2):
        replica = tensor_parallel(profile("a100-llama-13b"), degree)
        record, = one_replica([TraceRequest(0.0, 4000, 1, 1)], replica).records
        ttft[degree] = record.ttft_s
    assert 1.8 < ttft[1] / ttft[2] < 2.0
    assert tensor_parallel(profile("a100-llama-13b"), 2).kv_blocks > 2 * profile("a100-llama-13b").kv_blocks


def test_the_one_day_diurnal_trace_is_the_one_the_documented_scaling_runs_used():
    """The recurring-crowd option leaves the default trace alone, request for request (counts as in
    docs/benchmarks-simulator.md's scaling table for seeds 1 and 2)."""
    assert [len(diurnal_with_bursts(1800.0, 6.0, period_s=1800.0, seed=seed)) for seed in (1, 2)] == [12130, 11519]


def test_a_multi_day_trace_repeats_its_recurring_crowd_at_the_same_time_of_day_within_the_jitter():
    day, jitter = 600.0, 60.0
    starts = recurring_crowds(3 * day, day, count=1, burst_s=120.0, jitter_s=jitter, seed=4)
    assert len(starts) == 3
    assert all(abs(later - earlier - day) <= 2 * jitter for earlier, later in zip(starts, starts[1:]))
    crowded = diurnal_with_bursts(3 * day, 6.0, period_s=day, bursts=0, recurring=1, seed=4)
    calm = diurnal_with_bursts(3 * day, 6.0, period_s=day, bursts=0, seed=4)

    def arrivals(trace: list[TraceRequest], start: float) -> int:  # in the crowd's middle minute
        return sum(1 for r in trace if start + 30 <= r.arrival_s < start + 90)

    assert all(arrivals(crowded, start) > 1.5 * arrivals(calm, start) for start in starts)  # 2.1x on average
