"""A pretrained generalist (Gemma 3 270M) against the trained task models: accuracy on the task families, speed.

    python benchmarks/eval_generalist.py --model /tmp/gemma-3-270m [--per-cell 32] [--shots 4]

The generalist is a base model, so it gets few-shot prompts (`--shots` solved instances of the same family and
difficulty, "Q: ... A: ..."), answered greedy and sampled (temperature 0.7, one sample), cut at the first newline
and scored by the task verifiers on the held-out instances `docs/task-models.md` uses (seeds 1.9e9). Speed, for
the generalist and for `task-large` in the same run: one 16-token request at a time (p50 of 20) and 60 at once,
vLLM in this process (no fleet), each model in its own precision. `--model` comes from
`examples/convert_gemma_generalist.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from rayfleet.actors.tasks import DIFFICULTIES, FAMILIES, TRAINED_MODELS_DIR, generate, score

EVAL_SEED = 1_900_000_000  # examples/train_task_models.py's held-out seed
SHOT_SEED = 1_500_000_000  # the solved examples: neither training nor held-out instances


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the generalist's folder")
    parser.add_argument("--per-cell", type=int, default=32, help="held-out instances per family x difficulty")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--compare", type=Path, default=TRAINED_MODELS_DIR / "task-large",
                        help="trained model timed beside it")
    parser.add_argument("--json", type=Path, help="write the report here too")
    return parser.parse_args(argv)


def solved_examples(family: str, difficulty: str, shots: int) -> str:
    solved = generate(family, difficulty, seed=SHOT_SEED, count=shots)
    return "".join(f"Q: {s.prompt}\nA: {s.answer}\n\n" for s in solved)


def accuracy(llm, args: argparse.Namespace) -> dict:
    from vllm import SamplingParams

    cells = [(f, d) for f in FAMILIES for d in DIFFICULTIES]
    tasks = [(f, d, t) for f, d in cells for t in generate(f, d, seed=EVAL_SEED, count=args.per_cell)]
    examples = {(f, d): solved_examples(f, d, args.shots) for f, d in cells}
    prompts = [f"{examples[f, d]}Q: {t.prompt}\nA:" for f, d, t in tasks]
    report = {}
    for mode, temperature in (("greedy", 0.0), ("sampled", 0.7)):
        outputs = llm.generate(prompts, SamplingParams(temperature=temperature, max_tokens=16, stop=["\n"]),
                               use_tqdm=False)
        right: dict[str, list[bool]] = {}
        for (f, d, task), output in zip(tasks, outputs, strict=True):
            right.setdefault(f"{f} {d}", []).append(score(task, output.outputs[0].text.strip()) >= 1.0)
        report[mode] = {cell: sum(hits) / len(hits) for cell, hits in right.items()}
    return report


def speed(llm) -> dict:
    from vllm import SamplingParams

    prompts = [t.prompt for t in generate("products", "easy", seed=EVAL_SEED, count=20)]
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16, ignore_eos=True)
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    single = []
    for prompt in prompts:
        started = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        single.append(time.perf_counter() - started)
    started = time.perf_counter()
    llm.generate(prompts * 3, params, use_tqdm=False)
    batch_s = time.perf_counter() - started
    return {"single_request_s": statistics.median(single), "batch60_tokens_per_s": 60 * 16 / batch_s}


def load(model: Path, dtype: str):
    from vllm import LLM

    return LLM(model=str(model), dtype=dtype, max_model_len=1024, enforce_eager=True, seed=0)


def markdown(report: dict) -> str:
    cells = list(report["accuracy"]["greedy"])
    lines = ["| mode | " + " | ".join(cells) + " |", "| --- |" + " ---: |" * len(cells)]
    for mode, by_cell in report["accuracy"].items():
        lines.append(f"| {mode} | " + " | ".join(f"{100 * by_cell[c]:.0f}%" for c in cells) + " |")
    lines += ["", "| model | one 16-token request, p50 | ms per token | 60 requests at once, output tok/s |",
              "| --- | ---: | ---: | ---: |"]
    for name, s in report["speed"].items():
        lines.append(f"| {name} | {1e3 * s['single_request_s']:.0f} ms | {1e3 * s['single_request_s'] / 16:.1f} | "
                     f"{s['batch60_tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    generalist = load(args.model, "bfloat16")
    report = {"accuracy": accuracy(generalist, args), "speed": {args.model.name: speed(generalist)},
              "per_cell": args.per_cell, "shots": args.shots}
    del generalist
    report["speed"][args.compare.name] = speed(load(args.compare, "float32"))
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
