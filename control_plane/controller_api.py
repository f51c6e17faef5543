"""What the FleetController's callers share with it: where to find it and the error it answers with.

The ingress, the CLI and the Serve app builder reach the controller by name; they import this module, never
the controller's own (which pulls in replica management, KubeRay and the policies' scheduling loop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

CONTROLLER_NAME = "rayfleet-controller"
NAMESPACE = "rayfleet"


class FleetError(RuntimeError):
    """A control request that cannot be carried out (unknown pool or replica, out-of-bounds scale...)."""


def replica_actor_name(replica_id: str) -> str:
    """The detached actor name of a replica: how a restarted controller finds it again."""
    return f"rayfleet-replica-{replica_id}"


@dataclass(frozen=True)
class AuditEntry:
    """One operator action on the fleet (scale, drain, migrate), kept in the state store's audit log."""

    action: str
    params: dict[str, Any]
    origin: str  # who asked: "cli", "admin-api", "dashboard"
    outcome: str  # "ok" or "refused"
    detail: str = ""  # the result, or why it was refused
    at: float = field(default_factory=time.time)
