"""The fleet simulator's experiments: validation against this machine, then 16, 64 and 1,000 replicas.

Every experiment runs rayfleet's own policy objects (`rayfleet.policies`, built by name from a spec's `policies`
section, as the controller and the ingress build them) over simulated replicas (`control_plane/simulator`).

- `validation`: replay the requests of this machine's live bursty runs (arrival times and lengths saved by
  `bench_migration_downtime.py --bursty-only`, `benchmarks/results/bursty_trace_*.json`) on the CPU profile
  calibrated here, and compare p50/p99 TTFT and TPOT with what the live fleet measured.
- `scale`: Llumnix's setting (LLaMA-7B on A10s, `a10-llama-7b`): a BurstGPT-shaped trace (Gamma arrivals with
  CV 2, log-normal prompt and output lengths) at 0.6 req/s per replica, on 16, 64 and 1,000 replicas. Routers
  round robin, least load, power of two; migration `none` or `llumnix`; KV-aware admission on and off. At 1,000
  replicas the point is the policies' decision time per controller tick (goal: under 50 ms).
- `scaling`: diurnal traces with bursts (a day compressed into half an hour, one trace per seed) on a pool of
  2-64 replicas: the predictive scaler, provisioning for an upper quantile of its forecast and for its mean,
  against the reactive `tokens_in_flight`, each at several settings of its knob (a frontier of replica-hours
  against SLO violations), all draining by migration (`llumnix` drains): SLO violations and replica-hours per
  seed and over all seeds together. With `--scaling-days N --recurring-crowds K` a trace is N such days, K of
  each day's crowds coming at about the same time every day, and `--seasonal` adds the predictive scaler with
  a seasonal forecast (`season_s` = the day); days 2+ are also reported alone (the seasonal forecast's history).
- `pause`: the same 16-replica setting with `llumnix` pricing its moves at a pause other than the profile's
  (as a pool on new hardware does with the configured default): each price with the pause fixed, and learned
  from the fleet's own moves (`learn_pause`), over several trace seeds.
- `pd`: a prefill-heavy mix on 8 GPUs (`--pd-profile`, default `a100-llama-13b`): colocated (vLLM v1's chunked prefill, and without
  chunking as in DistServe's vLLM baseline) at each tensor-parallel degree, against prefill/decode disaggregation
  at every split of the GPUs and every degree per phase (DistServe's placement search, within one node); goodput
  = the highest request rate with at least 90% of requests within both SLOs (DistServe's definition), for
  several TPOT SLOs.

    python benchmarks/bench_simulator.py                  # everything (~20-30 min of one core); no lock needed
    python benchmarks/bench_simulator.py --only scale --quick

The plot needs matplotlib, which the project does not install: put it beside the venv
(`pip install --no-deps --target /tmp/mpl matplotlib kiwisolver cycler fonttools pyparsing contourpy python-dateutil`)
and run with `PYTHONPATH=/tmp/mpl`; without it the script says so and writes the tables only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from rayfleet.control_plane.simulator.fleet import FleetSimulator, SimConfig, SimPool
from rayfleet.control_plane.simulator.metrics import percentile
from rayfleet.control_plane.simulator.profiles import ReplicaProfile, profile, tensor_parallel
from rayfleet.control_plane.simulator.workload import TraceRequest, bursty, diurnal_with_bursts, replay_vllm_bench
from rayfleet.policies.base import PoolRole

sys.path.insert(0, str(Path(__file__).resolve().parent))

from doc_sections import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "simulator.json"
DOC = REPO / "docs" / "benchmarks-simulator.md"
SECTIONS = ("validation", "scale", "pause", "scaling", "pd")
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.0f} s] {message}", flush=True)


def llumnix(p: ReplicaProfile, **params) -> dict[str, Any]:
    return {"name": "llumnix", "params": {"costs": p.migration_costs().__dict__, **params}}


def simulate(pools: list[SimPool], trace: list[TraceRequest], policies: dict[str, Any],
             until_s: float | None = None, target: str | None = None):
    sim = FleetSimulator(SimConfig(pools=pools, policies=policies, target_pool=target))
    return sim.run(trace, until_s=until_s)


# ---------------------------------------------------------------- validation
LIVE_POLICIES = {"least_load": {"router": {"name": "least_load"}, "migration": {"name": "none"}, "tick_s": 0.5},
                 "llumnix": {"router": {"name": "least_load"}, "tick_s": 0.5}}


def validation(args) -> dict[str, Any]:
    p = profile("cpu-tiny-llama-b")
    rows = []
    for name, base in LIVE_POLICIES.items():
        for path in sorted(args.traces.glob(f"bursty_trace_{name}_*.json")):
            live = json.loads(path.read_text())
            trace = replay_vllm_bench(path)
            # The live llumnix contender's parameters, with this profile's costs.
            policies = {**base, "migration": llumnix(p, **live["migration_params"])} if name == "llumnix" else base
            s = simulate([SimPool("m", p, 2)], trace, policies).summary()
            measured = {"ttft_p50_ms": percentile(live["ttfts"], 50) * 1e3,
                        "ttft_p99_ms": percentile(live["ttfts"], 99) * 1e3,
                        "tpot_p50_ms": live["median_tpot_ms"], "tpot_p99_ms": live["p99_tpot_ms"]}
            row = {"contender": name, "trace": path.name, "requests": len(trace), "live": measured,
                   "sim": {k: s[k] for k in measured}, "sim_migrated": s["migrated"],
                   "live_migrations": live.get("migrations", {})}
            row["error"] = {k: s[k] / measured[k] - 1 for k in measured if measured[k]}
            rows.append(row)
            say(f"validation {path.name}: " + ", ".join(f"{k} live {measured[k]:.0f} sim {s[k]:.0f}" for k in measured))
    return {"profile": p.name, "rows": rows}


def validation_markdown(v: dict[str, Any]) -> str:
    if not v["rows"]:
        return "(no live traces found: run `bench_migration_downtime.py --bursty-only` first)"
    lines = ["| live run | requests | TTFT p50 ms live / sim | TTFT p99 ms live / sim | TPOT p50 ms live / sim | "
             "TPOT p99 ms live / sim | migrations live / sim |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in v["rows"]:
        cells = [f"{r['live'][k]:.0f} / {r['sim'][k]:.0f} ({r['error'][k]:+.0%})" for k in
                 ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")]
        live_mig = r["live_migrations"].get("migrated", 0) if r["live_migrations"] else 0
        lines.append(f"| {r['trace']} | {r['requests']} | " + " | ".join(cells)
                     + f" | {live_mig} / {r['sim_migrated']} |")
    errors = [abs(e) for r in v["rows"] for e in r["error"].values()]
    lines.append("")
    lines.append(f"Mean absolute error over all cells: {statistics.mean(errors):.0%}; largest {max(errors):.0%}.")
    return "\n".join(lines)


# ---------------------------------------------------------------- scale
SCALE_POLICIES = [("round_robin", "none", "queue_limit"), ("round_robin", "llumnix", "queue_limit"),
                  ("least_load", "none", "queue_limit"), ("least_load", "llumnix", "queue_limit"),
                  ("power_of_two", "none", "queue_limit"), ("power_of_two", "llumnix", "queue_limit"),
                  ("least_load", "llumnix", "kv_aware"), ("least_load", "none", "kv_aware")]


def scale(args) -> dict[str, Any]:
    p = profile("a10-llama-7b")
    rows = []
    for replicas in args.replicas:
        rate = args.rate_per_replica * replicas
        big = replicas >= 500
        duration = args.big_duration_s if big else args.duration_s
        trace = bursty(int(rate * duration), rate=rate, shape=0.25, seed=args.seed)
        combos = [c for c in SCALE_POLICIES if c[0] == "power_of_two"] if big else SCALE_POLICIES
        for router, migration, admission in combos:
            began = time.monotonic()
            policies = {"router": {"name": router}, "admission": {"name": admission},
                        "migration": llumnix(p) if migration == "llumnix" else {"name": "none"}}
            result = simulate([SimPool("m", p, replicas)], trace, policies, until_s=duration if big else None)
            s = result.summary()
            rows.append({"replicas": replicas, "router": router, "migration": migration, "admission": admission,
                         "rate": rate, "requests": len(trace), "wall_s": time.monotonic() - began, **s})
            say(f"scale {replicas} {router}+{migration}+{admission}: TTFT p50 {s['ttft_p50_ms']:.0f} ms p99 "
                f"{s['ttft_p99_ms']:.0f} ms, TPOT p99 {s['tpot_p99_ms']:.0f} ms, preemptions {s['preemptions']}, "
                f"migrated {s['migrated']}, tick p50/max {s['tick_decision_p50_ms']:.1f}/"
                f"{s['tick_decision_max_ms']:.1f} ms ({time.monotonic() - began:.0f} s)")
    return {"profile": p.name, "rate_per_replica": args.rate_per_replica, "rows": rows}


def scale_markdown(sc: dict[str, Any]) -> str:
    lines = ["| replicas | router | migration | admission | TTFT p50 ms | TTFT p99 ms | TPOT p99 ms | rejected | "
             "preemptions | migrated | tick decision p50 / max ms | routing per request us |",
             "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sc["rows"]:
        lines.append(f"| {r['replicas']} | {r['router']} | {r['migration']} | {r['admission']} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['tpot_p99_ms']:.0f} | {r['failed']} | "
                     f"{r['preemptions']} | {r['migrated']} | {r['tick_decision_p50_ms']:.1f} / "
                     f"{r['tick_decision_max_ms']:.1f} | {r['request_decision_mean_us']:.0f} |")
    lines.append("")
    for replicas in sorted({r["replicas"] for r in sc["rows"]}):
        mine = {(r["router"], r["migration"], r["admission"]): r for r in sc["rows"] if r["replicas"] == replicas}
        rr = mine.get(("round_robin", "none", "queue_limit"))
        for label, key in (("least_load + llumnix", ("least_load", "llumnix", "queue_limit")),
                           ("round_robin + llumnix", ("round_robin", "llumnix", "queue_limit"))):
            if rr and key in mine:
                lines.append(f"- {replicas} replicas: p99 TTFT round robin / {label} = "
                             f"{rr['ttft_p99_ms'] / mine[key]['ttft_p99_ms']:.1f}x (goal >= 3x; Llumnix: 12.1x)")
        worst = max(r["tick_decision_max_ms"] for r in mine.values())
        lines.append(f"- {replicas} replicas: largest decision time of a tick {worst:.1f} ms (goal < 50 ms)")
    return "\n".join(lines)


# ---------------------------------------------------------------- pause
def pause(args) -> dict[str, Any]:
    p = profile("a10-llama-7b")
    replicas = min(args.replicas)
    rate = args.rate_per_replica * replicas
    rows = []
    for seed in args.pause_seeds:
        trace = bursty(int(rate * args.duration_s), rate=rate, shape=0.25, seed=seed)
        for priced in (p.migration.pause_s, *args.pause_prices):
            for learn in (False, True):
                policy = llumnix(p, learn_pause=learn)
                policy["params"]["costs"]["pause_s"] = priced
                result = simulate([SimPool("m", p, replicas)], trace,
                                  {"router": {"name": "least_load"}, "admission": {"name": "queue_limit"},
                                   "migration": policy})
                s = result.summary()
                rows.append({"seed": seed, "priced_s": priced, "learn": learn, **s})
                say(f"pause seed {seed}, priced {priced:g} s, {'learned' if learn else 'fixed'}: TTFT p99 "
                    f"{s['ttft_p99_ms']:.0f} ms, migrated {s['migrated']}")
    return {"profile": p.name, "replicas": replicas, "true_pause_s": p.migration.pause_s, "rows": rows}


def pause_markdown(pa: dict[str, Any]) -> str:
    lines = [f"{pa['replicas']} replicas of `{pa['profile']}` (moves really pause {pa['true_pause_s'] * 1e3:.0f} ms), "
             "least_load + llumnix; mean over seeds "
             f"{', '.join(str(s) for s in sorted({r['seed'] for r in pa['rows']}))}:", "",
             "| pause priced at | TTFT p99 ms, fixed | TTFT p99 ms, learned | TPOT p99 ms, fixed / learned | "
             "moves, fixed / learned |", "| ---: | ---: | ---: | ---: | ---: |"]
    for priced in sorted({r["priced_s"] for r in pa["rows"]}):
        mean = {learn: {k: statistics.mean(r[k] for r in pa["rows"] if r["priced_s"] == priced and r["learn"] == learn)
                        for k in ("ttft_p99_ms", "tpot_p99_ms", "migrated")} for learn in (False, True)}
        lines.append(f"| {priced * 1e3:.0f} ms | {mean[False]['ttft_p99_ms']:.0f} | {mean[True]['ttft_p99_ms']:.0f} | "
                     f"{mean[False]['tpot_p99_ms']:.0f} / {mean[True]['tpot_p99_ms']:.0f} | "
                     f"{mean[False]['migrated']:.0f} / {mean[True]['migrated']:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- scaling
def predictive_contender(quantile: float, seasonal: bool = False) -> str:
    return f"predictive (quantile {quantile:g}{', seasonal' if seasonal else ''})"


def scaling_settings(args) -> list[tuple[str, dict[str, float]]]:
    """(contender, params): each scaler's knob trades replica-hours for SLO violations; the predictive scaler
    once per forecast quantile it provisions for (`--predictive QUANTILE:UTILIZATION,...`), and with a seasonal
    forecast of one day (`--seasonal QUANTILE:UTILIZATION,...`)."""
    settings = [("tokens_in_flight", {"target_tokens_per_replica": t}) for t in args.reactive_targets]
    for seasonal, contenders in ((False, args.predictive), (True, args.seasonal)):
        for quantile, utilizations in contenders:
            season = {"season_s": args.day_s} if seasonal else {}
            settings += [(predictive_contender(quantile, seasonal),
                          {"quantile": quantile, "target_utilization": u, **season}) for u in utilizations]
    return settings


def scaling_trace(args, seed: int) -> list[TraceRequest]:
    """`--scaling-days` days of `--crowds-per-day` flash crowds each, `--recurring-crowds` of which come at about
    the same time every day and the others at random times (one day without recurring crowds: the original
    trace, request for request)."""
    random_crowds = (args.crowds_per_day - args.recurring_crowds) * args.scaling_days
    return diurnal_with_bursts(args.day_s * args.scaling_days, base_rate=args.day_rate, period_s=args.day_s,
                               bursts=random_crowds, recurring=args.recurring_crowds, seed=seed)


def after_first_day(result, day_s: float, slo_ttft_s: float, slo_tpot_s: float) -> dict[str, float]:
    """SLO violations among requests arriving after the first day, and replica-hours after it (from the
    replica count sampled each tick): the days a seasonal forecast has history for."""
    later = [r for r in result.records if r.arrival_s >= day_s]
    met = sum(1 for r in later if r.ttft_s is not None and r.ttft_s <= slo_ttft_s and r.tpot_s <= slo_tpot_s)
    samples = result.replica_samples
    seconds = sum(a[1] * (b[0] - a[0]) for a, b in zip(samples, samples[1:]) if a[0] >= day_s)
    return {"later_slo_violations": len(later) - met, "later_replica_hours": seconds / 3600}


def scaling_profile(args):
    p = profile("a10-llama-7b")
    return p if args.startup_s is None else dataclasses.replace(p, startup_s=args.startup_s)


def scaling_run(job: tuple[int, str, dict[str, float], argparse.Namespace]) -> dict[str, Any]:
    """One scaler setting over one seed's trace (a worker process: the runs are independent)."""
    seed, name, knobs, args = job
    p = scaling_profile(args)
    trace = scaling_trace(args, seed)
    pool = SimPool("m", p, 4, min_replicas=2, max_replicas=64)
    params: dict[str, Any] = dict(knobs)
    if name.startswith("predictive"):
        params["startup_s"] = p.startup_s
    result = simulate([pool], trace, {"router": {"name": "least_load"},
                                      "scaler": {"name": "predictive" if name.startswith("predictive") else name,
                                                 "params": params},
                                      "migration": llumnix(p, triggers=["drain"])})
    s = result.summary(args.slo_ttft_s, args.slo_tpot_s)
    if args.scaling_days > 1:
        s.update(after_first_day(result, args.day_s, args.slo_ttft_s, args.slo_tpot_s))
    shown_knobs = {k: v for k, v in knobs.items() if k not in ("quantile", "season_s")}  # the name carries them
    return {"scaler": name, **knobs, "setting": ", ".join(f"{k}={v:g}" for k, v in shown_knobs.items()),
            "seed": seed, "requests": len(trace), **s}


def scaling(args) -> dict[str, Any]:
    """Each scaler at several settings, over several seeds' traces (one trace's frontier is not monotonic: a
    flash crowd that lands on a lull decides it); the comparison is between frontiers at equal replica-hours,
    seed by seed. Two worker processes: the runs are independent and each takes one core."""
    from multiprocessing import get_context

    jobs = [(seed, *setting, args) for seed in args.scaling_seeds for setting in scaling_settings(args)]
    rows = []
    with get_context("spawn").Pool(args.workers) as pool:
        for row in pool.imap(scaling_run, jobs):
            rows.append(row)
            say(f"scaling seed {row['seed']} {row['scaler']} {row['setting']}: SLO violations "
                f"{row['slo_violations']} of {row['requests']}, replica-hours {row['replica_hours']:.2f} "
                f"({len(rows)}/{len(jobs)})")
    return {"profile": "a10-llama-7b", "startup_s": scaling_profile(args).startup_s,
            "slo_ttft_s": args.slo_ttft_s, "slo_tpot_s": args.slo_tpot_s, "day_s": args.day_s,
            "base_rate": args.day_rate, "days": args.scaling_days, "crowds_per_day": args.crowds_per_day,
            "recurring_crowds": args.recurring_crowds, "seeds": list(args.scaling_seeds), "rows": rows}


def fewest_within(points: list[tuple[float, float]], hours: float) -> float | None:
    """The fewest violations any reactive setting had at no more than `hours` replica-hours (None: none did)."""
    within = [violations for spent, violations in points if spent <= hours]
    return min(within) if within else None


def scaling_verdicts(sc: dict[str, Any], scaler: str, setting: str) -> list[bool | None]:
    """Per seed: fewer violations than the best reactive setting at no more replica-hours (None: no reactive
    setting used as few replica-hours)."""
    verdicts = []
    for seed in sc["seeds"]:
        mine = next(r for r in sc["rows"] if r["seed"] == seed and r["scaler"] == scaler and r["setting"] == setting)
        reactive = [(r["replica_hours"], r["slo_violations"]) for r in sc["rows"]
                    if r["seed"] == seed and r["scaler"] == "tokens_in_flight"]
        best = fewest_within(reactive, mine["replica_hours"])
        verdicts.append(None if best is None else mine["slo_violations"] < best)
    return verdicts


def scaling_markdown(sc: dict[str, Any]) -> str:
    seeds = sc["seeds"]
    days = sc.get("days", 1)
    trace = (f"{sc['day_s']:g} s of arrivals per trace" if days == 1 else
             f"{days} days of {sc['day_s']:g} s per trace, {sc['crowds_per_day']} flash crowds a day of which "
             f"{sc['recurring_crowds']} at about the same time each day")
    lines = [f"SLO: TTFT <= {sc['slo_ttft_s']:g} s and TPOT <= {sc['slo_tpot_s']:g} s; "
             f"{trace}, replicas ready {sc.get('startup_s', 60.0):g} s after "
             f"their start, seeds {', '.join(map(str, seeds))} "
             f"({', '.join(str(next(r['requests'] for r in sc['rows'] if r['seed'] == s)) for s in seeds)} requests). "
             "Each cell: SLO violations / replica-hours.", "",
             "| scaler | setting | " + " | ".join(f"seed {s}" for s in seeds) + " | violations, sum | replica-hours, sum |",
             "| --- | --- | " + " | ".join("---:" for _ in seeds) + " | ---: | ---: |"]
    settings = list(dict.fromkeys((r["scaler"], r["setting"]) for r in sc["rows"]))
    for scaler, setting in settings:
        mine = {r["seed"]: r for r in sc["rows"] if r["scaler"] == scaler and r["setting"] == setting}
        cells = [f"{mine[s]['slo_violations']} / {mine[s]['replica_hours']:.2f}" for s in seeds]
        lines.append(f"| {scaler} | {setting} | " + " | ".join(cells) +
                     f" | {sum(m['slo_violations'] for m in mine.values())} | "
                     f"{sum(m['replica_hours'] for m in mine.values()):.2f} |")
    lines.append("")
    for scaler, setting in settings:
        if scaler == "tokens_in_flight":
            continue
        verdicts = scaling_verdicts(sc, scaler, setting)
        judged = [v for v in verdicts if v is not None]
        lines.append(f"- {scaler} {setting}: fewer violations than the best reactive setting at no more "
                     f"replica-hours in {sum(judged)} of {len(judged)} seeds"
                     + (f" ({len(verdicts) - len(judged)} with fewer replica-hours than any reactive setting)"
                        if len(judged) < len(verdicts) else "") + "; " + summed_verdict(sc, scaler, setting))
    if days > 1:
        lines += later_days_markdown(sc, settings)
    return "\n".join(lines)


def later_days_markdown(sc: dict[str, Any], settings: list[tuple[str, str]]) -> list[str]:
    """Days 2+ alone, summed over the seeds: the days the seasonal forecast has a past day to learn from."""
    lines = ["", "Days 2+ only (arrivals after the first day; replica-hours from the replica count each tick), "
             "summed over the seeds:", "", "| scaler | setting | violations, sum | replica-hours, sum |",
             "| --- | --- | ---: | ---: |"]
    for scaler, setting in settings:
        mine = [r for r in sc["rows"] if r["scaler"] == scaler and r["setting"] == setting]
        lines.append(f"| {scaler} | {setting} | {sum(r['later_slo_violations'] for r in mine)} | "
                     f"{sum(r['later_replica_hours'] for r in mine):.2f} |")
    lines.append("")
    lines += [f"- days 2+, {scaler} {setting}: " + summed_verdict(sc, scaler, setting, later=True)
              for scaler, setting in settings if scaler != "tokens_in_flight"]
    return lines


def summed_verdict(sc: dict[str, Any], scaler: str, setting: str, later: bool = False) -> str:
    """All seeds' traces taken as one (`later`: their days 2+ only): this setting's totals against the reactive
    settings' totals."""
    prefix = "later_" if later else ""

    def totals(name: str, knob_setting: str) -> tuple[float, int]:
        rows = [r for r in sc["rows"] if r["scaler"] == name and r["setting"] == knob_setting]
        return sum(r[f"{prefix}replica_hours"] for r in rows), sum(r[f"{prefix}slo_violations"] for r in rows)

    hours, violations = totals(scaler, setting)
    reactive = [totals("tokens_in_flight", s) for s in dict.fromkeys(
        r["setting"] for r in sc["rows"] if r["scaler"] == "tokens_in_flight")]
    best = fewest_within(reactive, hours)
    if best is None:
        return f"all seeds together {violations} at {hours:.1f} replica-hours, fewer than any reactive setting"
    return (f"all seeds together {violations} at {hours:.1f} replica-hours against {best} for the best reactive "
            f"setting at no more ({'fewer' if violations < best else 'not fewer'})")


# ---------------------------------------------------------------- prefill/decode
def prefill_heavy(rate: float, count: int, seed: int) -> list[TraceRequest]:
    return bursty(count, rate=rate, shape=1.0, prompt_median=1500, prompt_sigma=0.6, prompt_range=(128, 8000),
                  output_median=64, output_sigma=0.7, output_range=(4, 512), exact_max_tokens=True, seed=seed)


def goodput(run: Callable[[float], float], low: float = 0.5, high: float = 40.0, target: float = 0.9) -> float:
    """The highest rate whose SLO attainment is >= target: doubling, then bisection (DistServe's goodput)."""
    rate = low
    if run(rate) < target:
        return 0.0
    while rate < high and run(rate * 2) >= target:
        rate *= 2
    lo, hi = rate, rate * 2
    for _ in range(5):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if run(mid) >= target else (lo, mid)
    return lo


@dataclasses.dataclass(frozen=True)
class PdSetup:
    """One way to use the GPUs: a pool of (replicas, tensor-parallel degree), and a prefill pool if disaggregated."""

    decode: tuple[int, int]
    prefill: tuple[int, int] | None = None
    chunked: bool = True

    @property
    def name(self) -> str:
        (n, tp) = self.decode
        if self.prefill is None:
            return f"colocated {n}x TP{tp}" + ("" if self.chunked else ", no chunking")
        return f"P {self.prefill[0]}x TP{self.prefill[1]} / D {n}x TP{tp}"


def pd_setups(gpus: int, degrees: list[int]) -> list[PdSetup]:
    """Colocated at each degree that divides the GPUs (chunked prefill, and without as DistServe's vLLM baseline
    ran), and every split of the GPUs into a prefill and a decode pool with a degree per phase (DistServe's search)."""
    fits = [tp for tp in degrees if gpus % tp == 0]
    setups = [PdSetup((gpus // tp, tp), chunked=chunked) for chunked in (True, False) for tp in fits]
    for tp_p in degrees:
        for n_p in range(1, gpus // tp_p + 1):
            left = gpus - n_p * tp_p
            setups += [PdSetup((left // tp_d, tp_d), (n_p, tp_p))
                       for tp_d in degrees if left >= tp_d and left % tp_d == 0]
    return setups


def pd_pools(setup: PdSetup, base: ReplicaProfile) -> tuple[list[SimPool], dict[str, Any]]:
    n, tp = setup.decode
    decode = tensor_parallel(base, tp)
    if setup.prefill is None:
        decode = decode if setup.chunked else decode.scaled(max_batched_tokens=8192)
        return [SimPool("d", decode, n)], {"router": {"name": "least_load"}}
    n_p, tp_p = setup.prefill
    return ([SimPool("pre", tensor_parallel(base, tp_p), n_p, role=PoolRole.PREFILL),
             SimPool("d", decode, n, role=PoolRole.DECODE, prefill_pool="pre")], {"router": {"name": "prefill_decode"}})


def pd(args) -> dict[str, Any]:
    base = profile(args.pd_profile)
    setups = pd_setups(args.pd_gpus, args.pd_tp_degrees)
    rows = []
    for tpot in args.pd_tpot_slos:
        for setup in setups:
            pools, policies = pd_pools(setup, base)

            def attainment(rate: float, pools=pools, policies=policies) -> float:
                trace = prefill_heavy(rate, args.pd_requests, args.seed)
                return simulate(pools, trace, policies, target="d").slo_attainment(args.pd_ttft_s, tpot)

            rate = goodput(attainment)
            rows.append({"tpot_slo_s": tpot, "setup": setup.name, "disaggregated": setup.prefill is not None,
                         "chunked": setup.chunked, "goodput_rps": rate})
            say(f"pd TPOT <= {tpot * 1e3:.0f} ms, {setup.name}: goodput {rate:.2f} req/s")
    return {"profile": base.name, "gpus": args.pd_gpus, "ttft_slo_s": args.pd_ttft_s, "requests": args.pd_requests,
            "rows": rows}


def pd_best(rows: list[dict[str, Any]], slo: float, keep: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    return max((r for r in rows if r["tpot_slo_s"] == slo and keep(r)), key=lambda r: r["goodput_rps"])


PD_BASELINES = {"colocated 8x TP1": lambda r: r["setup"] == "colocated 8x TP1",
                "best colocated, chunked": lambda r: not r["disaggregated"] and r["chunked"],
                "best colocated, any": lambda r: not r["disaggregated"]}


def pd_markdown(r: dict[str, Any]) -> str:
    setups = list(dict.fromkeys(x["setup"] for x in r["rows"]))
    slos = sorted({x["tpot_slo_s"] for x in r["rows"]})
    head = " | ".join(f"TPOT <= {slo * 1e3:.0f} ms" for slo in slos)
    lines = [f"Goodput: req/s on {r.get('gpus', 8)} GPUs of `{r.get('profile', 'a100-llama-13b')}` at >= 90% of requests "
             f"within TTFT <= {r['ttft_slo_s']:g} s and the TPOT SLO. `n x TPk`: n replicas of k GPUs each.", "",
             f"| setup | {head} |", "| --- |" + " ---: |" * len(slos)]
    for setup in setups:
        mine = {x["tpot_slo_s"]: x["goodput_rps"] for x in r["rows"] if x["setup"] == setup}
        lines.append(f"| {setup} | " + " | ".join(f"{mine[slo]:.2f}" for slo in slos) + " |")
    lines += ["", "Best disaggregated setup against each colocated baseline:", "",
              f"| | {head} |", "| --- |" + " --- |" * len(slos)]
    best = {slo: pd_best(r["rows"], slo, lambda x: x["disaggregated"]) for slo in slos}
    lines.append("| best disaggregated | " + " | ".join(
        f"{best[slo]['goodput_rps']:.2f} ({best[slo]['setup']})" for slo in slos) + " |")
    for label, keep in PD_BASELINES.items():
        cells = []
        for slo in slos:
            baseline = pd_best(r["rows"], slo, keep)
            ratio = f"{best[slo]['goodput_rps'] / baseline['goodput_rps']:.2f}x" if baseline["goodput_rps"] else "inf"
            cells.append(f"**{ratio}** over {baseline['goodput_rps']:.2f}" +
                         ("" if label == "colocated 8x TP1" else f" ({baseline['setup'].removeprefix('colocated ')})"))
        lines.append(f"| vs {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- plot
def plot(results: dict[str, Any], path: Path) -> str:
    """One figure, a panel per experiment present; matplotlib is optional (not a project dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    panels = [part for part in ("scale", "scaling", "pd") if part in results]
    if not panels:
        return "nothing to plot"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), dpi=110, squeeze=False)
    for ax, part in zip(axes[0], panels):
        rows = results[part]["rows"]
        if part == "scale":
            for replicas, marker in zip(sorted({r["replicas"] for r in rows if r["replicas"] < 500}), "os^"):
                mine = [r for r in rows if r["replicas"] == replicas]
                labels = [f"{r['router'].replace('_', ' ')}\n{r['migration']}/{r['admission'][:5]}" for r in mine]
                ax.plot(range(len(mine)), [r["ttft_p99_ms"] / 1e3 for r in mine], marker=marker, ls="",
                        label=f"{replicas} replicas")
                ax.set_xticks(range(len(mine)), labels, fontsize=6, rotation=60)
            ax.set_yscale("log")
            ax.set_ylabel("p99 TTFT, s (log)")
            ax.set_title("A10 LLaMA-7B, bursty BurstGPT-shaped trace", fontsize=9)
        elif part == "scaling":
            for scaler, marker in zip(dict.fromkeys(r["scaler"] for r in rows), ("o-", "s-", "^--", "d-.")):
                settings = list(dict.fromkeys(r["setting"] for r in rows if r["scaler"] == scaler))
                means = sorted((statistics.mean(r["replica_hours"] for r in rows if r["setting"] == setting
                                                and r["scaler"] == scaler),
                                statistics.mean(r["slo_violations"] for r in rows if r["setting"] == setting
                                                and r["scaler"] == scaler)) for setting in settings)
                ax.plot([m[0] for m in means], [m[1] for m in means], marker, label=scaler)
            ax.set_xlabel("replica-hours, mean over seeds")
            ax.set_ylabel("SLO violations, mean over seeds")
            ax.set_title("diurnal + flash crowds: scaler frontiers", fontsize=9)
        else:
            slos = sorted({r["tpot_slo_s"] for r in rows})
            curves = {**PD_BASELINES, "best disaggregated": lambda r: r["disaggregated"]}
            for (label, keep), marker in zip(curves.items(), ("o:", "o-", "^--", "s-")):
                ax.plot([x * 1e3 for x in slos], [pd_best(rows, x, keep)["goodput_rps"] for x in slos], marker,
                        label=label)
            ax.set_xlabel("TPOT SLO, ms")
            ax.set_ylabel(f"goodput, req/s on {results[part].get('gpus', 8)} GPUs")
            ax.set_title(f"{results[part].get('profile', 'a100-llama-13b')}, prefill-heavy mix", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return f"plot written to {path}"


# ---------------------------------------------------------------- driver
RUNNERS = {"validation": (validation, validation_markdown), "scale": (scale, scale_markdown),
           "pause": (pause, pause_markdown), "scaling": (scaling, scaling_markdown), "pd": (pd, pd_markdown)}


def shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def quantile_and_utilizations(text: str) -> tuple[float, list[float]]:
    """`0.5:0.35,0.4` -> (0.5, [0.35, 0.4])."""
    try:
        quantile, utilizations = text.split(":")
        return float(quantile), [float(u) for u in utilizations.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected QUANTILE:UTILIZATION[,UTILIZATION...], "
                                         "e.g. 0.5:0.35,0.4") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="smaller traces (minutes instead of tens of minutes)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--traces", type=Path, default=REPO / "benchmarks" / "results", help="live bursty traces")
    parser.add_argument("--replicas", type=int, nargs="+", default=[16, 64, 1000])
    parser.add_argument("--rate-per-replica", type=float, default=0.6, help="scale: mean req/s per replica")
    parser.add_argument("--duration-s", type=float, default=300.0, help="scale: seconds of arrivals (16, 64)")
    parser.add_argument("--big-duration-s", type=float, default=60.0, help="scale: seconds simulated at 1,000")
    parser.add_argument("--pause-prices", type=float, nargs="+", default=[0.15, 0.5, 2.0, 5.0],
                        help="pause: the mispriced pauses, seconds (the profile's own is always run)")
    parser.add_argument("--pause-seeds", type=int, nargs="+", default=[1, 2, 3], help="pause: one trace per seed")
    parser.add_argument("--day-s", type=float, default=1800.0, help="scaling: the compressed day")
    parser.add_argument("--reactive-targets", type=int, nargs="+", default=[3500, 4000, 4500, 5000])
    parser.add_argument("--predictive", type=quantile_and_utilizations, nargs="*",
                        default=[(0.9, [0.5, 0.6]), (0.5, [0.35, 0.4, 0.45])], metavar="QUANTILE:UTILIZATION,...",
                        help="scaling: the predictive scaler at each forecast quantile, at these target utilizations "
                             "(default: 0.9:0.5,0.6 0.5:0.35,0.4,0.45; the flag alone: none)")
    parser.add_argument("--seasonal", type=quantile_and_utilizations, nargs="*", default=[],
                        metavar="QUANTILE:UTILIZATION,...",
                        help="scaling: the predictive scaler with a seasonal forecast of one day (season_s = "
                             "--day-s), at each quantile and target utilization (default: none)")
    parser.add_argument("--scaling-seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5],
                        help="scaling: one diurnal trace per seed")
    parser.add_argument("--scaling-days", type=int, default=1, help="scaling: days per trace, the same shape each")
    parser.add_argument("--crowds-per-day", type=int, default=3, help="scaling: flash crowds a day")
    parser.add_argument("--recurring-crowds", type=int, default=0,
                        help="scaling: of a day's crowds, those that come at about the same time every day "
                             "(+-60 s)")
    parser.add_argument("--workers", type=int, default=2, help="scaling: processes running settings at once")
    parser.add_argument("--day-rate", type=float, default=6.0, help="scaling: mean req/s over the day")
    parser.add_argument("--startup-s", type=float, default=None,
                        help="scaling: seconds a new replica takes to serve (default: the A10 profile's 60 s; a "
                             "GPU pod that pulls its image and weights takes minutes)")
    parser.add_argument("--slo-ttft-s", type=float, default=2.0)
    parser.add_argument("--slo-tpot-s", type=float, default=0.1)
    parser.add_argument("--pd-ttft-s", type=float, default=1.0)
    parser.add_argument("--pd-tpot-slos", type=float, nargs="+", default=[0.03, 0.05, 0.1])
    parser.add_argument("--pd-requests", type=int, default=1500)
    parser.add_argument("--pd-gpus", type=int, default=8, help="GPUs each prefill/decode setup gets")
    parser.add_argument("--pd-profile", default="a100-llama-13b",
                        help="pd: the one-GPU profile the setups shard (a roofline or measured GPU profile; default "
                             "a100-llama-13b, DistServe's class of setup; h100-llama-13b is measured on an H100)")
    parser.add_argument("--pd-tp-degrees", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="tensor-parallel degrees a pool may use (a pool of one phase: those that leave room "
                             "for the other)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration_s, args.big_duration_s, args.day_s, args.pd_requests = 120.0, 20.0, 1200.0, 600
        args.pd_tpot_slos = [0.03, 0.1]
        args.scaling_seeds = args.scaling_seeds[:2]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_before": os.getloadavg(),
            "command": "python benchmarks/bench_simulator.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    for part in args.only.split(","):
        run, markdown = RUNNERS[part]
        began = time.monotonic()
        results[part] = {**run(args), "meta": {**meta, "wall_s": time.monotonic() - began}}
        table = markdown(results[part])
        print("\n" + table + "\n", flush=True)
        if not args.no_docs:
            m = results[part]["meta"]
            header = (f"Generated by `{m['command']}` on {m['date']} ({m['machine']}; load average before "
                      f"{m['load_before'][0]:.1f}; {m['wall_s']:.0f} s). Raw numbers: `{shown(args.out)}`.\n\n")
            write_section(args.doc, f"bench_simulator:{part}", header + table)
            # After each part: a long run cut short keeps what it measured.
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1, default=str))
    if not args.no_docs:
        say(plot(results, args.doc.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
