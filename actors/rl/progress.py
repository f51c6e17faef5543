"""The RL job's progress where `rayfleet status` finds it: one named Ray actor per cluster holding the current
run's configuration summary and its per-step records (the latest run replaces the previous one's)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import ray

PROGRESS_ACTOR = "rayfleet-rl-progress"


@dataclass(frozen=True)
class StepRecord:
    step: int  # the trainer's version after the step
    elapsed_s: float  # since the run's first rollout
    reward_mean: float  # rollout (training) reward of the step's samples
    samples_per_s: float  # samples trained on per second, since the start
    version_lag_mean: float
    version_lag_max: int
    dropped_stale: int  # groups dropped by the staleness bound, since the start
    pool_version: int  # the rollout replicas' weight version
    sync_s: float  # weight sync time, since the start
    wait_s: float  # the trainer's wait for complete groups in this step
    compute_s: float  # the trainer's compute in this step
    replays: int  # rollouts replayed after a lost replica, since the start
    resubmits: int  # rollouts continued after an aborting weight update, since the start
    at: float = field(default_factory=time.time)


class RLProgress:
    def __init__(self) -> None:
        self.run: dict[str, Any] = {}
        self.steps: list[dict[str, Any]] = []
        self.state = "idle"
        self.error = ""

    def start(self, run: dict[str, Any]) -> None:
        self.run, self.steps, self.state, self.error = dict(run), [], "running", ""

    def record(self, record: StepRecord) -> None:
        self.steps.append(asdict(record))

    def finish(self, state: str, error: str = "", **summary: Any) -> None:
        self.state, self.error = state, error
        self.run.update(summary)

    def status(self, last: int = 5) -> dict[str, Any]:
        return {"state": self.state, "error": self.error, "run": self.run, "steps": self.steps[-last:],
                "steps_done": len(self.steps)}


def progress_actor():
    """The cluster's RL progress actor (created on first use; it outlives the job so the result stays visible)."""
    return ray.remote(RLProgress).options(name=PROGRESS_ACTOR, namespace="rayfleet", get_if_exists=True,
                                          lifetime="detached", num_cpus=0).remote()


def find_progress_actor():
    try:
        return ray.get_actor(PROGRESS_ACTOR, namespace="rayfleet")
    except ValueError:
        return None
