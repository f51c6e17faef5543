"""Verifier plugins: reasoning-gym's own answer scoring, discovered through the `rayfleet.verifiers` group.

A third-party package adds a verifier by registering a class with a `score(instance, completion)` method under
that group and naming it in a `TaskFamily`.
"""

from __future__ import annotations

import functools
import re
from importlib.metadata import entry_points

from rayfleet.actors.tasks.base import TaskInstance, Verifier
from rayfleet.actors.tasks.families import dataset, family

ENTRY_POINT_GROUP = "rayfleet.verifiers"
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(completion: str) -> str:
    """The answer part of a completion: an `<answer>` tag's content if present, else the first line."""
    tagged = ANSWER_TAG.search(completion)
    text = tagged.group(1) if tagged else completion.strip().split("\n", 1)[0]
    return text.strip()


class ReasoningGymVerifier:
    """reasoning-gym's `score_answer` of the instance's dataset: 1.0 exact, partial credit when the reference
    answer is inside a longer one, else 0.0."""

    def score(self, instance: TaskInstance, completion: str) -> float:
        entry = {"question": instance.prompt, "answer": instance.answer, "metadata": instance.metadata}
        scorer = dataset(instance.family, instance.difficulty)
        return float(scorer.score_answer(extract_answer(completion), entry))


@functools.lru_cache(maxsize=None)
def _verifier(name: str) -> Verifier:
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name == "reasoning_gym" and name not in found:  # a source checkout without installed metadata
        return ReasoningGymVerifier()
    if name not in found:
        raise ValueError(f"unknown verifier '{name}'; installed: {', '.join(sorted(found)) or 'none'}")
    verifier = found[name].load()()
    if not isinstance(verifier, Verifier):
        raise TypeError(f"verifier '{name}' has no score(instance, completion) method")
    return verifier


def verifier_for(instance: TaskInstance) -> Verifier:
    return _verifier(family(instance.family).verifier)


def score(instance: TaskInstance, completion: str) -> float:
    """The instance's verifier's score of `completion`, in [0, 1]."""
    return verifier_for(instance).score(instance, completion)


def accepted(instance: TaskInstance, completion: str) -> bool:
    return score(instance, completion) >= 1.0
