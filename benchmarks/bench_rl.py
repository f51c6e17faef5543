"""Async vs sync RL on the fleet, side by side in one run: the same GRPO job (examples/rl/products.yaml) with
staleness bound k = 0 (synchronous on-policy), 1 and 2 on the same rollout pool and trainer resources; then the
k = 1 job again with one rollout replica killed mid-run; optionally the seed-to-seed spread of a short job.

Per contender: samples/s, time to a target held-out reward, held-out reward at equal wall time, reward gained
per wall-clock minute, and where the time went (trainer compute, trainer waiting for groups, weight sync,
rollouts held back by the staleness bound). Held-out reward is the greedy verifier score of weight snapshots
taken during the run and evaluated after it (evaluation costs the run nothing).

    python benchmarks/bench_rl.py                          # k = 0, 1, 2 and the kill run (~7 min on 2 cores)
    python benchmarks/bench_rl.py --replicas 1 --iterations 4 --contenders 2,1,0 --no-kill   # one engine, mu = 4
    python benchmarks/bench_rl.py --spread 4 --steps 12 --contenders none --no-kill   # seed-to-seed spread only
    python benchmarks/bench_rl.py --replicas 1 --iterations 4 --contenders 0,0@split,1@split,1 --no-kill
                                                           # trainer and engines on cores of their own (@split)
Results: benchmarks/results/rl_async.json, docs/benchmarks-rl-curves.{csv,png} (`--results`, `--curves`);
docs/benchmarks-rl.md quotes them. `--plot` draws RL job results (`--out` of the job) into docs/rl-reward-curve.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from core_split import CoreSplit

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "rl_async.json"
JOB_CURVES = REPO / "docs" / "rl-reward-curve"  # .csv and .png: RL job results drawn with --plot
BENCH_CURVES = REPO / "docs" / "benchmarks-rl-curves"  # this benchmark's contenders
CONFIG = REPO / "examples" / "rl" / "products.yaml"
FLEET = REPO / "examples" / "rl" / "fleet.yaml"
PLACEMENTS = ("split", "trainer-alone")  # contender suffixes: benchmarks/core_split.py


def load_average() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def start_fleet(replicas: int):
    import ray

    from rayfleet.control_plane.cli.launch import load_any_spec
    from rayfleet.control_plane.controller import get_or_create_controller

    ray.init(num_cpus=16, include_dashboard=False, namespace="rayfleet", log_to_driver=False)
    spec = load_any_spec(str(FLEET))
    rollout = next(p for p in spec.pools if p.rollout).model_copy(update={"initial_replicas": replicas,
                                                                          "max_replicas": replicas})
    controller = get_or_create_controller(spec.model_copy(update={"pools": [rollout]}))
    ray.get(controller.wait_ready.remote(timeout_s=600))
    return controller


def config_for(k: int, steps: int, seed: int, eval_every: int, sync: str | None = None,
               iterations: int | None = None):
    from rayfleet.control_plane.rl.config import load_rl_config

    config = load_rl_config(CONFIG)
    trainer = config.trainer.model_copy(update={"seed": config.trainer.seed + seed,
                                                "iterations": iterations or config.trainer.iterations})
    weight_sync = config.weight_sync.model_copy(update={"policy": sync or config.weight_sync.policy})
    return config.model_copy(update={
        "staleness_bound": k, "steps": steps, "name": f"products-s{seed}", "weight_sync": weight_sync,
        "tasks": config.tasks.model_copy(update={"seed": config.tasks.seed + seed}),
        "trainer": trainer,
        "eval": config.eval.model_copy(update={"every_steps": eval_every})})


async def run_job(controller, config, kill_at: int | None = None):
    from rayfleet.control_plane.rl.job import RLJob

    job = RLJob(config, controller, show_progress=False)
    killer = asyncio.ensure_future(kill_a_replica(job, kill_at)) if kill_at else None
    try:
        return await job.run(), (await killer if killer else None)
    finally:
        if killer and not killer.done():
            killer.cancel()


async def kill_a_replica(job, at_step: int) -> dict:
    """Once the run reaches `at_step`, kill one rollout replica's actor while rollouts run on it."""
    import ray

    while not (job.pool.versions and job.published >= at_step):
        await asyncio.sleep(0.05)
    victim = sorted(job.pool.handles)[0]
    ray.kill(job.pool.handles[victim])
    return {"replica": victim, "at_version": job.published, "at": time.time()}


def reward_at(curve: list[dict], seconds: float) -> float:
    """Held-out reward of the newest snapshot taken by `seconds` into the run."""
    done = [p for p in curve if p["elapsed_s"] <= seconds + 1e-9]
    return max(done, key=lambda p: p["elapsed_s"])["reward"]


def time_to(curve: list[dict], target: float) -> float | None:
    hits = [p["elapsed_s"] for p in sorted(curve, key=lambda p: p["elapsed_s"]) if p["reward"] >= target]
    return hits[0] if hits else None


def summarize(results: dict[str, dict], target: float) -> dict[str, dict]:
    base = results.get("k=0")
    equal_wall = min(r["wall_s"] for r in results.values())
    rows = {}
    for name, r in results.items():
        curve = r["curve"]
        start, end = curve[0]["reward"], curve[-1]["reward"]
        rows[name] = {
            "samples_per_s": round(r["samples_per_s"], 2),
            "speedup_vs_sync": round(r["samples_per_s"] / base["samples_per_s"], 2) if base else None,
            "wall_s": round(r["wall_s"], 1),
            "heldout_start": round(start, 3), "heldout_end": round(end, 3),
            "reward_per_minute": round((end - start) / (r["wall_s"] / 60), 4),
            f"time_to_{target:.2f}_s": time_to(curve, target),
            f"reward_at_{equal_wall:.0f}_s": round(reward_at(curve, equal_wall), 3),
            "trainer_compute_s": round(r["trainer_compute_s"], 1), "trainer_wait_s": round(r["trainer_wait_s"], 1),
            "sync_s": round(r["sync_s"], 2), "syncs": r["syncs"],
            "rollouts_held_ahead_s": round(r["rollout_blocked_ahead_s"], 1),
            "rollouts_held_for_weights_s": round(r["rollout_blocked_stale_weights_s"], 1),
            "dropped_stale": r["dropped_stale"], "replays": r["replays"],
            "lag_mean": round(statistics.mean(s["version_lag_mean"] for s in r["steps"]), 2),
        }
    return rows


def write_curves(results: dict[str, dict], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem.parent.mkdir(parents=True, exist_ok=True)
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "version", "elapsed_s", "heldout_reward", "rollout_reward"])
        for name, r in results.items():
            rollout = {s["step"]: s["reward_mean"] for s in r["steps"]}
            for p in r["curve"]:
                writer.writerow([name, p["version"], round(p["elapsed_s"], 2), round(p["reward"], 4),
                                 round(rollout.get(p["version"], float("nan")), 4)])
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        versions = [p["version"] for p in r["curve"]]
        rewards = [p["reward"] for p in r["curve"]]
        by_step.plot(versions, rewards, marker="o", label=name)
        by_time.plot([p["elapsed_s"] for p in r["curve"]], rewards, marker="o", label=name)
    by_step.set(xlabel="trainer version (training steps)", ylabel="held-out greedy reward",
                title="held-out reward by trainer version")
    by_time.set(xlabel="wall clock (s)", ylabel="held-out greedy reward", title="same runs against wall time")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contenders", default="0,1,2", help="staleness bounds to compare, each K or "
                        "K:SYNC_POLICY (e.g. 1:deferred; default: the config's, eager), with @split to run the "
                        "trainer on core 1 and the rollout engines on core 0, Ray and the driver floating, or "
                        "@trainer-alone for the trainer on core 1 and everything else on core 0 "
                        "(benchmarks/core_split.py: devices of their own, emulated), or 'none'")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=2, help="rollout replicas (each one vLLM CPU engine)")
    parser.add_argument("--iterations", type=int, help="trainer updates per step over its groups (GRPO's mu; "
                        "default: the config's)")
    parser.add_argument("--target", type=float, help="held-out reward for the time-to-target column "
                        "(default: halfway from the start to the synchronous run's end)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="an unreported k = 0 job of this many steps "
                        "first, so that no contender pays the fresh fleet's warm-up (on 2026-12-04 a first k = 0 "
                        "job ran at 139 samples/s, the same job after a warm-up at 171-208)")
    parser.add_argument("--no-kill", action="store_true", help="skip the run with a rollout replica killed")
    parser.add_argument("--kill-at", type=int, default=8, help="version at which the kill run loses a replica")
    parser.add_argument("--spread", type=int, default=0, help="also run the job with this many seeds (k = 1)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the results JSON goes (merged into "
                        "an existing file)")
    parser.add_argument("--curves", type=Path, default=BENCH_CURVES, help="the contenders' held-out curves go to "
                        "this path with .csv and .png")
    parser.add_argument("--plot", nargs="+", type=Path, metavar="RESULT_JSON",
                        help="only draw the curve files from RL job results (`python -m rayfleet.control_plane.rl "
                        "--out DIR` writes them)")
    args = parser.parse_args()
    if args.plot:
        # Named by file: runs of one config (seeds, learning rates) share name and k.
        write_curves({path.stem: json.loads(path.read_text()) for path in args.plot}, JOB_CURVES)
        return
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = load_average()
    controller = start_fleet(args.replicas)
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": started.isoformat(),
                 "command": " ".join(["python"] + sys.argv), "load_before": load_before, "steps": args.steps,
                 "replicas": args.replicas, "iterations": args.iterations, "warmup_steps": args.warmup_steps}
    if args.warmup_steps:
        asyncio.run(run_job(controller, config_for(0, args.warmup_steps, 0, args.warmup_steps, None, args.iterations)))
    results: dict[str, dict] = {}
    contenders = [] if args.contenders == "none" else args.contenders.split(",")
    for contender in contenders:
        contender, _, placement = contender.partition("@")
        k, _, sync = contender.partition(":")
        config = config_for(int(k), args.steps, 0, args.eval_every, sync or None, args.iterations)
        name = f"k={k}" + (f" {sync}" if sync else "") + (f" {placement}" if placement else "")
        if placement in PLACEMENTS:
            alone = placement == "trainer-alone"
            with CoreSplit(trainer_cores={1}, rollout_cores={0}, host_with_rollouts=alone) as split:
                result, _ = asyncio.run(run_job(controller, config))
            print(f"{name}: threads placed {split.threads_placed}", flush=True)
        elif placement:
            parser.error(f"--contenders: unknown placement {placement!r} in {contender}@{placement} (one of "
                         f"{', '.join(PLACEMENTS)})")
        else:
            result, _ = asyncio.run(run_job(controller, config))
        results[name] = result.to_json()
        print(f"{name}: {result.samples_per_s:.1f} samples/s, held-out {result.curve[0]['reward']:.3f} -> "
              f"{result.curve[-1]['reward']:.3f} in {result.wall_s:.0f} s", flush=True)
    if results:
        target = args.target
        if target is None and "k=0" in results:
            curve = results["k=0"]["curve"]
            target = round((curve[0]["reward"] + curve[-1]["reward"]) / 2, 3)
        out["target"] = target
        out["contenders"] = summarize(results, target or 1.0)
        out["runs"] = results
    if not args.no_kill:
        config = config_for(1, args.steps, 0, args.eval_every, iterations=args.iterations)
        result, kill = asyncio.run(run_job(controller, config, args.kill_at))
        out["kill_run"] = {"killed": kill, "steps_done": len(result.steps), "replays": result.replays,
                           "groups_started": result.groups_started, "dropped_stale": result.dropped_stale,
                           "samples_per_s": round(result.samples_per_s, 2),
                           "heldout": [round(p["reward"], 3) for p in result.curve]}
        print("kill run:", json.dumps(out["kill_run"]), flush=True)
    if args.spread:
        finals = []
        for seed in range(1, args.spread + 1):
            result, _ = asyncio.run(run_job(controller, config_for(1, args.steps, seed, args.steps)))
            finals.append({"seed": seed, "start": result.curve[0]["reward"], "end": result.curve[-1]["reward"]})
            print(f"seed {seed}: {finals[-1]}", flush=True)
        ends = [f["end"] for f in finals]
        rises = [f["end"] - f["start"] for f in finals]
        out["spread"] = {"steps": args.steps, "runs": finals, "end_std": round(statistics.stdev(ends), 4),
                         "end_range": round(max(ends) - min(ends), 4), "rise_min": round(min(rises), 4),
                         "rise_mean": round(statistics.mean(rises), 4)}
    out["load_after"] = load_average()
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))
    if not args.no_write and results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(args.results.read_text()) if args.results.exists() else {}
        args.results.write_text(json.dumps({**previous, **out}, indent=2) + "\n")
        write_curves(results, args.curves)
    elif not args.no_write and args.spread:
        previous = json.loads(args.results.read_text()) if args.results.exists() else {}
        args.results.write_text(json.dumps({**previous, "spread": out["spread"], "spread_load": [load_before,
                                       out["load_after"]]}, indent=2) + "\n")
    import ray

    ray.get(controller.shutdown.remote())
    ray.shutdown()


if __name__ == "__main__":
    main()
