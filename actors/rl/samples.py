"""What rollouts produce and the trainer consumes: one sample (a completion of a prompt) and one group (the G
samples of one prompt, whose rewards normalize each other's advantages)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    group_id: str
    index: int  # 0 .. group_size - 1 within its group
    group_size: int
    task_key: str  # the task instance it answers (`TaskInstance.key`)
    prompt_token_ids: tuple[int, ...]
    completion_token_ids: tuple[int, ...]
    rollout_logprobs: tuple[float, ...]  # the sampling engine's logprob of each completion token
    token_versions: tuple[int, ...]  # the weight version that sampled each completion token
    reward: float
    finish_reason: str = "stop"
    replays: int = 0  # times it continued on another replica after losing one (the ledger's replays)
    resubmits: int = 0  # times a weight update aborted it and it continued from its tokens so far

    def __post_init__(self) -> None:
        n = len(self.completion_token_ids)
        if not n or len(self.rollout_logprobs) != n or len(self.token_versions) != n:
            raise ValueError(f"sample {self.group_id}/{self.index}: {n} completion tokens, "
                             f"{len(self.rollout_logprobs)} logprobs, {len(self.token_versions)} versions")
        if not 0 <= self.index < self.group_size:
            raise ValueError(f"sample index {self.index} outside its group of {self.group_size}")

    @property
    def version(self) -> int:
        """The oldest weights that contributed a token: what staleness is measured by."""
        return min(self.token_versions)


@dataclass(frozen=True)
class SampleGroup:
    group_id: str
    samples: tuple[Sample, ...]  # ordered by index, complete

    @property
    def version(self) -> int:
        return min(sample.version for sample in self.samples)

    @property
    def rewards(self) -> list[float]:
        return [sample.reward for sample in self.samples]

    @property
    def num_tokens(self) -> int:
        return sum(len(sample.completion_token_ids) for sample in self.samples)
