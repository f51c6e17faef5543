"""The RL job's configuration (`examples/rl/*.yaml`, the Helm chart's `rlJob.config`), validated with pydantic;
errors name the field path, as the fleet spec's do."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from rayfleet.actors.rl.trainer import TrainerSpec
from rayfleet.actors.tasks import FAMILIES
from rayfleet.control_plane.spec import SpecError, Strict, _resolve_path, format_validation_error, read_yaml


class RLConfigError(ValueError):
    """An RL configuration that cannot be used; the message names every offending field."""


class TaskMix(Strict):
    """Which task instances rollouts train on: (family, difficulty, weight) cells of `rayfleet.actors.tasks`."""

    cells: list[tuple[str, str, float]] = Field(min_length=1)
    seed: int = Field(0, ge=0, description="Training prompts are drawn from this seed on, reproducibly.")

    @field_validator("cells")
    @classmethod
    def _known_cells(cls, cells: list[tuple[str, str, float]]) -> list[tuple[str, str, float]]:
        for family, difficulty, weight in cells:
            if family not in FAMILIES:
                raise ValueError(f"unknown task family '{family}'; allowed: {', '.join(FAMILIES)}")
            if difficulty not in FAMILIES[family].levels:
                raise ValueError(f"unknown difficulty '{difficulty}' of '{family}'; allowed: "
                                 f"{', '.join(FAMILIES[family].levels)}")
            if weight <= 0:
                raise ValueError(f"the weight of ({family}, {difficulty}) must be > 0")
        return cells


class EvalSpec(Strict):
    """Held-out evaluation: verifier reward on instances from seeds no training prompt uses."""

    count: int = Field(64, ge=1)
    seed: int = Field(1_950_000_000, ge=0)
    every_steps: int = Field(5, ge=1, description="Snapshot the weights for evaluation every this many steps.")
    samples: int = Field(0, ge=0, description="Also sample this many completions per instance at the rollouts' "
                         "temperature: the policy's own expected reward, which GRPO optimizes (greedy is a proxy).")


class SamplingSpec(Strict):
    temperature: float = Field(1.0, gt=0)
    max_tokens: int = Field(16, ge=1)


class WeightSyncSpec(Strict):
    policy: str = Field("eager", description="A `rayfleet.weight_sync` plugin: eager or deferred.")
    interrupt: Literal["keep", "abort"] = Field(
        "keep", description="Requests running at an update: keep (continue on the new weights, KV recomputed) "
        "or abort (end them; the rollout resubmits prompt + tokens so far).")
    timeout_s: float = Field(60.0, gt=0, description="Bound on one replica's update; a miss fails the sync loudly.")
    retries: int = Field(2, ge=0, description="Failed syncs retried before the job stops.")


class StoreSpec(Strict):
    shards: int = Field(1, ge=1)
    capacity_groups: int = Field(64, ge=1, description="Groups one shard holds before producers wait.")


class CheckpointSpec(Strict):
    dir: str | None = Field(None, description="Where checkpoints go; a run with checkpoints there resumes.")
    every_steps: int = Field(10, ge=1)


class RLConfig(Strict):
    name: str = "rl"
    algorithm: Literal["grpo"] = "grpo"
    model: str = Field(description="The checkpoint training starts from (a Hugging Face folder); the rollout "
                       "pool must serve the same architecture.")
    rollout_pool: str = Field("rl", description="The fleet pool whose replicas run rollouts.")
    tasks: TaskMix
    eval: EvalSpec = Field(default_factory=EvalSpec)
    group_size: int = Field(8, ge=2, description="G: samples per prompt.")
    groups_per_step: int = Field(8, ge=1, description="Groups per optimizer step.")
    steps: int = Field(20, ge=1, description="Optimizer steps of the run (a resumed run counts the earlier ones).")
    staleness_bound: int = Field(1, ge=0, description="k: a sample of version v trains only while the trainer's "
                                 "version is at most v + k; 0 is synchronous on-policy training.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec, description="The trainer's hyperparameters; its "
                                 "temperature is always the sampling temperature.")
    weight_sync: WeightSyncSpec = Field(default_factory=WeightSyncSpec)
    store: StoreSpec = Field(default_factory=StoreSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    max_replays: int = Field(2, ge=0, description="Replica losses one rollout may survive (the ledger replays it).")
    promote_to: str | None = Field(None, description="A serving pool that gets the final version when the run "
                                   "ends (rolling: drain by migration, reload, one replica at a time).")

    @model_validator(mode="after")
    def _consistent(self) -> RLConfig:
        if self.groups_per_step % self.trainer.micro_batch_groups:
            raise ValueError(f"trainer.micro_batch_groups ({self.trainer.micro_batch_groups}) must divide "
                             f"groups_per_step ({self.groups_per_step})")
        # The importance ratio compares the trainer's logprobs with the engine's at the same temperature.
        object.__setattr__(self, "trainer", self.trainer.model_copy(update={"temperature": self.sampling.temperature}))
        return self


def parse_rl_config(data: Any, base: Path | None = None) -> RLConfig:
    """Validate; `$VARS` in paths expand and `./x` resolves against `base` (the config file's folder)."""
    try:
        config = RLConfig.model_validate(data)
    except ValidationError as error:
        raise RLConfigError(format_validation_error(error).replace("invalid fleet spec", "invalid RL config")) from None
    base = base or Path.cwd()
    try:
        updates: dict[str, Any] = {"model": _resolve_path(config.model, base, "model")}
        if config.checkpoint.dir:
            updates["checkpoint"] = config.checkpoint.model_copy(
                update={"dir": _resolve_path(config.checkpoint.dir, base, "checkpoint.dir")})
    except SpecError as error:
        raise RLConfigError(str(error)) from None
    return config.model_copy(update=updates)


def load_rl_config(path: str | Path) -> RLConfig:
    path = Path(path)
    try:
        data = read_yaml(path, "RL config")
    except SpecError as error:
        raise RLConfigError(str(error)) from None
    return parse_rl_config(data, path.parent)
