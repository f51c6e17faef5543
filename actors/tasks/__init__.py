"""Verifiable tasks: seeded task instances from reasoning-gym and the verifiers that score completions.

The API every user of tasks shares (the demo and its workload, the router's feedback, RL rewards, model
training and evaluation):

    from rayfleet.actors.tasks import generate, score, FAMILIES
    [instance] = generate("chain_sum", "hard", seed=7, count=1)
    instance.prompt        # the question, as a model sees it
    score(instance, "42")  # 1.0 when the verifier accepts the completion, partial credit below

Verifiers are plugins (entry-point group `rayfleet.verifiers`); a family names the verifier that scores it.
Nothing here imports Ray or the control plane, so actors (RL) and the control plane both use it.

`TRAINED_MODELS_DIR` holds the models trained on these tasks (`examples/train_task_models.py` reproduces them):
`task-small`, `task-large`, `task-string` (Hugging Face folders vLLM serves), and `routing-table.jsonl`, their
RouterBench-style table of verifier scores, lengths and latencies on this fleet
(`benchmarks/routing_table.py`).
"""

from pathlib import Path

from rayfleet.actors.tasks.base import TaskInstance, Verifier
from rayfleet.actors.tasks.families import DIFFICULTIES, FAMILIES, TaskFamily, generate, mixture
from rayfleet.actors.tasks.verifiers import accepted, extract_answer, score, verifier_for

TRAINED_MODELS_DIR = Path(__file__).resolve().parent / "trained"

__all__ = [
    "TRAINED_MODELS_DIR",
    "DIFFICULTIES",
    "FAMILIES",
    "TaskFamily",
    "TaskInstance",
    "Verifier",
    "accepted",
    "extract_answer",
    "generate",
    "mixture",
    "score",
    "verifier_for",
]
