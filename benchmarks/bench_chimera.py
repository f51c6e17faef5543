"""Chimera routing against the baselines on the trained task models, in one run.

    python benchmarks/bench_chimera.py [--rates 2 6 12] [--duration 20] [--table-queries 30]

1. **Offline table, RouterBench style.** The demo fleet (task-small, task-large, task-string) answers the same
   held-out task questions, one pool at a time on an idle fleet: per (query, pool) the verifier's score, output
   tokens and latency. Written to `actors/tasks/trained/routing-table.jsonl` (the chimera router's labelled
   table) with best-single, oracle and the router's cross-validated gap to the oracle.
2. **Workflows under load.** Three-stage workflows where each stage's output is in the next prompt:
   `product` (a * b), `sum` (the model's product + c: a wrong product makes a wrong sum), `spell` (a word
   backward). Poisson arrivals of workflows at several rates, the same workflows in the same order for every
   contender: rayfleet with `random`, `round_robin`, `least_load`, `best_model_only` (the table's most accurate
   model), `chimera` (feedback from the verifier after each stage), then Ray Serve LLM serving only that best
   model with the client naming it. Per contender and rate: workflow end-to-end p50/p99, stage accuracy (mean
   verifier score) and workflow accuracy (every stage accepted); the latency-accuracy frontier as a PNG; for
   rayfleet's contenders the mean time a request spent in each ingress stage before its engine (render, the
   router's embedding wait, admission and routing: the fleet's `rayfleet_ingress_stage_seconds`, read from
   Ray's metrics endpoint) and, for chimera, the share of decisions made with the prompt's embedding.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contenders import SERVED_NAME, ServeLLM, free_port, start_fleet, wait_http_ok  # noqa: E402

from rayfleet.actors.tasks import DIFFICULTIES, FAMILIES, TRAINED_MODELS_DIR, TaskInstance, generate, score  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TABLE = TRAINED_MODELS_DIR / "routing-table.jsonl"
RESULTS = REPO / "benchmarks" / "results" / "chimera.json"
PLOT = REPO / "docs" / "benchmarks-chimera-frontier.png"
TABLE_SEED = 1_700_000_000  # table queries: far from training seeds and from the workflows'
WORKFLOW_SEED = 1_800_000_000
ROUTERS = ("chimera", "best_model_only", "least_load", "round_robin", "random")
# chimera with every replica congesting alone (cpu_replicas_share_node: false): its shared-node ablation
ABLATIONS = ("chimera_per_replica",)
MAX_TOKENS = 16


# --- the fleet -----------------------------------------------------------------------------------------------

# The ingress' port: the same for every router's redeploy (direct ingress binds it in the ingress replica).
PORT = free_port()


def demo_spec(router: dict) -> dict:
    from rayfleet.control_plane.cli.launch import load_any_spec

    spec = load_any_spec(None).model_dump()
    spec["policies"]["router"] = router
    spec["ingress"]["port"] = PORT
    return spec


def deploy_ingress(spec: dict) -> str:
    """Redeploy the ingress with `spec`'s router; the controller and its replicas stay as they are. The old
    ingress goes first: its replica holds the port the new one binds."""
    from ray import serve

    from rayfleet.control_plane.serve_app import build_app

    serve.delete("rayfleet")
    serve.run(build_app({"spec": spec}), name="rayfleet", route_prefix="/", blocking=False)  # waits until running
    base = f"http://127.0.0.1:{PORT}"
    wait_http_ok(f"{base}/health", 120, "fleet ingress")
    return base


def warm_up(base: str, model: str) -> None:
    with httpx.Client(timeout=300) as client:
        for task in table_queries(1):
            chat(client, base, model, task.prompt)


def chat(client: httpx.Client, base: str, model: str, prompt: str, headers: dict | None = None) -> tuple[dict, float]:
    started = time.perf_counter()
    response = client.post(f"{base}/v1/chat/completions", headers=headers or {}, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
        "temperature": 0})
    response.raise_for_status()
    return response.json(), time.perf_counter() - started


# --- 1. the offline table ------------------------------------------------------------------------------------

def table_queries(per_cell: int) -> list[TaskInstance]:
    return [i for f in FAMILIES for d in DIFFICULTIES for i in generate(f, d, seed=TABLE_SEED, count=per_cell)]


def build_table(base: str, pools: list[str], queries: list[TaskInstance]) -> list[dict]:
    from tqdm import tqdm

    rows = []
    with httpx.Client(timeout=120) as client, tqdm(total=len(pools) * len(queries), desc="table", unit="req") as bar:
        for pool in pools:
            chat(client, base, pool, queries[0].prompt)  # warm-up off the clock
            for query in queries:
                body, latency = chat(client, base, pool, query.prompt)
                rows.append({"prompt": query.prompt, "pool": pool, "query_id": query.key,
                             "score": score(query, body["choices"][0]["message"]["content"] or ""),
                             "output_tokens": body["usage"]["completion_tokens"], "latency_s": round(latency, 5)})
                bar.update()
    return rows


def offline_report(rows: list[dict], folds: int = 5) -> dict:
    """Best single pool, oracle, and chimera's pick (cross-validated by query) on the table."""
    import numpy as np
    from rayfleet.actors.embedding.embedder import PromptEncoder
    from rayfleet.policies.base import LabelledOutcome
    from rayfleet.policies.chimera import ChimeraRouter

    pools = sorted({r["pool"] for r in rows})
    queries = sorted({r["query_id"] for r in rows})
    by = {(r["query_id"], r["pool"]): r for r in rows}
    prompts = {r["query_id"]: r["prompt"] for r in rows}
    vectors = dict(zip(queries, PromptEncoder().encode([prompts[q] for q in queries])))
    accuracy = {p: float(np.mean([by[q, p]["score"] >= 1 for q in queries])) for p in pools}
    cells = sorted({q.rsplit("/", 1)[0] for q in queries})
    per_cell = {p: {c: float(np.mean([by[q, p]["score"] >= 1 for q in queries if q.startswith(c + "/")]))
                    for c in cells} for p in pools}
    latency = {p: float(np.mean([by[q, p]["latency_s"] for q in queries])) for p in pools}
    oracle = float(np.mean([max(by[q, p]["score"] >= 1 for p in pools) for q in queries]))
    rng = random.Random(0)
    shuffled = queries[:]
    rng.shuffle(shuffled)
    picks = {}
    for fold in range(folds):
        held = set(shuffled[fold::folds])
        train = [by[q, p] for q in queries if q not in held for p in pools]
        router = ChimeraRouter(rows=[LabelledOutcome(**r) for r in train])
        router.fit_table([vectors[r["query_id"]] for r in train])
        for q in held:
            picks[q] = max(pools, key=lambda p: router.predict(p, vectors[q])[0])
    routed = float(np.mean([by[q, picks[q]]["score"] >= 1 for q in queries]))
    routed_latency = float(np.mean([by[q, picks[q]]["latency_s"] for q in queries]))
    best = max(pools, key=lambda p: accuracy[p])
    return {"pools": pools, "queries": len(queries), "accuracy": accuracy, "per_cell": per_cell,
            "mean_latency_s": latency, "best_single": best, "oracle": oracle, "chimera_cv": routed,
            "chimera_cv_latency_s": routed_latency,
            "chimera_picks": {p: sum(v == p for v in picks.values()) for p in pools}}


# --- 2. workflows under load ---------------------------------------------------------------------------------

@dataclass
class WorkflowResult:
    workflow: int
    difficulty: str
    latency_s: float
    stage_scores: list[float]
    pools: list[str]

    @property
    def all_accepted(self) -> bool:
        return all(s >= 1 for s in self.stage_scores)


def workflow_seeds(count: int) -> list[tuple[int, str]]:
    rng = random.Random(WORKFLOW_SEED)
    return [(WORKFLOW_SEED + i, rng.choice(DIFFICULTIES)) for i in range(count)]


def sum_stage(product: TaskInstance, model_product: str) -> TaskInstance:
    """The stage after `product`: `<the model's product> + c`, answered against the true product."""
    c = random.Random(product.seed).randint(1, 9)
    return TaskInstance(family="chain_sum", difficulty=product.difficulty, seed=product.seed,
                        prompt=f"State the final answer to the following arithmetic problem: {model_product} + {c} =",
                        answer=str(int(product.answer) + c))


async def run_workflow(client, base: str, model: str, index: int, seed: int, difficulty: str,
                       feedback: bool) -> WorkflowResult:
    from rayfleet.actors.tasks import extract_answer

    [product] = generate("products", difficulty, seed=seed)
    [spell] = generate("spell_backward", difficulty, seed=seed)
    started = time.perf_counter()
    scores, pools, verdicts = [], [], []
    task = product
    for stage in (1, 2, 3):
        headers = {"x-rayfleet-workflow-id": f"wf-{index}", "x-rayfleet-workflow-stage": f"{stage}/3"}
        response = await client.post(f"{base}/v1/chat/completions", headers=headers, json={
            "model": model, "messages": [{"role": "user", "content": task.prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0})
        if response.status_code != 200:  # refused (429/503): the workflow fails here, its stages score 0
            scores += [0.0] * (4 - stage)
            pools.append(f"error {response.status_code}")
            break
        body = response.json()
        text = body["choices"][0]["message"]["content"] or ""
        scores.append(score(task, text))
        pools.append(body["model"])
        if feedback:  # sent beside the next stage, as a client with its own checker would, not before it
            verdicts.append(asyncio.create_task(client.post(f"{base}/v1/feedback", json={
                "request_id": body["id"], "score": scores[-1]})))
        task = sum_stage(product, extract_answer(text) or "0") if stage == 1 else spell
    latency = time.perf_counter() - started
    await asyncio.gather(*verdicts)
    return WorkflowResult(index, difficulty, latency, scores, pools)


async def run_rate(base: str, model: str, rate: float, duration_s: float, feedback: bool) -> list[WorkflowResult]:
    """Poisson arrivals at `rate` workflows/s for `duration_s` (the same arrival times for every contender)."""
    rng = random.Random(int(rate * 1000))
    count = max(1, int(rate * duration_s))
    gaps = [rng.expovariate(rate) for _ in range(count)]
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=512)) as client:
        jobs = []
        for (index, (seed, difficulty)), gap in zip(enumerate(workflow_seeds(count)), gaps):
            jobs.append(asyncio.create_task(run_workflow(client, base, model, index, seed, difficulty, feedback)))
            await asyncio.sleep(gap)
        return list(await asyncio.gather(*jobs))


def summarize(results: list[WorkflowResult]) -> dict:
    latencies = sorted(r.latency_s for r in results)
    pools = {}
    for r in results:
        for p in r.pools:
            pools[p] = pools.get(p, 0) + 1
    return {"workflows": len(results), "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "stage_accuracy": statistics.mean(s >= 1 for r in results for s in r.stage_scores),
            "workflow_accuracy": statistics.mean(r.all_accepted for r in results), "pools": pools}


STAGE_SERIES = re.compile(r'^ray_rayfleet_ingress_stage_seconds_(sum|count)\{[^}]*stage="([^"]+)"[^}]*\} (\S+)$')


def stage_totals() -> dict[str, list[float]]:
    """`rayfleet_ingress_stage_seconds` as Ray exports it now: stage -> [seconds, requests], every ingress process."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for line in text.splitlines():
        match = STAGE_SERIES.match(line)
        if match:
            totals[match[2]][0 if match[1] == "sum" else 1] += float(match[3])
    return totals


def stage_means_ms(before: dict[str, list[float]], requests: int, timeout_s: float = 60) -> dict[str, float]:
    """Mean ms per request in each ingress stage since `before`, once Ray's periodic export counts `requests`."""
    deadline = time.monotonic() + timeout_s
    while True:
        after = stage_totals()
        counted = after["render"][1] - before.get("render", [0.0, 0.0])[1]
        if counted >= requests or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    means = {}
    for stage, (seconds, count) in after.items():
        then = before.get(stage, [0.0, 0.0])
        if count > then[1]:
            means[stage] = round(1e3 * (seconds - then[0]) / (count - then[1]), 2)
    return means


def embedded_share(base: str) -> float:
    """Of the router's last decisions (up to 200: the end of a rate's run, under its load), the share routed with
    the prompt's embedding; the rest waited `embedding_wait_s` for it in vain and went on the pools' priors."""
    decisions = httpx.get(f"{base}/v1/fleet/routing", params={"limit": 200}, timeout=30).json()["decisions"]
    return statistics.mean(d["embedded"] for d in decisions) if decisions else float("nan")


# --- the run -------------------------------------------------------------------------------------------------

def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[2.0, 6.0, 12.0], help="workflows per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per (contender, rate)")
    parser.add_argument("--table-queries", type=int, default=30, help="table queries per (family, difficulty)")
    parser.add_argument("--skip-table", action="store_true", help="reuse the committed routing table")
    parser.add_argument("--skip-serve-llm", action="store_true")
    parser.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=ROUTERS + ABLATIONS,
                        help="chimera_per_replica: chimera with every replica congesting alone "
                             "(cpu_replicas_share_node: false), the ablation of its shared-node congestion")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT, help="where the frontier PNG goes")
    args = parser.parse_args(argv)
    import ray
    from ray import serve

    from rayfleet.control_plane.cli.launch import controller

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": uptime(),
            "command": "python benchmarks/bench_chimera.py " + " ".join(argv or sys.argv[1:]),
            "rates": args.rates, "duration_s": args.duration}
    os.environ.setdefault("RAYFLEET_TASK_MODELS", str(TRAINED_MODELS_DIR))
    base = start_fleet(demo_spec({"name": "least_load", "params": {}}))
    pools = [p["name"] for p in demo_spec({"name": "least_load"})["pools"]]
    report = {"meta": meta}
    if not args.skip_table:
        rows = build_table(base, pools, table_queries(args.table_queries))
        TABLE.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [json.loads(line) for line in TABLE.read_text().splitlines()]
    report["table"] = offline_report(rows)
    best = report["table"]["best_single"]
    print(json.dumps(report["table"], indent=1))
    routers = {"random": {"name": "random"}, "round_robin": {"name": "round_robin"},
               "least_load": {"name": "least_load"},
               "best_model_only": {"name": "best_model_only", "params": {"pool": best}},
               "chimera": load_chimera_params()}
    routers["chimera_per_replica"] = {**routers["chimera"],
                                      "params": {**routers["chimera"]["params"], "cpu_replicas_share_node": False}}
    runs = {}
    for name in args.routers:
        base = deploy_ingress(demo_spec(routers[name]))
        warm_up(base, "auto")  # off the clock: the router's start (chimera: embedder and table) and first steps
        for rate in args.rates:
            before = stage_totals()
            results = asyncio.run(run_rate(base, "auto", rate, args.duration, feedback=name.startswith("chimera")))
            run = runs.setdefault(name, {})[str(rate)] = summarize(results)
            run["stage_ms"] = stage_means_ms(before, sum(len(r.pools) for r in results))
            if name.startswith("chimera"):
                run["embedded_share"] = embedded_share(base)
            print(name, rate, json.dumps(runs[name][str(rate)]), flush=True)
            args.out.write_text(json.dumps({**report, "runs": runs}, indent=1) + "\n")  # partial, in case
    serve.shutdown()
    ray.get(controller().shutdown.remote())
    ray.kill(controller())
    if not args.skip_serve_llm:
        contender = ServeLLM(name="serve_llm", model_dir=TRAINED_MODELS_DIR / best, log_dir=Path("/tmp"))
        contender.engine_args = demo_spec({"name": "least_load"})["pools"][0]["engine_args"]
        llm_base = contender.start()
        warm_up(llm_base, SERVED_NAME)
        for rate in args.rates:
            results = asyncio.run(run_rate(llm_base, SERVED_NAME, rate, args.duration, feedback=False))
            runs.setdefault(f"serve_llm ({best})", {})[str(rate)] = summarize(results)
            print("serve_llm", rate, json.dumps(runs[f"serve_llm ({best})"][str(rate)]))
        contender.stop()
    report["runs"] = runs
    meta["load_after"] = uptime()
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.plot)
    print(markdown(report))
    return 0


def load_chimera_params() -> dict:
    """The demo spec's chimera router (its table and lambda)."""
    from rayfleet.control_plane.cli.launch import load_any_spec

    return load_any_spec(None).policies.router.model_dump()


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = report["meta"]["rates"]
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for name, by_rate in report["runs"].items():
            cell = by_rate[str(rate)]
            ax.scatter(cell["p50_s"] * 1e3, 100 * cell["stage_accuracy"], s=60,
                       marker="*" if name.startswith("chimera") else "o", label=name)
        ax.set_title(f"{rate:g} workflows/s")
        ax.set_xlabel("workflow end-to-end p50 (ms), lower is better")
        ax.set_ylabel("stage accuracy (%), higher is better")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Latency-accuracy frontier: 3-stage task workflows on the trained task models (2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(report: dict) -> str:
    table = report["table"]
    lines = ["| pool | accuracy | " + " | ".join(table["per_cell"][table["pools"][0]]) + " | mean latency ms |",
             "|---" * (3 + len(table["per_cell"][table["pools"][0]])) + "|"]
    for p in table["pools"]:
        lines.append(f"| {p} | {100 * table['accuracy'][p]:.0f}% | "
                     + " | ".join(f"{100 * v:.0f}%" for v in table["per_cell"][p].values())
                     + f" | {1e3 * table['mean_latency_s'][p]:.0f} |")
    lines += ["", f"best single: {table['best_single']} {100 * table['accuracy'][table['best_single']]:.1f}%; "
                  f"oracle {100 * table['oracle']:.1f}%; chimera (5-fold CV, quality only) "
                  f"{100 * table['chimera_cv']:.1f}% "
                  f"(gap to oracle {100 * (table['oracle'] - table['chimera_cv']):.1f} "
                  f"points), picks {table['chimera_picks']}", ""]
    lines += ["| contender | rate wf/s | p50 ms | p99 ms | stage acc | workflow acc | requests per pool |",
              "|---|---|---|---|---|---|---|"]
    for name, by_rate in report["runs"].items():
        for rate, cell in by_rate.items():
            lines.append(f"| {name} | {rate} | {1e3 * cell['p50_s']:.0f} | {1e3 * cell['p99_s']:.0f} | "
                         f"{100 * cell['stage_accuracy']:.1f}% | {100 * cell['workflow_accuracy']:.1f}% | "
                         f"{cell['pools']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
