"""Where an idle 1-token request's time goes: the same request measured layer by layer, in one run.

Issue 14 asks for an idle 1-token request within +3 ms of plain vLLM. This probe splits the fleet's latency
floor into its layers, each measured as the median of sequential 1-token greedy requests (128-token random
prompts, the same engine arguments as `bench_serving_overhead.py`), one engine alive at a time:

- `engine in this process`: vLLM's `AsyncLLM` called directly, with rayfleet's KV connector (the pools'
  default), no Ray, no HTTP: the engine's own floor;
- `engine inside the replica actor`: `LLMReplica.generate` iterated inside the actor (timed there);
- `replica over Ray, unary call` and `replica over Ray, own stream`: the same request from this process, as
  one actor call returning the last chunk, and as the replica's streaming generator;
- `bare Ray actor round trip`: an empty actor method;
- `plain vLLM over HTTP` and `fleet over HTTP`: the two stacks as `bench_serving_overhead.py` starts them.

    python benchmarks/probe_latency_floor.py                 # ~12 minutes on 2 cores; updates docs/benchmarks-serving.md
    python benchmarks/probe_latency_floor.py --requests 40 --no-docs
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from contenders import DEMO_MODELS, ENGINE_ARGS, ENGINE_ENV, REPO, make_contender, warm_up  # noqa: E402
from bench_serving_overhead import PROBE_PROMPT_TOKENS, probe_http, probe_prompts  # noqa: E402
from doc_sections import write_section  # noqa: E402

DOC = REPO / "docs" / "benchmarks-serving.md"
WARM = 5  # first requests of each layer, not counted


def say(message: str) -> None:
    print(f"[probe] {message}", flush=True)


def one_token():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


def engine_params(max_tokens: int):
    """Greedy, EOS ignored, token-id deltas without detokenizing: what the replica asks of its engine."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    params.output_kind, params.detokenize = RequestOutputKind.DELTA, False
    return params


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds[WARM:]) * 1e3


# ---------------------------------------------------------------- layers
def engine_in_process(model: Path, count: int) -> list[float]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from rayfleet.actors.kv.engine_migrator import migration_engine_kwargs

    async def run() -> list[float]:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(model), **ENGINE_ARGS,
                                                           **migration_engine_kwargs()))
        try:
            latencies = []
            for i, prompt in enumerate(probe_prompts(count, 1)):
                began = time.perf_counter()
                async for _ in engine.generate({"prompt_token_ids": prompt}, engine_params(1),
                                               request_id=f"local-{i}"):
                    pass
                latencies.append(time.perf_counter() - began)
            return latencies
        finally:
            engine.shutdown()

    os.environ.update(ENGINE_ENV)
    return asyncio.run(run())


def replica_layers(model: Path, count: int) -> dict[str, list[float]]:
    import ray

    from rayfleet.actors.replica.llm_replica import LLMReplica
    from rayfleet.actors.replica.protocol import GenerateCall

    class ProbedReplica(LLMReplica):
        """The fleet's replica with two probe methods: a request timed inside the actor, and one call that
        returns only the last chunk (no streaming generator)."""

        async def timed_inside(self, call: GenerateCall) -> float:
            began = time.perf_counter()
            async for _ in self.generate(call):
                pass
            return time.perf_counter() - began

        async def last_chunk(self, call: GenerateCall):
            last = None
            async for chunk in self.generate(call):
                last = chunk
            return last

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        replica = ray.remote(ProbedReplica).options(num_cpus=1, runtime_env={"env_vars": ENGINE_ENV}).remote(
            "probe", "probe", str(model), ENGINE_ARGS, "probe")
        ray.get(replica.start.remote())
        layers: dict[str, list[float]] = {"inside": [], "unary": [], "stream": [], "rtt": []}
        # Each layer its own prompts: a prompt seen before would hit the prefix cache and skip the prefill.
        by_layer = {kind: probe_prompts(count, seed) for seed, kind in enumerate(("inside", "unary", "stream"), start=10)}
        for i in range(count):
            def call(kind: str) -> GenerateCall:
                return GenerateCall(request_id=f"{kind}-{i}", prompt_token_ids=by_layer[kind][i],
                                    sampling_params=one_token())

            layers["inside"].append(ray.get(replica.timed_inside.remote(call("inside"))))
            began = time.perf_counter()
            ray.get(replica.last_chunk.remote(call("unary")))
            layers["unary"].append(time.perf_counter() - began)
            began = time.perf_counter()
            for ref in replica.generate.options(num_returns="streaming").remote(call("stream")):
                ray.get(ref)
            layers["stream"].append(time.perf_counter() - began)
            began = time.perf_counter()
            ray.get(replica.pid.remote())
            layers["rtt"].append(time.perf_counter() - began)
        ray.get(replica.shutdown.remote())
        return layers
    finally:
        ray.shutdown()


def http_layer(name: str, model: Path, count: int, log_dir: Path) -> list[float]:
    contender = make_contender(name, model, log_dir)
    contender.start()
    try:
        warm_up(contender.base_url)
        return probe_http(contender.base_url, probe_prompts(count, 3))
    finally:
        contender.stop()


def one_round(args: argparse.Namespace) -> dict[str, float]:
    results = {"engine in this process": median_ms(engine_in_process(args.model, args.requests))}
    layers = replica_layers(args.model, args.requests)
    results["engine inside the replica actor"] = median_ms(layers["inside"])
    results["replica over Ray, unary call"] = median_ms(layers["unary"])
    results["replica over Ray, own stream"] = median_ms(layers["stream"])
    results["bare Ray actor round trip"] = median_ms(layers["rtt"])
    for name, label in (("plain", "plain vLLM over HTTP"), ("fleet", "fleet over HTTP")):
        results[label] = median_ms(http_layer(name, args.model, args.requests, args.log_dir))
    import ray

    ray.shutdown()  # the fleet's Ray (the contenders keep one per run); the next round's replica starts its own
    say(", ".join(f"{name} {ms:.1f} ms" for name, ms in results.items()))
    return results


# ---------------------------------------------------------------- report
def report(rounds: list[dict[str, float]], args: argparse.Namespace, loads: list[tuple[float, float]],
           took_s: float) -> str:
    """Per layer: each round's median, and the median over rounds against the engine in process and against
    plain vLLM over HTTP (the issue's comparison)."""
    def over_rounds(name: str) -> float:
        return statistics.median(r[name] for r in rounds)

    engine, plain = over_rounds("engine in this process"), over_rounds("plain vLLM over HTTP")
    lines = [f"Generated by `python benchmarks/probe_latency_floor.py --requests {args.requests} --rounds "
             f"{args.rounds}` on {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} "
             f"(x86_64, 2-core CPU; load average before / after each round: "
             f"{', '.join(f'{a:.2f} / {b:.2f}' for a, b in loads)}; {took_s / 60:.1f} min). Each round: the median "
             f"of {args.requests - WARM} sequential 1-token greedy requests per layer ({PROBE_PROMPT_TOKENS}-token "
             "prompts), ms:", "",
             "| layer | " + " | ".join(f"round {i + 1}" for i in range(len(rounds))) +
             " | median | over the engine in process | over plain vLLM over HTTP |",
             "| --- | " + " | ".join("---:" for _ in rounds) + " | ---: | ---: | ---: |"]
    for name in rounds[0]:
        ms = over_rounds(name)
        over = ("-", "-") if name == "bare Ray actor round trip" else (f"{ms - engine:+.1f}", f"{ms - plain:+.1f}")
        lines.append(f"| {name} | " + " | ".join(f"{r[name]:.1f}" for r in rounds) + f" | {ms:.1f} | {over[0]} | "
                     f"{over[1]} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30, help=f"per layer, the first {WARM} not counted")
    parser.add_argument("--rounds", type=int, default=3, help="repeat every layer this many times (the machine's "
                        "noise between runs is larger than within one)")
    parser.add_argument("--model", type=Path, default=DEMO_MODELS / "tiny-llama-b")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/rayfleet-probe-latency"))
    parser.add_argument("--no-docs", action="store_true", help=f"print only; do not update {DOC.name}")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    if args.requests <= WARM:
        parser.error(f"--requests: more than {WARM} (the first {WARM} warm up)")
    if not (args.model / "config.json").exists():
        parser.error(f"--model: no model folder at {args.model} (rayfleet make-demo-models {args.model.parent})")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    rounds, loads = [], []
    for round_index in range(args.rounds):
        say(f"round {round_index + 1}/{args.rounds}")
        load_before = os.getloadavg()[0]
        rounds.append(one_round(args))
        loads.append((load_before, os.getloadavg()[0]))
    text = report(rounds, args, loads, time.monotonic() - began)
    print(text)
    if not args.no_docs:
        write_section(DOC, "probe_latency_floor", text)
        say(f"wrote {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
