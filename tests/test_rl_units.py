"""RL pure parts: the staleness bound and sync policies, per-token version labels, GRPO's advantages and loss,
the RL config's errors, and the trainer's checkpoint/resume equivalence (PyTorch on the committed task model;
no Ray, no engine)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rayfleet.actors.rl.grpo import build_batch, group_advantages, grpo_loss, token_logprobs
from rayfleet.actors.rl.rollout import TaskStream, held_out, label_versions, render_prompt
from rayfleet.actors.rl.samples import Sample, SampleGroup
from rayfleet.actors.rl.trainer import GRPOTrainer, TrainerSpec
from rayfleet.actors.tasks import TRAINED_MODELS_DIR
from rayfleet.policies import registry
from rayfleet.policies.rl import Admission, DeferredSync, EagerSync, StalenessBound

REPO = Path(__file__).resolve().parents[1]
TASK_MODEL = TRAINED_MODELS_DIR / "task-small"


# ---------------------------------------------------------------------- staleness bound and admission
@pytest.mark.parametrize("k, sample, trainer, usable", [
    (0, 3, 3, True), (0, 3, 4, False), (1, 3, 4, True), (1, 3, 5, False), (2, 3, 5, True),
    (2, 5, 4, False),  # newer than the trainer: left over from a lineage the trainer resumed away from
])
def test_staleness_bound_uses_a_sample_only_within_k_versions(k, sample, trainer, usable):
    assert StalenessBound(k).usable(sample, trainer) is usable


def test_staleness_bound_rejects_a_negative_k():
    with pytest.raises(ValueError, match="k must be >= 0"):
        StalenessBound(-1)


def test_k0_admits_one_step_of_groups_per_version_and_only_on_current_weights():
    bound, per_step = StalenessBound(0), 4
    # Trainer at v0, nothing in flight: groups 0..3 feed step 0, on v0 weights.
    assert [bound.admit(bound.next_group_step(0, 0, n, per_step), 0, 0) for n in range(5)] == \
        [Admission.START] * 4 + [Admission.AHEAD]
    # After step 1 the next group feeds step 1: v0 weights would be stale by then.
    step = bound.next_group_step(1, 0, 0, per_step)
    assert bound.admit(step, 1, 0) is Admission.STALE_WEIGHTS
    assert bound.admit(step, 1, 1) is Admission.START


def test_k1_lets_rollouts_run_one_step_ahead_on_older_weights():
    bound, per_step = StalenessBound(1), 4
    assert [bound.admit(bound.next_group_step(0, 0, n, per_step), 0, 0) for n in range(9)] == \
        [Admission.START] * 8 + [Admission.AHEAD]
    # Trainer at v2, replicas still on v0: a group for step 2 would be 2 versions old.
    assert bound.admit(bound.next_group_step(2, 0, 0, per_step), 2, 0) is Admission.STALE_WEIGHTS
    assert bound.admit(bound.next_group_step(2, 0, 0, per_step), 2, 1) is Admission.START


def test_eager_sync_pushes_every_version_and_deferred_only_what_the_bound_needs():
    eager, deferred = EagerSync(), DeferredSync()
    assert eager.should_sync(replica_version=3, trainer_version=4, needed_version=2)
    assert not deferred.should_sync(replica_version=3, trainer_version=4, needed_version=2)
    assert deferred.should_sync(replica_version=3, trainer_version=4, needed_version=4)
    assert not eager.should_sync(4, 4, 4)
    # After a resume to an older checkpoint both replace weights of the abandoned lineage.
    assert eager.should_sync(6, 4, 3) and deferred.should_sync(6, 4, 3)
    # A replica never synced (-1) is synced by both.
    assert eager.should_sync(-1, 0, 0) and deferred.should_sync(-1, 0, 0)


def test_sync_policies_are_plugins():
    assert isinstance(registry.create("weight_sync", "eager"), EagerSync)
    with pytest.raises(registry.UnknownPolicy, match="allowed: deferred, eager"):
        registry.create("weight_sync", "sometimes")


# ---------------------------------------------------------------------- per-token versions
class Span:
    def __init__(self, version, start, end):
        self.version, self.start, self.end = version, start, end


def test_version_labels_follow_the_engines_spans_across_a_replay():
    # Engine request 1 made 3 tokens (v4, v4, v5) then its replica died before finishing (no spans arrive);
    # the replay made 2 more on v5. Tokens without a label get the floor.
    segments = [(3, [Span("5", 0, 2)])]
    assert label_versions(5, segments, floor=4) == [4, 4, 4, 5, 5]
    assert label_versions(4, [(0, [Span("2", 0, 1), Span("3", 1, 4)])], floor=0) == [2, 3, 3, 3]


def test_a_token_from_an_unsynced_engine_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match="weight version 'default'"):
        label_versions(2, [(0, [Span("default", 0, 2)])], floor=0)


# ---------------------------------------------------------------------- GRPO
def sample(group: str, index: int, reward: float, completion=(40, 41, 1), version: int = 0, size: int = 2):
    return Sample(group_id=group, index=index, group_size=size, task_key="products/hard/1",
                  prompt_token_ids=(263, 266, 30, 267, 264), completion_token_ids=tuple(completion),
                  rollout_logprobs=tuple([-1.0] * len(completion)), token_versions=tuple([version] * len(completion)),
                  reward=reward)


def test_group_advantages_are_normalized_within_the_group():
    advantages = group_advantages([1.0, 0.0, 0.0, 1.0])
    assert advantages == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    assert group_advantages([1.0, 1.0]) == [0.0, 0.0]  # no signal when every sample scores the same


def test_sample_rejects_misaligned_logprobs_and_versions():
    with pytest.raises(ValueError, match="2 completion tokens, 1 logprobs"):
        Sample("g", 0, 2, "k", (1,), (5, 6), (-1.0,), (0, 0), 1.0)


def test_grpo_loss_pushes_up_the_better_sample_and_clips_far_off_policy_ratios():
    model = GRPOTrainer(str(TASK_MODEL), TrainerSpec()).model
    group = SampleGroup("g", (sample("g", 0, 1.0, (30, 31, 1)), sample("g", 1, 0.0, (32, 33, 1))))
    batch = build_batch([group], pad_token_id=3)
    assert batch.completion_mask.sum() == 6 and batch.advantages.tolist() == pytest.approx([1.0, -1.0], abs=1e-5)
    logprobs = token_logprobs(model, batch)
    batch.old_logprobs = logprobs.detach() * batch.completion_mask
    on_policy = grpo_loss(logprobs, batch, clip_eps=0.2)
    assert on_policy.mean_ratio == pytest.approx(1.0) and on_policy.clipped_fraction == 0.0
    on_policy.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    batch.old_logprobs = (logprobs.detach() - 1.0) * batch.completion_mask  # the rollout policy was far less sure
    assert grpo_loss(logprobs, batch, clip_eps=0.2).clipped_fraction == pytest.approx(1.0)


def row_logprobs(model, prompt, completion) -> torch.Tensor:
    """log pi(completion token t | prompt + tokens before t), one unpadded row: the reference the batch must equal."""
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_grpo_on_a_padded_batch_is_the_policy_gradient_and_a_step_moves_toward_the_better_samples():
    """Two groups whose prompts and completions differ in length (so rows are padded differently): the trainer's
    per-token logprobs equal an unpadded row-by-row gather (logits at t-1 predict token t; prompt and padding
    masked), its gradient equals the plain policy gradient -(1/tokens) sum_i A_i grad log pi(y_i), and one
    small optimizer step raises the surrogate sum_i A_i log pi(y_i) and each better sample's logprob (the worse
    ones share tokens, e.g. EOS, with the better ones, so one of them may rise with them)."""
    trainer = GRPOTrainer(str(TASK_MODEL), TrainerSpec(lr=1e-5))
    model = trainer.model
    prompts = [(263, 266, 30, 267, 264), (263, 266, 31, 32, 267, 33, 264)]
    completions = [[(40, 41, 1), (42, 1), (43, 44, 45, 46, 1)], [(47, 1), (48, 49, 1), (50, 1)]]
    rewards = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    with torch.no_grad():
        old = [[row_logprobs(model, p, c) for c in cs] for p, cs in zip(prompts, completions)]
    groups = [SampleGroup(f"g{g}", tuple(
        Sample(f"g{g}", i, 3, "k", p, c, tuple(old[g][i].tolist()), (0,) * len(c), rewards[g][i])
        for i, c in enumerate(cs))) for g, (p, cs) in enumerate(zip(prompts, completions))]
    batch = build_batch(groups, pad_token_id=3)
    advantages = [a for g in rewards for a in group_advantages(g)]
    assert batch.advantages.tolist() == pytest.approx(advantages, abs=1e-5)
    assert [a > 0 for a in advantages] == [r > 0.5 for g in rewards for r in g]

    logprobs = token_logprobs(model, batch)
    rows = [(p, c) for p, cs in zip(prompts, completions) for c in cs]
    for i, (p, c) in enumerate(rows):
        assert logprobs[i][batch.completion_mask[i]].tolist() == pytest.approx(old[i // 3][i % 3].tolist(), abs=1e-5)
    parts = grpo_loss(logprobs, batch, clip_eps=0.2)
    assert parts.mean_ratio == pytest.approx(1.0, abs=1e-5)
    parts.loss.backward()
    grad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    tokens = sum(len(c) for _, c in rows)
    reference = -sum(a * row_logprobs(model, p, c).sum() for a, (p, c) in zip(advantages, rows)) / tokens
    reference.backward()
    for got, want in zip(grad, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3)
    model.zero_grad()

    trainer.train_step([groups])
    with torch.no_grad():
        moved = [float(row_logprobs(model, p, c).sum() - old[i // 3][i % 3].sum()) for i, (p, c) in enumerate(rows)]
    assert all(m > 0 for m, a in zip(moved, advantages) if a > 0), moved
    assert sum(a * m for a, m in zip(advantages, moved)) > 0, moved
    assert sum(m for m, a in zip(moved, advantages) if a < 0) < 0, moved


# ---------------------------------------------------------------------- checkpoint / resume
def fixed_groups(trainer: GRPOTrainer, steps: int) -> list[list[list[SampleGroup]]]:
    """Deterministic groups from real prompts, sampled from the starting model, for `steps` steps of 2 x 2."""
    torch.manual_seed(123)
    tasks = TaskStream({("products", "hard"): 1.0}, seed=3)
    schedule = []
    for step in range(steps):
        micro = []
        for m in range(2):
            groups = []
            for g in range(2):
                instance = next(tasks)
                prompt = render_prompt(trainer.tokenizer, instance)
                samples = []
                for i in range(4):
                    completion = tuple(torch.randint(20, 40, (3,)).tolist()) + (1,)
                    samples.append(Sample(f"s{step}m{m}g{g}", i, 4, instance.key, tuple(prompt), completion,
                                          tuple((-2.0 - 0.1 * torch.rand(4)).tolist()), (step,) * 4,
                                          reward=float(i % 2)))
                groups.append(SampleGroup(f"s{step}m{m}g{g}", tuple(samples)))
            micro.append(groups)
        schedule.append(micro)
    return schedule


def test_checkpoint_and_resume_continue_exactly_as_an_uninterrupted_run(tmp_path):
    spec = TrainerSpec(lr=1e-3, micro_batch_groups=2, seed=5, torch_threads=1)
    straight = GRPOTrainer(str(TASK_MODEL), spec)
    schedule = fixed_groups(straight, 4)
    straight_losses = [straight.train_step(micro).loss for micro in schedule]

    first = GRPOTrainer(str(TASK_MODEL), spec, checkpoint_dir=str(tmp_path))
    losses = [first.train_step(micro).loss for micro in schedule[:2]]
    first.extra = {"task_cursor": 17}
    first.counters.groups_dropped_stale = 3
    first.save_checkpoint()
    del first
    resumed = GRPOTrainer(str(TASK_MODEL), spec, checkpoint_dir=str(tmp_path))
    assert (resumed.version, resumed.extra, resumed.counters.groups_dropped_stale) == (2, {"task_cursor": 17}, 3)
    losses += [resumed.train_step(micro).loss for micro in schedule[2:]]

    assert losses == straight_losses
    assert resumed.version == straight.version == 4
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert not math.isnan(losses[-1])


def test_iterations_update_the_step_groups_that_many_times_under_one_version():
    """GRPO's mu: a step with `iterations` 3 makes the same three updates as three one-update steps over the same
    groups (bit for bit: each pass is the full batch's gradient, its ratio against the rollout logprobs), but
    publishes one version; its report averages the passes' loss terms (the later passes' ratios have moved off 1
    and are clipped)."""
    spec = TrainerSpec(lr=3e-3, micro_batch_groups=2, seed=5, torch_threads=1)
    once = GRPOTrainer(str(TASK_MODEL), spec)
    micro = fixed_groups(once, 1)[0]
    passes = [once.train_step(micro) for _ in range(3)]
    thrice = GRPOTrainer(str(TASK_MODEL), spec.model_copy(update={"iterations": 3}))
    report = thrice.train_step(micro)

    assert (thrice.version, once.version) == (1, 3)
    assert (report.groups, report.samples) == (4, 16)  # counted once, not per pass
    assert thrice.counters.samples_used == 16
    for (name, a), (_, b) in zip(once.model.state_dict().items(), thrice.model.state_dict().items()):
        assert torch.equal(a, b), name
    for term in ("loss", "clipped_fraction", "mean_ratio"):
        assert getattr(report, term) == pytest.approx(sum(getattr(r, term) for r in passes) / 3), term
    assert passes[-1].clipped_fraction > 0 and report.clipped_fraction > 0


# ---------------------------------------------------------------------- prompts and config
def test_task_stream_is_reproducible_from_its_cursor():
    cells = {("products", "hard"): 1.0, ("chain_sum", "easy"): 1.0}
    whole = [next(TaskStream(cells, seed=4)) for _ in range(1)]
    stream = TaskStream(cells, seed=4)
    first = [next(stream).key for _ in range(1030)]
    resumed = TaskStream(cells, seed=4, start=1000)
    assert [next(resumed).key for _ in range(30)] == first[1000:]
    assert whole[0].key == first[0]
    assert not {i.key for i in held_out(cells, 1_950_000_000, 64)} & set(first)


def test_the_example_config_loads(monkeypatch):
    from rayfleet.control_plane.rl.config import load_rl_config

    monkeypatch.setenv("RAYFLEET_TASK_MODELS", str(TASK_MODEL.parent))
    config = load_rl_config(REPO / "examples" / "rl" / "products.yaml")
    assert config.model == str(TASK_MODEL.parent / "task-small-mid") and config.rollout_pool == "rl"
    assert config.trainer.temperature == config.sampling.temperature == 0.7


def test_rl_config_errors_name_the_field():
    from rayfleet.control_plane.rl.config import RLConfigError, parse_rl_config

    base = {"model": str(TASK_MODEL), "tasks": {"cells": [["products", "hard", 1.0]]}}
    with pytest.raises(RLConfigError, match=r"staleness_bound: Input should be greater than or equal to 0"):
        parse_rl_config({**base, "staleness_bound": -1})
    with pytest.raises(RLConfigError, match=r"trainer.micro_batch_groups \(3\) must divide groups_per_step \(8\)"):
        parse_rl_config({**base, "trainer": {"micro_batch_groups": 3}})
    with pytest.raises(RLConfigError, match=r"weight_sync.interrupt: Input should be 'keep' or 'abort'"):
        parse_rl_config({**base, "weight_sync": {"interrupt": "later"}})
    with pytest.raises(RLConfigError, match=r"tasks.cells: Value error, unknown task family 'gsm8k'|tasks.cells: unknown task family 'gsm8k'"):
        parse_rl_config({**base, "tasks": {"cells": [["gsm8k", "hard", 1.0]]}})
    with pytest.raises(RLConfigError, match=r"trainer.learning_rate: unknown field"):
        parse_rl_config({**base, "trainer": {"learning_rate": 1}})
    parsed = parse_rl_config({**base, "sampling": {"temperature": 0.7}})
    assert parsed.trainer.temperature == 0.7  # the trainer's ratio uses the rollouts' temperature



def test_job_flags_override_the_config_and_a_bad_value_names_its_flag(monkeypatch, capsys):
    from rayfleet.control_plane.rl.__main__ import build_parser, configure

    monkeypatch.setenv("RAYFLEET_TASK_MODELS", str(TASK_MODEL.parent))
    parser = build_parser()
    config = configure(parser.parse_args(["--config", str(REPO / "examples" / "rl" / "products.yaml"), "-k", "2",
                                          "--steps", "3", "--eval-count", "16", "--eval-samples", "0"]))
    assert (config.staleness_bound, config.steps, config.eval.count, config.eval.samples) == (2, 3, 16, 0)
    assert config.eval.every_steps == 3  # the config's: untouched by the overrides
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", "x.yaml", "--eval-count", "0"])
    assert "argument --eval-count: must be >= 1, not 0" in capsys.readouterr().err

# ---------------------------------------------------------------------- sample store shard (the class, no actor)
async def test_samples_of_one_group_waiting_for_room_all_go_in_once_one_of_them_gets_it():
    """Backpressure admits groups, not samples: when a full shard frees room, a group whose samples all waited
    takes it once and completes (it used to leave its other samples waiting for room forever)."""
    import asyncio

    from rayfleet.actors.rl.sample_store import SampleStoreShard

    def sample(group: str, index: int) -> Sample:
        return Sample(group, index, 2, "t", (1,), (5,), (-0.5,), (0,), reward=float(index))

    shard = SampleStoreShard(capacity_groups=1)
    await shard.put(sample("full", 0))  # the shard's one slot, held by a pending group
    waiting = [asyncio.ensure_future(shard.put(sample("late", i), timeout_s=5)) for i in range(2)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiting) and shard.stats().put_waits == 2
    await shard.put(sample("full", 1))
    assert [g.group_id for g in await shard.claim(["full"])] == ["full"]  # room again
    await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert shard.stats().complete_groups == 1 and shard.stats().pending_groups == 0


def test_a_rollout_pool_asks_vllm_for_the_logprobs_of_the_distribution_it_samples_from():
    """vLLM's default logprobs are raw (before temperature); the trainer's ratio divides by the temperature, so at
    any temperature but 1 a raw logprob would skew every ratio."""
    from rayfleet.control_plane.spec import PoolSpec

    pool = PoolSpec.model_validate({"name": "rl", "model": str(TASK_MODEL), "rollout": True})
    assert pool.engine_args["logprobs_mode"] == "processed_logprobs"
    assert pool.engine_args["weight_transfer_config"] == {"backend": "rayfleet_object_store"}
    chosen = PoolSpec.model_validate({"name": "rl", "model": str(TASK_MODEL), "rollout": True,
                                      "engine_args": {"logprobs_mode": "processed_logits"}})
    assert chosen.engine_args["logprobs_mode"] == "processed_logits"  # an explicit choice is kept
