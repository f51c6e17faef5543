"""The GRPO trainer: a PyTorch causal LM that learns from sample groups, streaming, with checkpoint and resume.

Used in process (tests, the benchmark's analysis) or as a Ray actor (`TrainerActor`, the RL job's consumer).
A step accumulates gradients over micro-batches of `micro_batch_groups` groups, taken from the sample store
as soon as they are complete (no barrier on the whole step's data), then clips and steps the optimizer; with
`iterations` > 1 (GRPO's mu) it makes that many updates over the same groups, each a full pass whose ratio is
clipped against the rollout logprobs. Then it bumps the version. Version v means "after v steps"; the rollout
engines label tokens with it.

A checkpoint holds everything that decides what happens next: weights, optimizer moments, version, the
random generators' states, the staleness counters, and the job's own state (`extra`, e.g. its prompt
cursor). Resuming from it continues bit-for-bit as if never stopped (same thread count and torch build).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from rayfleet.actors.rl.grpo import LossParts, TokenBatch, build_batch, grpo_loss, token_logprobs
from rayfleet.actors.rl.samples import SampleGroup

logger = logging.getLogger("rayfleet.rl.trainer")

CHECKPOINT_FILE = "trainer.pt"


class TrainerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    clip_eps: float = Field(0.2, gt=0)
    kl_coef: float = Field(0.0, ge=0, description="Weight of the k3 KL to the starting model; 0: no reference.")
    max_grad_norm: float = Field(1.0, gt=0)
    micro_batch_groups: int = Field(2, ge=1, description="Groups per forward/backward (gradient accumulation).")
    iterations: int = Field(1, ge=1, description="Optimizer updates per step over the step's groups (GRPO's mu, "
                            "TRL's num_iterations): the first as the groups stream in, the rest over the same "
                            "groups, the importance ratio clipped against the rollout logprobs.")
    temperature: float = Field(1.0, gt=0, description="The rollouts' sampling temperature (set by the job).")
    seed: int = 0
    torch_threads: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs the trainer actor reserves.")


@dataclass
class StepReport:
    version: int  # after this step
    groups: int
    samples: int
    tokens: int
    reward_mean: float
    loss: float
    clipped_fraction: float
    mean_ratio: float
    kl: float
    version_lag_mean: float  # trainer version minus the samples' version, over the step's samples
    version_lag_max: int
    wait_s: float  # waiting for complete groups
    compute_s: float  # forward, backward, optimizer
    finished_at: float = field(default_factory=time.time)


@dataclass
class StalenessCounters:
    """What survives a restart alongside the weights: how much was used and how much came too late."""

    groups_used: int = 0
    samples_used: int = 0
    groups_dropped_stale: int = 0


class GRPOTrainer:
    def __init__(self, model_path: str, spec: TrainerSpec, checkpoint_dir: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.model_path = model_path
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        _seed_everything(spec.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model.train()
        self.reference = None
        if spec.kl_coef:
            self.reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
            self.reference.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        self.version = 0
        self.counters = StalenessCounters()
        self.extra: dict[str, Any] = {}
        self._pending: list[dict[str, float]] = []  # micro-batch metrics of the step in progress
        self._step_groups: list[list[SampleGroup]] = []  # its micro-batches, for the updates after the first
        self._pending_lags: list[int] = []
        self._pending_rewards: list[float] = []
        if self.checkpoint_dir is not None and (self.checkpoint_dir / CHECKPOINT_FILE).exists():
            self.load_checkpoint(self.checkpoint_dir)

    # ------------------------------------------------------------------ training
    def accumulate(self, groups: list[SampleGroup], micro_batches_per_step: int) -> dict[str, float]:
        """Forward and backward one micro-batch; its gradient is 1/`micro_batches_per_step` of the step's."""
        parts, batch = self._backward(groups, micro_batches_per_step)
        tokens = int(batch.completion_mask.sum())
        metrics = {**_loss_terms(parts), "tokens": tokens, "samples": len(batch.advantages), "groups": len(groups)}
        self._pending.append(metrics)
        self._pending_lags += [self.version - int(v) for v in batch.versions]
        self._pending_rewards += [r for g in groups for r in g.rewards]
        if self.spec.iterations > 1:
            self._step_groups.append(groups)
        return metrics

    def _backward(self, groups: list[SampleGroup], micro_batches_per_step: int) -> tuple[LossParts, TokenBatch]:
        batch = build_batch(groups, self.tokenizer.pad_token_id)
        logprobs = token_logprobs(self.model, batch, self.spec.temperature)
        reference = None
        if self.reference is not None:
            with torch.no_grad():
                reference = token_logprobs(self.reference, batch, self.spec.temperature)
        parts = grpo_loss(logprobs, batch, self.spec.clip_eps, self.spec.kl_coef, reference)
        (parts.loss / micro_batches_per_step).backward()
        return parts, batch

    def _update(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self, wait_s: float = 0.0, compute_s: float = 0.0) -> StepReport:
        """The step's updates (the accumulated one, then `iterations` - 1 more passes over its groups), then the
        version bump and the step's report (loss terms averaged over every pass)."""
        started = time.perf_counter()
        self._update()
        later: list[dict[str, float]] = []  # the loss terms of the passes after the first
        for _ in range(self.spec.iterations - 1):
            for groups in self._step_groups:
                later.append(_loss_terms(self._backward(groups, len(self._step_groups))[0]))
            self._update()
        self.version += 1
        pending, lags, rewards = self._pending, self._pending_lags, self._pending_rewards
        passes = pending + later
        self._pending, self._pending_lags, self._pending_rewards, self._step_groups = [], [], [], []
        groups = int(sum(m["groups"] for m in pending))
        samples = int(sum(m["samples"] for m in pending))
        self.counters.groups_used += groups
        self.counters.samples_used += samples
        return StepReport(
            version=self.version, groups=groups, samples=samples, tokens=int(sum(m["tokens"] for m in pending)),
            reward_mean=float(np.mean(rewards)) if rewards else 0.0,
            loss=float(np.mean([m["loss"] for m in passes])),
            clipped_fraction=float(np.mean([m["clipped_fraction"] for m in passes])),
            mean_ratio=float(np.mean([m["mean_ratio"] for m in passes])),
            kl=float(np.mean([m["kl"] for m in passes])),
            version_lag_mean=float(np.mean(lags)) if lags else 0.0, version_lag_max=max(lags, default=0),
            wait_s=wait_s, compute_s=compute_s + time.perf_counter() - started)

    def train_step(self, micro_batches: list[list[SampleGroup]]) -> StepReport:
        """One step (its `iterations` updates) over groups already in hand (tests, offline use)."""
        started = time.perf_counter()
        for groups in micro_batches:
            self.accumulate(groups, len(micro_batches))
        return self.optimizer_step(compute_s=time.perf_counter() - started)

    # ------------------------------------------------------------------ weights and evaluation
    def weight_arrays(self) -> dict[str, np.ndarray]:
        """Parameters by their Hugging Face names, as arrays (zero-copy readable from Ray's object store)."""
        return {name: tensor.detach().cpu().numpy().copy() for name, tensor in self.model.state_dict().items()}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.model.load_state_dict({name: torch.from_numpy(np.array(a)) for name, a in arrays.items()})

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy completions (token ids, up to EOS) by the trainer's own model."""
        self.model.eval()
        try:
            outputs = []
            for prompt in prompts:  # one at a time: no padding, so exactly what an engine computes
                out = self.model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)[0, len(prompt):].tolist()
                outputs.append(self._to_eos(out))
            return outputs
        finally:
            self.model.train()

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], max_new_tokens: int, n: int, temperature: float,
               seed: int = 0) -> list[list[list[int]]]:
        """`n` completions per prompt sampled at `temperature` (full distribution: no top-k/top-p), as the
        rollouts sample; seeded on a forked generator, so training's random state is untouched."""
        self.model.eval()
        try:
            outputs = []
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                for prompt in prompts:
                    rows = self.model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=True,
                                               temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=n,
                                               pad_token_id=self.tokenizer.pad_token_id)[:, len(prompt):].tolist()
                    outputs.append([self._to_eos(row) for row in rows])
            return outputs
        finally:
            self.model.train()

    def _to_eos(self, tokens: list[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str | Path | None = None) -> Path:
        directory = Path(directory or self.checkpoint_dir)
        if self._pending:
            raise RuntimeError("checkpoint in the middle of a step: finish it first")
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "version": self.version,
            "counters": asdict(self.counters), "extra": self.extra, "rng": _rng_state(),
            "model_path": self.model_path, "spec": self.spec.model_dump(),
        }
        tmp = directory / (CHECKPOINT_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, directory / CHECKPOINT_FILE)  # a crash mid-save keeps the previous checkpoint
        return directory / CHECKPOINT_FILE

    def load_checkpoint(self, directory: str | Path) -> None:
        state = torch.load(Path(directory) / CHECKPOINT_FILE, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = state["version"]
        self.counters = StalenessCounters(**state["counters"])
        self.extra = state["extra"]
        _set_rng_state(state["rng"])
        logger.info("resumed from %s at version %d (%s)", directory, self.version, self.counters)


def _loss_terms(parts: LossParts) -> dict[str, float]:
    return {"loss": float(parts.loss.detach()), "clipped_fraction": parts.clipped_fraction,
            "mean_ratio": parts.mean_ratio, "kl": parts.kl}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class TrainerActor:
    """The trainer as the RL job's consumer (a Ray actor): takes micro-batches from the sample store as they
    complete, steps, publishes each version to the weight store. Compute runs in a thread, so the actor still
    answers status calls mid-step."""

    def __init__(self, model_path: str, spec: TrainerSpec, checkpoint_dir: str | None = None) -> None:
        logging.basicConfig(level=os.environ.get("RAYFLEET_LOG_LEVEL", "INFO"))
        self.trainer = GRPOTrainer(model_path, spec, checkpoint_dir)
        self.snapshots: dict[int, dict[str, np.ndarray]] = {}

    def state(self) -> dict[str, Any]:
        return {"version": self.trainer.version, "counters": asdict(self.trainer.counters),
                "extra": self.trainer.extra, "taken_this_step": sum(m["groups"] for m in self.trainer._pending)}

    async def step(self, store, groups_per_step: int, k: int, timeout_s: float) -> StepReport:
        spec = self.trainer.spec
        micro_batches = groups_per_step // spec.micro_batch_groups
        wait_s = compute_s = 0.0
        for _ in range(micro_batches):
            started = time.perf_counter()
            groups = await store.take(spec.micro_batch_groups, self.trainer.version, k, timeout_s)
            taken = time.perf_counter()
            wait_s += taken - started
            await asyncio.to_thread(self.trainer.accumulate, groups, micro_batches)
            compute_s += time.perf_counter() - taken
        return await asyncio.to_thread(self.trainer.optimizer_step, wait_s, compute_s)

    async def publish(self, weight_store) -> int:
        """Put this version's weights into the object store once; the weight store names it."""
        import ray

        ref = ray.put(self.trainer.weight_arrays())
        await weight_store.put.remote(self.trainer.version, [ref])
        return self.trainer.version

    def snapshot(self) -> int:
        """Keep this version's weights for evaluation after the run (evaluation then costs the run nothing)."""
        self.snapshots[self.trainer.version] = self.trainer.weight_arrays()
        return self.trainer.version

    def snapshot_versions(self) -> list[int]:
        return sorted(self.snapshots)

    def save_checkpoint(self, extra: dict[str, Any], groups_dropped_stale: int) -> str:
        self.trainer.extra = dict(extra)
        self.trainer.counters.groups_dropped_stale = groups_dropped_stale
        return str(self.trainer.save_checkpoint())

    def evaluate(self, version: int, prompts: list[list[int]], max_new_tokens: int, samples: int = 0,
                 temperature: float = 1.0) -> tuple[list[list[int]], list[list[list[int]]]]:
        """Greedy completions of a snapshot and, with `samples`, that many sampled ones per prompt (the same
        seed for every version); restores the live weights afterwards."""
        live = self.trainer.weight_arrays()
        self.trainer.load_arrays(self.snapshots[version])
        try:
            sampled = self.trainer.sample(prompts, max_new_tokens, samples, temperature) if samples else []
            return self.trainer.greedy(prompts, max_new_tokens), sampled
        finally:
            self.trainer.load_arrays(live)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return self.trainer.greedy(prompts, max_new_tokens)
