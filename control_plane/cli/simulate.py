"""`rayfleet simulate`: a fleet's policies over simulated replicas, from a spec or from flags.

The policies are the fleet's own (`rayfleet.policies`, built by name as the controller builds them); the
replicas follow a calibrated profile (`control_plane/simulator/profiles.py`). Runs on one core, no Ray.
"""

from __future__ import annotations

import argparse
import json

PROFILE_HELP = ("replica profile: cpu-tiny-llama-b (calibrated here), a10-llama-7b, a100-llama-13b (roofline), "
                "h100-llama-13b, h100-llama3-8b (measured on an H100)")


def add_parser(sub) -> None:
    simulate = sub.add_parser("simulate", help="run policies over simulated replicas (no Ray, no engines)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    simulate.add_argument("--spec", help="take the `policies` section of this fleet spec (flags below override)")
    simulate.add_argument("--profile", default="a10-llama-7b", help=PROFILE_HELP)
    simulate.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                          help="shard each replica over N GPUs of one node (GPU profiles: a100-llama-13b, h100-*)")
    simulate.add_argument("--replicas", type=int, default=16, help="replicas at the start")
    simulate.add_argument("--max-replicas", type=int, help="the scaler's upper bound (default: --replicas)")
    simulate.add_argument("--min-replicas", type=int, help="the scaler's lower bound (default: --replicas)")
    simulate.add_argument("--router", help="router policy (e.g. least_load, power_of_two, round_robin)")
    simulate.add_argument("--migration", help="migration policy (none, llumnix)")
    simulate.add_argument("--admission", help="admission policy (queue_limit, kv_aware)")
    simulate.add_argument("--scaler", help="scaler policy (static, tokens_in_flight, predictive)")
    simulate.add_argument("--workload", choices=["bursty", "diurnal", "replay"], default="bursty")
    simulate.add_argument("--trace", help="with --workload replay: a `vllm bench serve` result with per-request lists")
    simulate.add_argument("--rate", type=float, default=8.0, help="mean arrivals per second")
    simulate.add_argument("--burstiness", type=float, default=0.25, help="Gamma shape of the gaps (1 = Poisson)")
    simulate.add_argument("--duration-s", type=float, default=300.0, help="seconds of arrivals")
    simulate.add_argument("--slo-ttft-s", type=float, default=2.0)
    simulate.add_argument("--slo-tpot-s", type=float, default=0.1)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--json", action="store_true", help="print the summary as JSON")
    simulate.set_defaults(func=run)


def replica_profile(args):
    from rayfleet.control_plane.simulator.profiles import profile, tensor_parallel

    return tensor_parallel(profile(args.profile), args.tensor_parallel)


def policies_of(args) -> dict:
    from rayfleet.control_plane.spec import load_spec

    policies = load_spec(args.spec).policies.model_dump() if args.spec else {}
    for kind in ("router", "admission", "scaler", "migration"):
        name = getattr(args, kind)
        if name is not None:
            policies[kind] = {"name": name, "params": {}}
    migration = policies.get("migration", {})
    if migration.get("name") == "llumnix" and "costs" not in migration.get("params", {}):
        # Price moves with the profile's numbers, as a fleet on that hardware would be configured.
        migration["params"] = {**migration.get("params", {}), "costs": replica_profile(args).migration_costs().__dict__}
    return policies


def run(args) -> None:
    from rayfleet.control_plane.simulator.fleet import FleetSimulator, SimConfig, SimPool
    from rayfleet.control_plane.simulator.workload import bursty, diurnal_with_bursts, replay_vllm_bench

    if args.workload == "replay":
        if not args.trace:
            raise SystemExit("--workload replay needs --trace FILE")
        trace = replay_vllm_bench(args.trace)
    elif args.workload == "diurnal":
        trace = diurnal_with_bursts(args.duration_s, base_rate=args.rate, period_s=args.duration_s, seed=args.seed)
    else:
        trace = bursty(int(args.rate * args.duration_s), rate=args.rate, shape=args.burstiness, seed=args.seed)
    replica = replica_profile(args)
    pool = SimPool("fleet", replica, args.replicas, min_replicas=args.min_replicas,
                   max_replicas=args.max_replicas or args.replicas)
    result = FleetSimulator(SimConfig(pools=[pool], policies=policies_of(args))).run(trace)
    summary = result.summary(args.slo_ttft_s, args.slo_tpot_s)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{len(trace)} requests on {args.replicas} x {replica.name} ({replica.notes})")
    for key, value in summary.items():
        print(f"  {key:26s} {value:,.2f}" if isinstance(value, float) else f"  {key:26s} {value}")
