"""Bursty workload on two replicas: Llumnix-style migration against routing alone, and Ray Serve LLM.

Arrivals are Gamma-distributed (`vllm bench serve --burstiness`, shape < 1: bursts and lulls); output lengths
are long-tailed (log-normal, clipped), prompts 64-384 tokens, through a custom JSONL dataset so every contender
gets the same requests in the same order. The model is the demo's tiny-llama-b with a small KV cache per
replica (KV_BLOCKS blocks of 32 tokens), so bursts fill the caches and long requests pile up on one
replica: the situation Llumnix migrates out of (OSDI'24 §3: load imbalance, fragmentation, preemption).

Contenders, one after another, the same engine arguments everywhere:
  least_load  rayfleet, least-load routing, migration policy `none`
  llumnix     rayfleet, least-load routing, migration policy `llumnix` (pre-copy; moves only when they pay,
              with the cost model's defaults measured on this machine)
  serve_llm   Ray Serve LLM, 2 replicas, its default power-of-two-choices router

Each rayfleet run's requests (arrival times, lengths, TTFTs) are saved as `bursty_trace_<contender>_r<round>.json`
next to the results: the fleet simulator replays them (`bench_simulator.py --only validation`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from contenders import DEMO_MODELS, SERVED_NAME, Contender, Fleet, ServeLLM, warm_up
from load_generator import custom_dataset, run_vllm_bench

CONTENDERS = ("least_load", "llumnix", "serve_llm")
KV_BLOCKS = 80  # 2560 tokens of KV per replica
ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024, "gpu_memory_utilization": 0.3,
          "block_size": 32, "max_num_seqs": 32, "num_gpu_blocks_override": KV_BLOCKS}
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
LLUMNIX = {"name": "llumnix", "params": {"max_migrations_per_tick": 2, "mode": "precopy", "cooldown_s": 5.0}}
# What the simulator needs to replay a run: per-request arrays of `vllm bench serve`'s result, and its TPOTs.
TRACE_KEYS = ("start_times", "input_lens", "output_lens", "ttfts", "median_tpot_ms", "p99_tpot_ms")
COLUMNS = (("request_throughput", "req/s", "{:.2f}"), ("output_throughput", "out tok/s", "{:.0f}"),
           ("p50_ttft_ms", "TTFT p50 ms", "{:.0f}"), ("p99_ttft_ms", "TTFT p99 ms", "{:.0f}"),
           ("p50_tpot_ms", "TPOT p50 ms", "{:.1f}"), ("p99_tpot_ms", "TPOT p99 ms", "{:.1f}"),
           ("p99_itl_ms", "ITL p99 ms", "{:.0f}"), ("p99_e2el_ms", "latency p99 ms", "{:.0f}"))


def write_dataset(path: Path, model_dir: Path, count: int, seed: int) -> dict[str, float]:
    """Prompts of random token ids (decoded to text), log-normal output lengths; returns their stats."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    outputs = []
    with path.open("w") as out:
        for _ in range(count):
            prompt = tokenizer.decode([rng.randrange(10, 500) for _ in range(rng.randint(64, 384))])
            # Median 48 tokens, a long tail to the 640 cap (sigma 1.0: p90 ~ 170, p99 ~ 490).
            output = min(max(int(rng.lognormvariate(math.log(48), 1.0)), 8), 640)
            outputs.append(output)
            out.write(json.dumps({"prompt": prompt, "output_tokens": output}) + "\n")
    outputs.sort()
    return {"output_p50": outputs[len(outputs) // 2], "output_p99": outputs[int(len(outputs) * 0.99)],
            "output_max": outputs[-1], "output_mean": sum(outputs) / len(outputs)}


def migrations_of(fleet: Fleet) -> list[dict[str, Any]]:
    import ray

    # The controller keeps its last 500 records; status() shows only 20.
    return ray.get(fleet.controller.__ray_call__.remote(lambda controller: [asdict(m) for m in controller.migrations]))


def bursty_comparison(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    model_dir = DEMO_MODELS / "tiny-llama-b"
    dataset_path = args.log_dir / "bursty.jsonl"
    stats = write_dataset(dataset_path, model_dir, args.bursty_prompts, args.seed)
    say(f"bursty dataset: {args.bursty_prompts} requests, output tokens {stats}")
    results: dict[str, Any] = {"dataset": stats, "rate": args.bursty_rate, "burstiness": args.burstiness,
                               "kv_blocks": KV_BLOCKS, "rounds": args.bursty_rounds, "runs": []}
    names = list(CONTENDERS)
    for round_index in range(args.bursty_rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            results["runs"].append({"contender": name, "round": round_index,
                                    **run_one(name, round_index, model_dir, dataset_path, args, say)})
    results["contenders"] = {name: median_run([r for r in results["runs"] if r["contender"] == name])
                             for name in names}
    return results


def run_one(name: str, round_index: int, model_dir: Path, dataset_path: Path, args: argparse.Namespace,
            say: Callable[[str], None]) -> dict[str, Any]:
    contender: Contender
    if name == "serve_llm":
        contender = ServeLLM(name=name, model_dir=model_dir, engine_args=dict(ENGINE), engine_env=dict(ENV),
                             replicas=2, log_dir=args.log_dir)
    else:
        contender = Fleet(name=name, model_dir=model_dir, engine_args=dict(ENGINE), engine_env=dict(ENV),
                          replicas=2, log_dir=args.log_dir)
        contender.spec_overrides = {
            "policies": {"router": {"name": "least_load"},
                         "migration": LLUMNIX if name == "llumnix" else {"name": "none"}, "tick_s": 0.5},
            "health": {"check_period_s": 0.5, "check_timeout_s": 30}}
    say(f"bursty {name}: starting")
    contender.start()
    try:
        warm_up(contender.base_url)
        say(f"bursty {name}: ready in {contender.started_s:.0f} s")
        bench = run_vllm_bench(contender.base_url, model_dir, SERVED_NAME, request_rate=args.bursty_rate,
                               num_prompts=args.bursty_prompts, seed=args.seed, burstiness=args.burstiness,
                               dataset=custom_dataset(dataset_path), log_path=args.log_dir / f"bursty-{name}.log",
                               extra=["--save-detailed"])  # keeps the per-request arrays the trace is made of
        kept = {k: v for k, v in bench.items() if isinstance(v, (int, float, str)) or v is None}
        if isinstance(contender, Fleet):
            records = migrations_of(contender)
            kept["migrations"] = {o: sum(1 for r in records if r["outcome"] == o)
                                  for o in sorted({r["outcome"] for r in records})}
            moved = sorted(r["downtime_s"] for r in records if r["outcome"] == "migrated")
            kept["migration_downtime_ms_p50"] = moved[len(moved) // 2] * 1e3 if moved else None
            trace = {key: bench[key] for key in TRACE_KEYS}
            trace.update(migrations=kept["migrations"], migration_params=LLUMNIX["params"] if name == "llumnix" else {})
            (args.trace_dir / f"bursty_trace_{name}_r{round_index}.json").write_text(json.dumps(trace))
        say(f"bursty {name}: {bench['completed']}/{args.bursty_prompts} ok, "
            + ", ".join(f"{title} {fmt.format(bench[key])}" for key, title, fmt in COLUMNS)
            + (f", migrations {kept['migrations']}" if "migrations" in kept else ""))
        return kept
    finally:
        contender.stop()


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each metric over rounds; migrations summed."""
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k, _, _ in COLUMNS}
    out["failed"] = sum(r.get("failed", 0) for r in runs)
    if "migrations" in runs[0]:
        out["migrations"] = {}
        for r in runs:
            for outcome, count in r["migrations"].items():
                out["migrations"][outcome] = out["migrations"].get(outcome, 0) + count
        downtimes = [r["migration_downtime_ms_p50"] for r in runs if r["migration_downtime_ms_p50"] is not None]
        out["migration_downtime_ms_p50"] = statistics.median(downtimes) if downtimes else None
    return out


def bursty_markdown(results: dict[str, Any]) -> str:
    d = results["dataset"]
    rounds = results.get("rounds", 1)
    lines = [f"{len(results['contenders'])} contenders, 2 replicas each, median of {rounds} round(s) "
             f"(rotated order; migrations summed over rounds), {KV_BLOCKS} KV blocks of 32 tokens "
             f"per replica; Gamma arrivals at {results['rate']:g} req/s mean, shape {results['burstiness']:g}; "
             f"output tokens p50 {d['output_p50']}, mean {d['output_mean']:.0f}, p99 {d['output_p99']}, max "
             f"{d['output_max']}; prompts 64-384 tokens.", "",
             "| contender | " + " | ".join(t for _, t, _ in COLUMNS) + " | failed | migrations | migration downtime p50 ms |",
             "|" + " --- |" * (len(COLUMNS) + 4)]
    for name, r in results["contenders"].items():
        migrations = ", ".join(f"{k} {v}" for k, v in r.get("migrations", {}).items()) or "-"
        downtime = r.get("migration_downtime_ms_p50")
        lines.append(f"| {name} | " + " | ".join(fmt.format(r[k]) for k, _, fmt in COLUMNS)
                     + f" | {r.get('failed', 0)} | {migrations} | {'-' if downtime is None else f'{downtime:.0f}'} |")
    return "\n".join(lines)
