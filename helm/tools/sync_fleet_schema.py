"""Copy the JSON Schema of rayfleet's FleetSpec into the chart's values.schema.json (`$defs/fleet.*`).

`helm install` then rejects a bad `fleet` value with the field's path, before anything reaches the
cluster. Run it with the project's Python whenever control_plane/spec.py changes:

    .venv/bin/python helm/tools/sync_fleet_schema.py          # rewrite values.schema.json
    .venv/bin/python helm/tools/sync_fleet_schema.py --check  # exit 1 if it is out of date

The schema pydantic derives covers types, required fields, bounds and unknown keys; checks written as
pydantic validators (pool name syntax, min <= max replicas) are not in it, and the chart tests parse the
rendered fleet spec with `parse_spec` for those.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rayfleet.control_plane.spec import FleetSpec

SCHEMA = Path(__file__).resolve().parents[1] / "rayfleet" / "values.schema.json"
PREFIX = "fleet."


def _prefixed(node: Any) -> Any:
    """`node` with every `#/$defs/X` reference renamed to `#/$defs/fleet.X`."""
    if isinstance(node, dict):
        return {
            key: (value.replace("#/$defs/", f"#/$defs/{PREFIX}") if key == "$ref" else _prefixed(value))
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_prefixed(item) for item in node]
    return node


def synced(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with its `fleet.*` definitions replaced by FleetSpec's current JSON Schema."""
    fleet = FleetSpec.model_json_schema()
    definitions = {name: value for name, value in schema["$defs"].items() if not name.startswith(PREFIX)}
    for name, definition in fleet.pop("$defs", {}).items():
        definitions[PREFIX + name] = _prefixed(definition)
    definitions[PREFIX + "FleetSpec"] = _prefixed(fleet)
    return {**schema, "$defs": dict(sorted(definitions.items()))}


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if values.schema.json is out of date")
    args = parser.parse_args()
    current = SCHEMA.read_text()
    wanted = render(synced(json.loads(current)))
    if args.check:
        if current != wanted:
            print(f"{SCHEMA} is out of date with FleetSpec: run {Path(__file__).name} without --check", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
