"""Policy plugins by name, discovered through Python entry points.

A third-party package registers a policy in its own pyproject (group `rayfleet.routers`,
`rayfleet.admission`, `rayfleet.scalers`, `rayfleet.migration` or `rayfleet.weight_sync`) and a fleet spec selects it by name with
parameters. The built-ins are registered the same way by rayfleet's pyproject, and also listed here so that
a source checkout without installed metadata still finds them.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from rayfleet.policies.base import AdmissionPolicy, MigrationPolicy, Router, Scaler
from rayfleet.policies.rl import WeightSyncPolicy

GROUPS: dict[str, tuple[str, type]] = {
    "router": ("rayfleet.routers", Router),
    "admission": ("rayfleet.admission", AdmissionPolicy),
    "scaler": ("rayfleet.scalers", Scaler),
    "migration": ("rayfleet.migration", MigrationPolicy),
    "weight_sync": ("rayfleet.weight_sync", WeightSyncPolicy),
}

class UnknownPolicy(ValueError):
    pass


def available(kind: str) -> dict[str, str]:
    """Policy name -> 'module:attr' for one kind, from the installed entry points."""
    group, _ = GROUPS[kind]
    return {ep.name: ep.value for ep in entry_points(group=group)}


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def create(kind: str, name: str, params: dict[str, Any] | None = None):
    """Instantiate the policy `name` of `kind` with `params`; errors name the allowed choices."""
    if kind not in GROUPS:
        raise UnknownPolicy(f"unknown policy kind '{kind}'; allowed: {', '.join(GROUPS)}")
    choices = available(kind)
    if name not in choices:
        raise UnknownPolicy(f"policies.{kind}: unknown {kind} '{name}'; allowed: {', '.join(sorted(choices))}")
    try:
        policy = _load(choices[name])(**(params or {}))
    except (TypeError, ValueError) as error:  # unknown or bad parameters: the spec's error names the field
        raise UnknownPolicy(f"policies.{kind}.params: invalid parameters for '{name}': {error}") from None
    protocol = GROUPS[kind][1]
    if not isinstance(policy, protocol):
        raise UnknownPolicy(f"policies.{kind}: '{name}' does not implement the {protocol.__name__} protocol")
    return policy
