"""`rayfleet`: bring a fleet up, look at it, scale it, migrate requests, take it down, or simulate its policies
at any scale (`rayfleet --help`)."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys

from rayfleet.control_plane.cli import simulate
from rayfleet.control_plane.cli.launch import (
    connect,
    controller,
    deploy,
    ensure_demo_models,
    load_any_spec,
    render_status,
)


# ---------------------------------------------------------------------- commands
def cmd_up(args) -> None:
    spec = load_any_spec(args.spec)
    ensure_demo_models(spec)
    connect(args.address, start_local=True)
    url = deploy(spec, args.wait)
    print(f"rayfleet '{spec.name}' is up: OpenAI endpoint {url} (models: "
          f"{', '.join(['auto'] + [p.name for p in spec.pools])})")


def cmd_status(args) -> None:
    import ray

    connect(args.address, start_local=False)
    status = ray.get(controller().status.remote())
    if args.json:
        print(json.dumps(status, indent=2))
        return
    print(render_status(status))


def cmd_scale(args) -> None:
    import ray

    connect(args.address, start_local=False)
    try:
        print(ray.get(controller().scale.remote(args.pool, args.replicas)))
    except ray.exceptions.RayTaskError as error:
        raise SystemExit(str(error.cause)) from None


def cmd_drain(args) -> None:
    import ray

    connect(args.address, start_local=False)
    try:
        print(ray.get(controller().drain.remote(args.replica)))
    except ray.exceptions.RayTaskError as error:
        raise SystemExit(str(error.cause)) from None


def cmd_migrate(args) -> None:
    import ray

    connect(args.address, start_local=False)
    try:
        print(json.dumps(ray.get(controller().migrate.remote(args.request_id, args.src, args.dst, args.mode)),
                         indent=2))
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
        ray.shutdown()
        subprocess.run(["ray", "stop", "--force"], check=False, stdout=subprocess.DEVNULL)
        print("local Ray cluster stopped")


def cmd_make_demo_models(args) -> None:
    from rayfleet.control_plane.cli.demo_models import build_demo_models

    for path in build_demo_models(args.dir):
        print(path)


def cmd_demo(args) -> None:
    from rayfleet.control_plane.cli.demo import run_demo

    run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayfleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, then a local cluster)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="deploy a fleet from a spec (default: the CPU demo fleet)")
    up.add_argument("spec", nargs="?", help="fleet spec YAML (default: the embedded CPU demo)")
    up.add_argument("--wait", type=float, default=600, help="seconds to wait for replicas (default 600)")
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="pools, replicas, load, recent migrations")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    scale = sub.add_parser("scale", help="set a pool's replica count (drains replicas on scale-down)")
    scale.add_argument("pool")
    scale.add_argument("replicas", type=int)
    scale.set_defaults(func=cmd_scale)

    drain = sub.add_parser("drain", help="drain and remove one replica (its pool shrinks by one)")
    drain.add_argument("replica")
    drain.set_defaults(func=cmd_drain)

    migrate = sub.add_parser("migrate", help="live-migrate a running request to another replica")
    migrate.add_argument("request_id")
    migrate.add_argument("src")
    migrate.add_argument("dst")
    migrate.add_argument("--mode", choices=["precopy", "stop_and_copy"], default="precopy")
    migrate.set_defaults(func=cmd_migrate)

    down = sub.add_parser("down", help="stop the fleet (and with --stop-ray the local Ray cluster)")
    down.add_argument("--stop-ray", action="store_true")
    down.set_defaults(func=cmd_down)

    models = sub.add_parser("make-demo-models", help="write tiny random-weight Llama models (no hub needed)")
    models.add_argument("dir")
    models.set_defaults(func=cmd_make_demo_models)

    demo = sub.add_parser("demo", help="the quick start: demo fleet + sample workload, then results")
    demo.add_argument("--spec", help="fleet spec (default: the embedded CPU demo)")
    demo.add_argument("--requests", type=int, default=24, help="sample workload size (default 24)")
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument("--keep-serving", action="store_true", help="stay up after the workload (Ctrl-C stops)")
    demo.set_defaults(func=cmd_demo)

    simulate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
