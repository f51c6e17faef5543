"""Prefix reuse across replicas through the fleet KV store, end to end on CPU: with and without the store.

One fleet (a real FleetController on a local Ray cluster) runs one pool per mode (`--modes`), each of the same
model with two replicas: `shared` uses the fleet's KV store (`use_kv_store: true`) as configured by default,
pricing each lookup and load against its engine's own prefill (`kv_store.priced`, policies/kv_pricing.py);
`unpriced` uses the same store with `kv_store_priced: false` (every request with blocks beyond its local hit
asks); `plain` has no store; `write_only` puts what it computes and never looks up (`kv_store_access:
write_only`): the puts' cost without their benefit. Each store pool has a hash namespace of its own in the one
store, so a pool loads only what its own replicas put (the modes run the same prompts within a repetition).
All have rayfleet's KV connector and vLLM's local prefix cache, and a small KV cache (`--kv-blocks` per replica) so the local
cache also evicts under memory pressure. The workload: `--system-prompts` long system prompts
(`--system-len` tokens), `--chats` multi-turn chats that each start with one of them and grow by a user
message and the assistant's reply every turn (`--turns`). Turn t of every chat is sent before turn t+1,
`--concurrency` requests at a time, dispatched round-robin over the pool's two replicas (what the
`round_robin` router does), so consecutive turns of a chat mostly land on different replicas: without the
store the second replica recomputes the prefix the first one computed. `--scenario scale-out` measures the case
a store is deployed for: the first half of the chats runs on one replica, then the second half on the other, as
on a replica added under load that has none of the fleet's system prompts cached (only the second half counts).

Requests go straight to the replica actors over Ray (`LLMReplica.generate`), not through the HTTP ingress,
to keep this 2-core machine's noise out of the TTFT. TTFT is measured in this process: call to first chunk
with tokens. The modes run one after the other, never at the same time, their order rotated every repetition
(`--reps`), each repetition with fresh prompts (a new seed) so no mode benefits from an earlier one; the same
prompts go to every mode within a repetition.

Printed (and with --json written): per mode, prompt tokens, tokens served from cache (vLLM's
num_cached_tokens: local prefix cache + store), tokens loaded from the store, prefill tokens computed,
store hit rate (blocks the store held / blocks asked for beyond the local hit, at admission), lookups and
loads the pricing declined, TTFT p50/p99, and each store mode's ratio to `plain`.

    python benchmarks/bench_prefix_reuse.py --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Pool name -> (its pool fields, what it is).
MODES: dict[str, tuple[dict[str, Any], str]] = {
    "shared": ({"use_kv_store": True}, "the KV store, priced"),
    "unpriced": ({"use_kv_store": True, "kv_store_priced": False}, "the KV store, every lookup made"),
    "at_schedule": ({"use_kv_store": True, "kv_store_lookup_ahead": False},
                    "the KV store, priced, asked when a request is first scheduled"),
    "write_only": ({"use_kv_store": True, "kv_store_access": "write_only"}, "the KV store, puts only"),
    "plain": ({"use_kv_store": False}, "no KV store"),
}


def modes_arg(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in modes if m not in MODES]
    if unknown or "plain" not in modes:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(MODES)}, 'plain' among them (the baseline); "
                                         f"got {text!r}")
    return modes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="tiny-llama-b",
                        help="demo model under RAYFLEET_DEMO_MODELS: tiny-llama-b (default: prefill costs little "
                             "per KV byte) or mig-llama-h1024-l8 (the migration benchmark's 88M-parameter model, "
                             "58x the compute per token for 8x the KV bytes), each built on first use")
    parser.add_argument("--system-prompts", type=int, default=4)
    parser.add_argument("--system-len", type=int, nargs=2, default=(600, 900), metavar=("MIN", "MAX"))
    parser.add_argument("--chats", type=int, default=12)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--user-len", type=int, nargs=2, default=(30, 80), metavar=("MIN", "MAX"))
    parser.add_argument("--reply-tokens", type=int, default=16, help="max_tokens of every turn (greedy)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight per mode")
    parser.add_argument("--kv-blocks", type=int, default=160, help="KV blocks (of 32 tokens) per replica")
    parser.add_argument("--store-mib", type=int, default=512, help="memory tier of the one store shard")
    parser.add_argument("--reps", type=int, default=3, help="repetitions, mode order rotated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenario", choices=("chats", "scale-out"), default="chats",
                        help="chats: every chat round robin over the pool's two replicas; scale-out: the first half "
                             "of the chats on one replica, then the second half (measured) on the other, a replica "
                             "that joins under load with none of the system prompts cached")
    parser.add_argument("--sync-loads", action="store_true",
                        help="the store's first design: lookups and loads block the engine step (async_loads: false)")
    parser.add_argument("--modes", type=modes_arg, default=("shared", "unpriced", "plain"),
                        help=f"comma-separated pools to compare, 'plain' among them; from {', '.join(MODES)}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="also draw each mode's TTFT distribution and per-repetition "
                        "p50 into this PNG (needs matplotlib)")
    return parser.parse_args()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- workload


@dataclass
class Chat:
    system: list[int]
    users: list[list[int]]  # one user message per turn
    history: list[int] = field(default_factory=list)  # system + earlier turns (user + reply)


@dataclass
class Workload:
    chats: list[Chat]
    orders: list[list[int]]  # per turn, the order in which the chats send it (same for both modes)


def make_workload(args: argparse.Namespace, seed: int) -> Workload:
    rng = random.Random(seed)

    def tokens(low: int, high: int) -> list[int]:
        return [rng.randrange(10, 500) for _ in range(rng.randint(low, high))]

    systems = [tokens(*args.system_len) for _ in range(args.system_prompts)]
    chats = [Chat(systems[i % len(systems)], [tokens(*args.user_len) for _ in range(args.turns)])
             for i in range(args.chats)]
    # Chats answer at different speeds: each turn arrives in a new order, so round robin does not pin a
    # chat (or a system prompt) to one replica.
    return Workload(chats, [rng.sample(range(args.chats), args.chats) for _ in range(args.turns)])


@dataclass
class Result:
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int


@dataclass
class ModeRun:
    results: list[Result] = field(default_factory=list)
    store_counters: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- fleet


def fleet_spec(args: argparse.Namespace) -> dict[str, Any]:
    model = str(Path(os.environ.get("RAYFLEET_DEMO_MODELS", REPO / ".demo-models")) / args.model)
    engine = {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048, "block_size": 32,
              "max_num_seqs": 16, "num_gpu_blocks_override": args.kv_blocks, "enable_prefix_caching": True}
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    pool = {"model": model, "min_replicas": 2, "max_replicas": 2, "resources": {"num_cpus": 1},
            "env": env, "engine_args": engine}
    return {
        "name": "bench-prefix-reuse",
        "pools": [{**pool, "name": mode, **MODES[mode][0], "kv_store_namespace": f"bench-prefix-reuse/{mode}"}
                  for mode in args.modes],
        "kv_store": {"name": "bench-prefix-kv", "memory_bytes": args.store_mib << 20, "pin_memory": False,
                     "async_loads": not args.sync_loads},
        "health": {"check_period_s": 5.0, "check_timeout_s": 30},
    }


def replicas_of(controller, pool: str) -> list:
    import ray

    status = ray.get(controller.status.remote())
    ids = sorted(r["replica_id"] for r in status["replicas"] if r["pool"] == pool and r["state"] == "ready")
    return [ray.get_actor(f"rayfleet-replica-{rid}", namespace="rayfleet") for rid in ids]


async def store_counters(replicas: list) -> dict[str, int]:
    total: dict[str, int] = {}
    for stats in await asyncio.gather(*(r.kv_stats.remote() for r in replicas)):
        for name, value in stats.items():
            if name.startswith("store_"):
                total[name] = total.get(name, 0) + value
    return total


async def one_request(replica, request_id: str, prompt: list[int], args: argparse.Namespace) -> tuple[Result, list[int]]:
    from vllm import SamplingParams

    from rayfleet.actors.replica.protocol import GenerateCall

    call = GenerateCall(request_id=request_id, prompt_token_ids=prompt,
                        sampling_params=SamplingParams(max_tokens=args.reply_tokens, temperature=0.0,
                                                       ignore_eos=True))
    began = time.perf_counter()
    ttft, cached, reply = None, 0, []
    async for ref in replica.generate.options(num_returns="streaming").remote(call):
        chunk = await ref
        if chunk.num_cached_tokens is not None:
            cached = chunk.num_cached_tokens
        for choice in chunk.choices:
            if choice.token_ids and ttft is None:
                ttft = time.perf_counter() - began
            reply += choice.token_ids
    return Result(ttft, len(prompt), cached), reply


async def run_mode(replicas: list, workload: Workload, args: argparse.Namespace, tag: str) -> ModeRun:
    """The workload's chats over the pool. With `--scenario scale-out` the first half of the chats runs on the
    first replica alone (the fleet's traffic before the second replica joined; not measured), then the second
    half on the second replica alone: a replica added under load, with none of the system prompts cached."""
    for chat in workload.chats:
        chat.history = list(chat.system)
    if args.scenario == "scale-out":
        half = len(workload.chats) // 2
        await run_chats(replicas[:1], workload, range(half), args, f"{tag}-before")
        return await run_chats(replicas[1:], workload, range(half, len(workload.chats)), args, tag)
    return await run_chats(replicas, workload, range(len(workload.chats)), args, tag)


async def run_chats(replicas: list, workload: Workload, chosen: range, args: argparse.Namespace,
                    tag: str) -> ModeRun:
    """The `chosen` chats, turn by turn, round robin over `replicas`; their results and the store's counters."""
    chats = workload.chats
    run = ModeRun()
    before = await store_counters(replicas)
    semaphore = asyncio.Semaphore(args.concurrency)
    counter = 0

    async def turn(index: int, chat: Chat, t: int) -> None:
        nonlocal counter
        async with semaphore:
            replica = replicas[counter % len(replicas)]  # round robin over the pool
            counter += 1
            prompt = chat.history + chat.users[t]
            result, reply = await one_request(replica, f"{tag}-c{index}-t{t}", prompt, args)
            chat.history = prompt + reply
            run.results.append(result)

    for t in range(args.turns):
        # Tasks start in list order, so they take the semaphore (and their replica) in the turn's order.
        await asyncio.gather(*(turn(i, chats[i], t) for i in workload.orders[t] if i in chosen))
        log(f"  {tag}: turn {t + 1}/{args.turns} done ({len(run.results)} requests)")
    after = await store_counters(replicas)
    run.store_counters = {name: after[name] - before.get(name, 0) for name in after}
    return run


# ----------------------------------------------------------------------------------------- report


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _mean_ms(counters: dict[str, float], seconds: str, calls: str) -> float | None:
    return 1000 * counters[seconds] / counters[calls] if counters.get(calls) else None


def summarize(runs: list[ModeRun], block_size: int = 32) -> dict[str, Any]:
    results = [r for run in runs for r in run.results]
    counters: dict[str, int] = {}
    for run in runs:
        for name, value in run.store_counters.items():
            counters[name] = counters.get(name, 0) + value
    prompt = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    ttfts = [r.ttft_s for r in results]
    asked = counters.get("store_lookup_blocks", 0)
    return {
        "requests": len(results),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "store_tokens_loaded": counters.get("store_blocks_loaded", 0) * block_size,
        "prefill_tokens_computed": prompt - cached,
        "store_hit_rate": (counters.get("store_hit_blocks", 0) / asked) if asked else None,
        "store_blocks_saved": counters.get("store_blocks_saved", 0),
        "store_blocks_already_held": counters.get("store_blocks_already_held", 0),
        "store_load_errors": counters.get("store_load_errors", 0),
        "store_lookups_priced_out": counters.get("store_lookups_priced_out", 0),
        "store_loads_priced_out": counters.get("store_loads_priced_out", 0),
        # Mean wait per store call, ms: lookups and loads delay a step, puts run beside it.
        "store_lookup_ms": _mean_ms(counters, "store_lookup_s", "store_lookups"),
        "store_load_ms": _mean_ms(counters, "store_load_s", "store_loads"),
        "store_put_ms": _mean_ms(counters, "store_put_s", "store_puts"),
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p99_ms": 1000 * percentile(ttfts, 99),
        "ttft_mean_ms": 1000 * statistics.fmean(ttfts),
        "ttfts_ms": [round(1000 * t, 2) for t in ttfts],
    }


def table(summary: dict[str, Any], modes: tuple[str, ...]) -> str:
    plain = summary["plain"]
    stores = [mode for mode in modes if mode != "plain"]

    def ratio(mode: str, key: str) -> str:
        return f"{summary[mode][key] / plain[key]:.2f}x" if plain[key] else "-"

    def fmt(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key == "store_hit_rate":
            return f"{value:.1%}"
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    rows = [("requests", "requests"), ("prompt tokens", "prompt_tokens"),
            ("tokens from cache (local + store)", "cached_tokens"), ("  of which loaded from the store", "store_tokens_loaded"),
            ("prefill tokens computed", "prefill_tokens_computed"), ("store hit rate (blocks)", "store_hit_rate"),
            ("lookups priced out", "store_lookups_priced_out"), ("loads priced out", "store_loads_priced_out"),
            ("blocks put into the store", "store_blocks_saved"),
            ("blocks computed but already in the store (not sent)", "store_blocks_already_held"),
            ("store load errors", "store_load_errors"),
            ("mean store lookup (ms)", "store_lookup_ms"), ("mean store load (ms)", "store_load_ms"),
            ("mean store put (ms, background)", "store_put_ms"),
            ("TTFT p50 (ms)", "ttft_p50_ms"), ("TTFT p99 (ms)", "ttft_p99_ms"), ("TTFT mean (ms)", "ttft_mean_ms")]
    compared = ("cached_tokens", "prefill_tokens_computed", "ttft_p50_ms", "ttft_p99_ms", "ttft_mean_ms")
    lines = ["| metric | " + " | ".join(f"`{m}` ({MODES[m][1]})" for m in modes) + " | "
             + " | ".join(f"`{m}` / `plain`" for m in stores) + " |",
             "| --- | " + " | ".join("---:" for _ in modes) + " | " + " | ".join("---:" for _ in stores) + " |"]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(key, summary[m][key]) for m in modes) + " | "
                     + " | ".join(ratio(m, key) if key in compared else "" for m in stores) + " |")
    for mode in stores:
        saved = plain["prefill_tokens_computed"] - summary[mode]["prefill_tokens_computed"]
        lines.append(f"\nprefill tokens saved by `{mode}`: {saved} of {plain['prefill_tokens_computed']} computed "
                     f"without a store ({saved / max(1, plain['prefill_tokens_computed']):.1%})")
    lines += ["", "per repetition (fresh prompts each; the modes run one after the other, in this order):", "",
              "| rep | order | " + " | ".join(f"TTFT p50 / p99 `{m}` (ms)" for m in modes) + " |",
              "| ---: | --- | " + " | ".join("---:" for _ in modes) + " |"]
    for i, rep in enumerate(summary["reps"]):
        lines.append(f"| {i + 1} | {' then '.join(rep['order'])} | "
                     + " | ".join(f"{rep[m]['ttft_p50_ms']:.1f} / {rep[m]['ttft_p99_ms']:.1f}" for m in modes) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], modes: tuple[str, ...], model: str, path: Path) -> None:
    """Left: each mode's TTFT distribution over every request (where the store helps, where it costs); right:
    each mode's p50 per repetition (how much of a difference the machine's noise is)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (cdf, per_rep) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in modes:
        ttfts = sorted(summary[mode]["ttfts_ms"])
        line, = cdf.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], label=f"{mode}: {MODES[mode][1]}")
        reps = [rep[mode]["ttft_p50_ms"] for rep in summary["reps"]]
        per_rep.plot(range(1, len(reps) + 1), reps, marker="o", color=line.get_color(), label=mode)
    cdf.set_xscale("log")
    everything = [t for mode in modes for t in summary[mode]["ttfts_ms"]]
    cdf.set_xticks([t for t in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
                    if min(everything) <= t <= max(everything)])
    cdf.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    cdf.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # 2x10^2, 3x10^2, ... overlapped
    cdf.set(xlabel="TTFT (ms, log scale)", ylabel="share of requests", title="TTFT, every request of every repetition")
    per_rep.set(xlabel="repetition (fresh prompts; mode order rotated)", ylabel="TTFT p50 (ms)",
                title="p50 per repetition")
    for ax in (cdf, per_rep):
        ax.grid(alpha=0.3)
    cdf.legend(fontsize=8)
    fig.suptitle(f"Prefix reuse through the fleet KV store, 2 replicas per mode (2-core CPU, {model})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------- main


async def bench(args: argparse.Namespace, controller) -> dict[str, Any]:
    pools = {mode: replicas_of(controller, mode) for mode in args.modes}
    # Warm-up: one short request per replica (first-step costs out of the measurement).
    from vllm import SamplingParams  # noqa: F401  (imported once, outside the timed path)

    for mode, replicas in pools.items():
        for i, replica in enumerate(replicas):
            await one_request(replica, f"warmup-{mode}-{i}", list(range(10, 60)), args)
    runs: dict[str, list[ModeRun]] = {mode: [] for mode in args.modes}
    for rep in range(args.reps):
        workload = make_workload(args, args.seed + rep)
        for mode in rotated(args.modes, rep):
            log(f"rep {rep + 1}/{args.reps}: {mode} ({MODES[mode][1]})")
            runs[mode].append(await run_mode(pools[mode], workload, args, f"r{rep}-{mode}"))
    return {**{mode: summarize(runs[mode]) for mode in args.modes},
            "reps": [{"order": rotated(args.modes, rep), **{mode: summarize([runs[mode][rep]]) for mode in args.modes}}
                     for rep in range(args.reps)]}


def rotated(modes: tuple[str, ...], rep: int) -> list[str]:
    """The modes' order in repetition `rep`: over len(modes) repetitions each mode takes every place once."""
    return list(modes[rep % len(modes):] + modes[:rep % len(modes)])


def main() -> None:
    args = parse_args()
    os.environ.setdefault("RAYFLEET_DEMO_MODELS", str(REPO / ".demo-models"))
    import ray

    from rayfleet.control_plane.controller import get_or_create_controller
    from bench_migration_downtime import migration_model_config
    from rayfleet.control_plane.cli.demo_models import DEMO_MODELS, build_demo_models
    from rayfleet.control_plane.spec import parse_spec

    build_demo_models(Path(os.environ["RAYFLEET_DEMO_MODELS"]), (*DEMO_MODELS, migration_model_config()))
    ray.init(num_cpus=8, include_dashboard=False, namespace="rayfleet", log_to_driver=False)
    spec = parse_spec(fleet_spec(args))
    log(f"starting the fleet: {len(args.modes)} pools x 2 replicas of {args.model} and the KV store")
    started = time.monotonic()
    controller = get_or_create_controller(spec)
    try:
        ray.get(controller.wait_ready.remote(timeout_s=600))
        log(f"fleet ready in {time.monotonic() - started:.0f} s")
        summary = asyncio.run(bench(args, controller))
    finally:
        ray.get(controller.shutdown.remote())
        ray.kill(controller)
        ray.shutdown()
    print(table(summary, args.modes))
    if args.plot:
        plot(summary, args.modes, args.model, args.plot)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                         "machine": f"{platform.node()} {os.cpu_count()} CPUs",
                                         "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
