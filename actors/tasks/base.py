"""The task instance and the verifier protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class TaskInstance:
    """One seeded task: the same (family, difficulty, seed) always gives the same prompt and answer."""

    family: str  # a key of `FAMILIES`, e.g. "chain_sum"
    difficulty: str  # "easy" or "hard" (`DIFFICULTIES`)
    seed: int
    prompt: str  # the question as a model sees it (reasoning-gym's wording)
    answer: str  # the reference answer
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)  # the generator's, for its scorer

    @property
    def key(self) -> str:
        """A stable id, e.g. for tables of (query, model) results."""
        return f"{self.family}/{self.difficulty}/{self.seed}"


@runtime_checkable
class Verifier(Protocol):
    """Scores a completion of a task instance in [0, 1]; 1.0 means the answer is accepted."""

    def score(self, instance: TaskInstance, completion: str) -> float: ...
