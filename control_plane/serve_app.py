"""The Ray Serve application: `rayfleet.control_plane.serve_app:build_app`.

Used the same way everywhere: `rayfleet up` calls it, a KubeRay RayService names it as its import path
with `args: {spec_path: ...}`, and `serve run rayfleet.control_plane.serve_app:build_app spec_path=...`
works too. It makes sure the fleet's controller exists (named, detached) and binds the ingress: the one place
that composes the controller (`controller.py`) with the data plane (`serving/`), which never imports it.
"""

from __future__ import annotations

import os
from typing import Any

from rayfleet.control_plane.controller import get_or_create_controller
from rayfleet.control_plane.serving.ingress import OpenAIIngress
from rayfleet.control_plane.spec import FleetSpec, load_spec, parse_spec


def resolve_spec(args: dict[str, Any]) -> FleetSpec:
    if "spec" in args:
        spec = parse_spec(args["spec"])
    else:
        spec = load_spec(args.get("spec_path") or os.environ.get("RAYFLEET_SPEC", "/etc/rayfleet/fleet.yaml"))
    # Deployment-time overrides (Helm sets these from its values and Secrets).
    store = os.environ.get("RAYFLEET_STATE_STORE")
    if store:
        spec = spec.model_copy(update={"state_store": store})
    return spec


def build_app(args: dict[str, Any]):
    # Keys travel as digests only (Serve and Ray keep the deployments' and actors' arguments); the ingress
    # never needs the state store's URL.
    spec = resolve_spec(args).with_key_digests()
    get_or_create_controller(spec)
    return OpenAIIngress.options(num_replicas=spec.ingress.num_replicas).bind(spec.without_secrets().model_dump())
