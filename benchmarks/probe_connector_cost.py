"""What rayfleet's KV connector costs an engine that is not migrating: the same engine three ways, alternated.

Every pool runs vLLM with rayfleet's KV connector (live migration, the KV store), so its per-step hooks sit on
every request's path. This probe starts `AsyncLLM` in this process (no Ray, no HTTP), with the engine arguments
of `bench_serving_overhead.py`, once per contender and round, in rotated order:

- `none`: no KV connector (plain vLLM);
- `noop`: a connector whose hooks do nothing (what vLLM's connector machinery costs by itself);
- `rayfleet`: `RayfleetKVConnector` as the pools install it (`migration_engine_kwargs()`).

Per engine: the median of 25 sequential 1-token greedy requests (128-token prompts) and the median time per output
token of 5 sequential 200-token streams. Prints each round and the medians over rounds.

    python benchmarks/probe_connector_cost.py --rounds 5      # ~13 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from contenders import DEMO_MODELS, ENGINE_ARGS, ENGINE_ENV  # noqa: E402
from bench_serving_overhead import probe_prompts  # noqa: E402
from probe_latency_floor import engine_params, median_ms  # noqa: E402

CONTENDERS = ("none", "noop", "rayfleet")


def engine_kwargs(contender: str) -> dict:
    from vllm.config import KVTransferConfig

    from rayfleet.actors.kv.engine_migrator import migration_engine_kwargs

    if contender == "rayfleet":
        return migration_engine_kwargs()
    if contender == "noop":  # the engine processes import it by module path: this folder is on their PYTHONPATH
        return {"kv_transfer_config": KVTransferConfig(kv_connector="NoopConnector", kv_role="kv_both",
                                                       kv_connector_module_path="noop_connector")}
    return {}


async def measure(contender: str, requests: int) -> tuple[float, float]:
    """(1-token latency, time per output token of a single stream), medians, in ms."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(DEMO_MODELS / "tiny-llama-b"), **ENGINE_ARGS,
                                                       **engine_kwargs(contender)))
    try:
        prompts = probe_prompts(requests + 5, 1)
        latencies = []
        for i, prompt in enumerate(prompts[:requests]):
            began = time.perf_counter()
            async for _ in engine.generate({"prompt_token_ids": prompt}, engine_params(1), request_id=f"one-{i}"):
                pass
            latencies.append(time.perf_counter() - began)
        per_token = []
        for i, prompt in enumerate(prompts[requests:]):
            first = None
            async for _ in engine.generate({"prompt_token_ids": prompt}, engine_params(200), request_id=f"long-{i}"):
                first = first or time.perf_counter()
            per_token.append((time.perf_counter() - first) / 199)
        return median_ms(latencies), statistics.median(per_token) * 1e3
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each starts every contender once")
    parser.add_argument("--requests", type=int, default=30, help="1-token requests per engine (5 warm-up)")
    args = parser.parse_args()
    os.environ.update(ENGINE_ENV)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    results: dict[str, list[tuple[float, float]]] = {c: [] for c in CONTENDERS}
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for round_number in range(args.rounds):
        order = CONTENDERS[round_number % 3:] + CONTENDERS[:round_number % 3]
        for contender in order:
            one, tpot = asyncio.run(measure(contender, args.requests))
            results[contender].append((one, tpot))
            print(f"round {round_number + 1} {contender:>8}: 1-token {one:6.2f} ms, per output token {tpot:5.2f} ms",
                  flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}\n\n| contender | 1-token p50, median of rounds (range) "
          "| ms per output token, median of rounds (range) |\n| --- | --- | --- |")
    for contender, rows in results.items():
        ones, tpots = [r[0] for r in rows], [r[1] for r in rows]
        print(f"| {contender} | {statistics.median(ones):.2f} ({min(ones):.1f}-{max(ones):.1f}) "
              f"| {statistics.median(tpots):.2f} ({min(tpots):.2f}-{max(tpots):.2f}) |")


if __name__ == "__main__":
    main()
