"""Measure the engine step times the fleet simulator's CPU profile is calibrated from.

One real vLLM CPU engine (`AsyncLLM`, EngineCore in its own process, rayfleet's KV connector installed as in the
fleet), with the engine arguments and environment of the bursty workload (`bursty_workload.ENGINE`, `ENV`:
tiny-llama-b, float32, one OpenMP thread, block size 32) but a large KV pool, so no batch here is preempted.
Two kinds of points:

- **prefill**: one request of L prompt tokens and one output token, alone on the engine; its time to first
  token is one step with L prefill tokens (plus the front end's fixed cost, the same for every step);
- **decode**: B requests of C prompt tokens each, EOS ignored, submitted together, with 48 output tokens past
  the last prefill; once all have their first token, the mean gap between consecutive outputs of a request
  is one decode step of B sequences over B * C context tokens.

A least-squares fit gives `step_s = base + prefill_token * prefill_tokens + decode_seq * B + context_token * ctx`
(the simulator's `StepTimeModel`). The points and the fit go to `benchmarks/results/sim_calibration_cpu.json`;
`control_plane/simulator/profiles.py` carries the fitted numbers.

    python benchmarks/calibrate_simulator.py            # ~2 min on 2 cores; run alone (heavy lock)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bursty_workload import ENGINE, ENV  # noqa: E402
from contenders import DEMO_MODELS, REPO  # noqa: E402
from step_fit import fit  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "sim_calibration_cpu.json"


async def one(engine, request_id: str, prompt: list[int], max_tokens: int) -> list[float]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    times = []
    async for output in engine.generate({"prompt_token_ids": prompt}, params, request_id=request_id):
        times += [time.perf_counter()] * len(output.outputs[0].token_ids)
    return times


async def measure(engine, args) -> dict:
    import random

    rng = random.Random(0)
    tokens = lambda n: [rng.randrange(10, 500) for _ in range(n)]  # noqa: E731
    await one(engine, "warm", tokens(64), 8)
    prefill = []
    for length in args.prefill_lengths:
        samples = []
        for rep in range(args.reps):
            began = time.perf_counter()
            times = await one(engine, f"p{length}-{rep}", tokens(length), 1)
            samples.append(times[0] - began)
        prefill.append({"prefill_tokens": length, "seconds": statistics.median(samples)})
        print(f"prefill {length:5d} tokens: {prefill[-1]['seconds'] * 1e3:7.1f} ms", flush=True)
    decode = []
    for context in args.contexts:
        for batch in args.batches:
            gaps = []
            for rep in range(args.reps):
                # Long enough that all prefills (chunked over several steps for big batches) end before the
                # first request does.
                outputs = 48 + batch * context // 64
                runs = await asyncio.gather(*(one(engine, f"d{context}-{batch}-{rep}-{i}", tokens(context), outputs)
                                              for i in range(batch)))
                # The decode-only stretch: after the last first token, before the first request ends. Each
                # step gives every request one token, so a request's mean gap there is the step time.
                start = max(times[0] for times in runs)
                end = min(times[-1] for times in runs)
                for times in runs:
                    inside = [t for t in times if start < t <= end]
                    if len(inside) > 4 and inside[-1] > inside[0]:
                        gaps.append((inside[-1] - inside[0]) / (len(inside) - 1))
            if not gaps:
                print(f"decode batch {batch} x {context}: no decode-only stretch measured; skipped", flush=True)
                continue
            decode.append({"batch": batch, "context": context, "seconds": statistics.median(gaps)})
            print(f"decode batch {batch:3d} x {context:4d} ctx: {decode[-1]['seconds'] * 1e3:6.2f} ms/step", flush=True)
    return {"prefill": prefill, "decode": decode}


async def main_async(args) -> dict:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from rayfleet.actors.kv.engine_migrator import migration_engine_kwargs

    os.environ.update(ENV)
    # The bursty engine without its small KV pool (80 blocks): big decode batches must not preempt here.
    engine = {k: v for k, v in ENGINE.items() if k != "num_gpu_blocks_override"}
    engine_args = AsyncEngineArgs(model=str(DEMO_MODELS / "tiny-llama-b"), **engine, **migration_engine_kwargs())
    engine = AsyncLLM.from_engine_args(engine_args)
    try:
        scheduler = engine.vllm_config.scheduler_config
        facts = {"max_num_batched_tokens": scheduler.max_num_batched_tokens,
                 "chunked_prefill": scheduler.enable_chunked_prefill,
                 "max_num_seqs": scheduler.max_num_seqs,
                 "kv_blocks": engine.vllm_config.cache_config.num_gpu_blocks,
                 "block_size": engine.vllm_config.cache_config.block_size}
        print(f"engine: {facts}", flush=True)
        points = await measure(engine, args)
    finally:
        engine.shutdown()
    return {"engine": facts, "points": points, "fit": fit(points)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[32, 64, 128, 256, 384, 512, 768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    load_before = os.getloadavg()
    result = asyncio.run(main_async(args))
    result["meta"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                      "load_before": load_before, "load_after": os.getloadavg(),
                      "command": "python " + " ".join(sys.argv)}
    print(json.dumps(result["fit"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
