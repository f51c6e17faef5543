"""Task families: a reasoning-gym generator at two difficulty levels, and seeded generation.

The families are the ones small models can learn on a CPU in minutes at the easy level and only partly at the
hard level (longer operands, more terms, longer words), which is what makes a small and a large model differ.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from rayfleet.actors.tasks.base import TaskInstance

DIFFICULTIES = ("easy", "hard")
MAX_SEED = 2**31  # seeds index a virtual dataset of this size


@dataclass(frozen=True)
class TaskFamily:
    name: str
    dataset: str  # reasoning-gym dataset name
    kind: str  # "arithmetic" or "string": what a specialist model is trained on
    levels: dict[str, dict[str, Any]]  # difficulty -> reasoning-gym config knobs
    verifier: str = "reasoning_gym"  # entry point name in the `rayfleet.verifiers` group


FAMILIES: dict[str, TaskFamily] = {
    family.name: family
    for family in (
        TaskFamily("chain_sum", "chain_sum", "arithmetic", {
            "easy": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
            "hard": {"min_terms": 3, "max_terms": 3, "min_digits": 2, "max_digits": 2},
        }),
        TaskFamily("products", "products", "arithmetic", {
            "easy": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
            "hard": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
        }),
        TaskFamily("spell_backward", "spell_backward", "string", {
            "easy": {"min_word_len": 3, "max_word_len": 4},
            "hard": {"min_word_len": 6, "max_word_len": 9},
        }),
    )
}


def family(name: str) -> TaskFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown task family '{name}'; allowed: {', '.join(FAMILIES)}") from None


@functools.lru_cache(maxsize=None)
def dataset(name: str, difficulty: str):
    """The reasoning-gym dataset of one (family, difficulty). Its item i is generated on access from
    `Random(0 + i)`, so an instance's seed is its index and regenerates it alone."""
    import reasoning_gym

    levels = family(name).levels
    if difficulty not in levels:
        raise ValueError(f"unknown difficulty '{difficulty}' for '{name}'; allowed: {', '.join(levels)}")
    return reasoning_gym.create_dataset(family(name).dataset, seed=0, size=MAX_SEED, **levels[difficulty])


def generate(name: str, difficulty: str, seed: int, count: int = 1) -> list[TaskInstance]:
    """`count` instances; instance i has seed `seed + i` (its own seed regenerates it alone)."""
    return [_instance(name, difficulty, seed + i) for i in range(count)]


def _instance(name: str, difficulty: str, seed: int) -> TaskInstance:
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}), got {seed}")
    entry = dataset(name, difficulty)[seed]
    return TaskInstance(family=name, difficulty=difficulty, seed=seed, prompt=entry["question"],
                        answer=str(entry["answer"]), metadata=entry["metadata"])


def mixture(weights: dict[tuple[str, str], float], seed: int, count: int) -> list[TaskInstance]:
    """`count` instances drawn from (family, difficulty) cells with the given weights, reproducibly."""
    import random

    rng = random.Random(seed)
    cells = sorted(weights)
    chosen = rng.choices(cells, weights=[weights[c] for c in cells], k=count)
    return [_instance(name, difficulty, (seed * 1_000_003 + i) % MAX_SEED)
            for i, (name, difficulty) in enumerate(chosen)]
