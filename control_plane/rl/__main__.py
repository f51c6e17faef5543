"""Run an RL job on a fleet's rollout pool (GRPO, streaming rollouts, staleness bound k, versioned weight sync).

    rayfleet up examples/rl/fleet.yaml                       # a fleet with a rollout pool (`rollout: true`)
    ray job submit --working-dir . -- python -m rayfleet.control_plane.rl --config examples/rl/products.yaml
    rayfleet status                                          # the run's progress beside the fleet's

With `--fleet SPEC` and no fleet running on the cluster, the job starts the fleet's controller itself (what
the Helm chart's RayJob does on its own cluster). Results (per-step records, held-out reward curve, where the
time went) go to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rayfleet.control_plane.rl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="RL config YAML (see examples/rl/)")
    parser.add_argument("--fleet", help="fleet spec to start when no fleet runs on the cluster")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, as `ray job submit` sets)")
    parser.add_argument("--steps", type=int, help="override the config's steps")
    parser.add_argument("--groups-per-step", type=positive_int, help="override the config's groups_per_step "
                        "(prompts per training step; a smaller run to try a config out)")
    parser.add_argument("--eval-count", type=positive_int, help="override eval.count: held-out instances per "
                        "evaluated snapshot")
    parser.add_argument("--eval-samples", type=non_negative_int, help="override eval.samples: sampled completions "
                        "per held-out instance besides the greedy one (0: greedy only)")
    parser.add_argument("--staleness-bound", "-k", type=int, help="override the config's staleness_bound")
    parser.add_argument("--sync", help="override weight_sync.policy (eager, deferred)")
    parser.add_argument("--interrupt", choices=["keep", "abort"], help="override weight_sync.interrupt")
    parser.add_argument("--promote-to", metavar="POOL", help="override promote_to: the serving pool that gets the "
                        "final weights (drain by migration, then reload, replica by replica)")
    parser.add_argument("--checkpoint-dir", help="override checkpoint.dir (a run with checkpoints there resumes)")
    parser.add_argument("--out", type=Path, help="folder for the run's JSON result")
    parser.add_argument("--no-progress", action="store_true", help="log lines only, no progress bar")
    return parser


def positive_int(text: str) -> int:
    return int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return int_at_least(text, 0)


def int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: '{text}'") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, not {value}")
    return value


def configure(args):
    from rayfleet.actors.tasks import TRAINED_MODELS_DIR
    from rayfleet.control_plane.rl.config import RLConfigError, load_rl_config

    os.environ.setdefault("RAYFLEET_TASK_MODELS", str(TRAINED_MODELS_DIR))  # the configs' ${RAYFLEET_TASK_MODELS}
    try:
        config = load_rl_config(args.config)
    except RLConfigError as error:
        raise SystemExit(str(error)) from None
    updates = {}
    if args.steps is not None:
        updates["steps"] = args.steps
    if args.groups_per_step is not None:
        updates["groups_per_step"] = args.groups_per_step
    if args.eval_count is not None or args.eval_samples is not None:
        updates["eval"] = config.eval.model_copy(update={
            k: v for k, v in {"count": args.eval_count, "samples": args.eval_samples}.items() if v is not None})
    if args.staleness_bound is not None:
        updates["staleness_bound"] = args.staleness_bound
    if args.sync or args.interrupt:
        updates["weight_sync"] = config.weight_sync.model_copy(update={
            k: v for k, v in {"policy": args.sync, "interrupt": args.interrupt}.items() if v})
    if args.promote_to:
        updates["promote_to"] = args.promote_to
    if args.checkpoint_dir:
        updates["checkpoint"] = config.checkpoint.model_copy(update={"dir": str(Path(args.checkpoint_dir).resolve())})
    return config.model_copy(update=updates)


def fleet_controller(fleet_spec: str | None):
    """The running fleet's controller, or one started from `fleet_spec`."""
    import ray

    from rayfleet.control_plane.controller import get_or_create_controller
    from rayfleet.control_plane.controller_api import CONTROLLER_NAME, NAMESPACE
    from rayfleet.control_plane.cli.launch import load_any_spec

    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        if fleet_spec is None:
            raise SystemExit("no fleet runs on this Ray cluster: start one with a rollout pool "
                             "(`rayfleet up examples/rl/fleet.yaml`) or pass --fleet SPEC") from None
    return get_or_create_controller(load_any_spec(fleet_spec))


def main(argv: list[str] | None = None) -> None:
    from rayfleet.control_plane.cli.driver_priority import keep_driver_priority
    from rayfleet.control_plane.cli.launch import connect
    from rayfleet.control_plane.rl.job import RLJob, write_result

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = configure(args)
    keep_driver_priority()
    connect(args.address, start_local=False)
    job = RLJob(config, fleet_controller(args.fleet), show_progress=not args.no_progress)
    result = asyncio.run(job.run())
    summary = {k: v for k, v in result.to_json().items() if k not in ("steps", "curve")}
    summary["heldout_reward"] = {int(p["version"]): round(p["reward"], 3) for p in result.curve}
    if any("sampled_reward" in p for p in result.curve):
        summary["heldout_sampled_reward"] = {int(p["version"]): round(p["sampled_reward"], 3) for p in result.curve}
    print(json.dumps(summary, indent=2))
    if args.out:
        print(f"result: {write_result(result, args.out)}")


if __name__ == "__main__":
    main(sys.argv[1:])
