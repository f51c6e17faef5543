"""RL decisions over weight versions: which samples are still usable, when a rollout group may start, and when
rollout replicas take the trainer's newest weights.

Versions count the trainer's optimizer steps: weights of version v are the trainer's after v steps, and every
rollout token carries the version that sampled it. A group's version is its oldest token's.

- **Staleness bound k** (`StalenessBound`): a sample of version v is used only while the trainer's version t
  satisfies v <= t <= v + k. k = 0 is synchronous on-policy training.
- **Admission** (`StalenessBound.admit`, AReaL's bound on how far rollouts run ahead): the next group to start
  will be trained on at step s = t + (groups already taken toward step t + groups started and not yet taken) // B
  (B groups per step). It may start only if s <= t + k (else rollouts are too far ahead) and the replica that
  runs it has weights of version >= s - k (else the group would be stale when its turn comes).
- **Weight sync** (`EagerSync`, `DeferredSync`; plugins of the `rayfleet.weight_sync` entry-point group): eager
  pushes every new version at once (freshest samples, one sync per step); deferred pushes only when admission
  would otherwise block on stale weights (AsyncFlow's deferred update: fewer syncs, older samples within k).

Nothing here talks to Ray, engines or the trainer: the RL job feeds these numbers and carries out the answers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class Admission(str, enum.Enum):
    START = "start"
    AHEAD = "ahead"  # rollouts already cover the next k + 1 steps: wait for the trainer
    STALE_WEIGHTS = "stale_weights"  # the replica's weights are too old for the step this group feeds: sync first


@dataclass(frozen=True)
class StalenessBound:
    k: int

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"staleness bound k must be >= 0, got {self.k}")

    def usable(self, sample_version: int, trainer_version: int) -> bool:
        """A sample of `sample_version` may enter the gradient of the trainer at `trainer_version`. A version
        newer than the trainer's cannot come from this trainer's lineage (e.g. left over from before a resume)."""
        return sample_version <= trainer_version <= sample_version + self.k

    @staticmethod
    def next_group_step(trainer_version: int, taken_this_step: int, in_flight: int, groups_per_step: int) -> int:
        """The trainer step that will consume the next group started now (groups are consumed oldest first)."""
        return trainer_version + (taken_this_step + in_flight) // groups_per_step

    def admit(self, step: int, trainer_version: int, replica_version: int) -> Admission:
        if step > trainer_version + self.k:
            return Admission.AHEAD
        if replica_version < step - self.k:
            return Admission.STALE_WEIGHTS
        return Admission.START


@runtime_checkable
class WeightSyncPolicy(Protocol):
    def should_sync(self, replica_version: int, trainer_version: int, needed_version: int) -> bool:
        """Push the trainer's weights to a replica now? `needed_version` is the oldest version the next group
        may start with (`step - k`). A replica newer than the trainer holds weights of a lineage the trainer
        left (it resumed from an older checkpoint): every policy replaces those."""


class EagerSync:
    """Every new version goes to the replicas as soon as the trainer publishes it."""

    def should_sync(self, replica_version: int, trainer_version: int, needed_version: int) -> bool:
        return replica_version != trainer_version


class DeferredSync:
    """Keep the replica's weights until the staleness bound forces an update (fewer pauses, older samples)."""

    def should_sync(self, replica_version: int, trainer_version: int, needed_version: int) -> bool:
        return replica_version < min(needed_version, trainer_version) or replica_version > trainer_version
