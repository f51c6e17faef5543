"""Validate objects against a CustomResourceDefinition's openAPIV3Schema, offline, with `jsonschema`.

A CRD's structural schema is OpenAPI v3 plus Kubernetes extensions; `to_json_schema` turns it into
JSON Schema (draft 2020-12) with the API server's semantics for what a chart or a patch can get wrong:
- unknown fields are errors (`additionalProperties: false` wherever the schema lists properties and
  does not say `x-kubernetes-preserve-unknown-fields`): the API server's `fieldValidation=Strict`,
  which kubectl uses by default and the rayfleet scaler requests;
- `x-kubernetes-int-or-string`, `nullable`, `x-kubernetes-embedded-resource` and the int32/int64
  formats mean what they mean to the API server.
Not evaluated: CEL rules (`x-kubernetes-validations`; KubeRay v1.7.0 uses them only on `managedBy` and
`gcsFaultToleranceOptions.backend`, which rayfleet never sets) and defaulting (irrelevant to validity).
Root `metadata` is checked by the API server, not by the CRD schema, and is not checked here.

Runs under both of rayfleet's Python environments (the project's and the Helm tools' one): it needs
only PyYAML and jsonschema.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

INT_BOUNDS = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_EMBEDDED_RESOURCE_FIELDS = {
    "apiVersion": {"type": "string"},
    "kind": {"type": "string"},
    "metadata": {"type": "object"},
}


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema for one node of a CRD's structural schema (recursively)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_json_schema(child) for name, child in value.items()}
        elif key == "items":
            out[key] = to_json_schema(value)
        elif key == "additionalProperties":
            out[key] = to_json_schema(value) if isinstance(value, dict) else value
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(child) for child in value]
        elif key == "not":
            out[key] = to_json_schema(value)
        elif key.startswith("x-kubernetes-") or key in ("nullable", "format", "default", "description"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource"):
        out["properties"] = {**_EMBEDDED_RESOURCE_FIELDS, **out.get("properties", {})}
    if node.get("format") in INT_BOUNDS and out.get("type") == "integer":
        out["minimum"], out["maximum"] = INT_BOUNDS[node["format"]]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def load_crd(path: Path) -> dict[str, Any]:
    """A CRD file, parsed; the parse is cached as JSON (a tenth of YAML's time) by content hash."""
    text = path.read_bytes()
    cache = Path(tempfile.gettempdir()) / "rayfleet-crd-cache" / f"{hashlib.sha256(text).hexdigest()}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        cache.parent.mkdir(exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(crd))
        partial.replace(cache)
        return crd


class CRDSchemas:
    """The served versions of a set of CRD files, by (apiVersion, kind)."""

    def __init__(self, crd_files: list[Path]):
        self.crds = [load_crd(path) for path in crd_files]
        self._sources = {}
        for crd in self.crds:
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    self._sources[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]

    def kinds(self) -> set[tuple[str, str]]:
        return set(self._sources)

    def resources(self) -> Iterator[dict[str, Any]]:
        """Discovery facts (group version, kind, plural, namespaced) of every served version."""
        for crd in self.crds:
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    yield {
                        "groupVersion": f"{crd['spec']['group']}/{version['name']}",
                        "kind": crd["spec"]["names"]["kind"],
                        "plural": crd["spec"]["names"]["plural"],
                        "singular": crd["spec"]["names"].get("singular", crd["spec"]["names"]["kind"].lower()),
                        "namespaced": crd["spec"]["scope"] == "Namespaced",
                    }

    @functools.cache
    def validator(self, api_version: str, kind: str) -> jsonschema.Draft202012Validator:
        schema = to_json_schema(self._sources[(api_version, kind)])
        # The API server checks root metadata itself (ObjectMeta); the CRD only says "object".
        schema.setdefault("properties", {})["metadata"] = {"type": "object"}
        return jsonschema.Draft202012Validator(schema)

    def errors(self, obj: dict[str, Any]) -> list[str]:
        """Every schema violation of `obj`, each as 'path: message'; [] when the API server would accept it."""
        validator = self.validator(obj["apiVersion"], obj["kind"])
        return sorted(
            f"{'.'.join(str(part) for part in error.absolute_path) or '<root>'}: {error.message}"
            for error in validator.iter_errors(obj)
        )

    def subschema_errors(self, api_version: str, kind: str, path: str, value: Any) -> list[str]:
        """Violations of `value` placed at JSON Pointer `path` (e.g. a JSON Patch operation's value)."""
        schema = self.validator(api_version, kind).schema
        for part in path.strip("/").split("/"):
            schema = schema["items"] if part.isdigit() or part == "-" else schema["properties"][part]
        return sorted(
            f"{path}{''.join('/' + str(p) for p in error.absolute_path)}: {error.message}"
            for error in jsonschema.Draft202012Validator(schema).iter_errors(value)
        )
