"""The null migration policy: never migrates on its own, but still drains by migration when asked.

Draining replicas are handled by the controller's drain logic: without live migration their requests finish
in place.
"""

from __future__ import annotations

from rayfleet.policies.base import FleetSnapshot, MigrationDecision


class NoMigration:
    def plan(self, snapshot: FleetSnapshot, draining: frozenset[str]) -> list[MigrationDecision]:
        return []
