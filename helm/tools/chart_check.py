"""Lint, render and validate the rayfleet chart with the real Helm v4 library, without a cluster.

Runs under the Helm tools' Python (>= 3.12, `tests/setup_helm_tools.sh` builds it): `helm-sdkpy` bundles
Helm v4's Go library, and `kubernetes-validate` holds the Kubernetes OpenAPI schemas.

    python helm/tools/chart_check.py [-f values.yaml]... [--set-json '{"key": ...}'] [-o json|yaml]
    python helm/tools/chart_check.py --batch < cases.json    # {"case": {"values_files": [...], ...}, ...}

prints a JSON report (lint messages, the rendered objects and hooks, NOTES, every validation error) or,
with `-o yaml`, the rendered manifests like `helm template`; the exit status is 1 when anything failed.
`--batch` checks many cases in one process (Helm's library and the CRDs load once) and prints
{case: report}; the chart tests use it.

How it renders. helm-sdkpy exposes no client-side `template` and no dry-run: its `Install` always
talks to an API server. So `render` runs Helm's real `Install` action against a stand-in API server
(`DiscoveryServer`, below) that answers only what Install needs from a cluster: its version and
discovery (built-in kinds plus the CRDs under --crds, as a cluster with KubeRay installed has them),
404 for every lookup, and an echo for every create. Release records stay in Helm's memory driver.
Everything else is Helm: values coalescing, values.schema.json validation, the template engine with
`lookup`, hooks, NOTES, manifest sorting. The manifest Helm returns is exactly what it would apply.

How it lints. helm-sdkpy's `Lint` lints a chart directory with the chart's own values.yaml only, and
returns each message's severity and path but not its text. `lint` therefore copies the chart (following
symbolic links, as `helm package` does) with values.yaml replaced by the coalesced values, which is
what `helm lint -f` validates and renders.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import copy
import functools
import json
import os
import shutil
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "rayfleet"
CRDS = REPO / "tests" / "data" / "kuberay"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion); the newest kubernetes-validate knows
# is added at run time. The stand-in API server reports the newest.
MIN_KUBERNETES = "1.29"

# Helm's Go runtime sees the environment the process started with, not later changes to os.environ:
# the settings below must be in place before Python starts, so the script re-executes itself with them.
_HELM_ENV = {"HELM_DRIVER": "memory"}  # release records stay in memory, never in the stand-in cluster
if os.environ.get("HELM_DRIVER") != "memory":
    if __name__ != "__main__":
        raise RuntimeError("chart_check needs HELM_DRIVER=memory in the environment Python starts with")
    home = tempfile.mkdtemp(prefix="rayfleet-helm-")
    env = {**os.environ, **_HELM_ENV, "RAYFLEET_HELM_HOME": home, "HOME": home,
           "HELM_CACHE_HOME": f"{home}/cache", "HELM_CONFIG_HOME": f"{home}/config", "HELM_DATA_HOME": f"{home}/data"}
    env.pop("KUBECONFIG", None)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
if "RAYFLEET_HELM_HOME" in os.environ:
    atexit.register(shutil.rmtree, os.environ["RAYFLEET_HELM_HOME"], ignore_errors=True)

import helm_sdkpy  # noqa: E402  (after the environment above)
import kubernetes_validate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crd_schema import CRDSchemas  # noqa: E402

LINT_SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}

# Built-in kinds the stand-in server announces: (group/version, kind, plural, namespaced).
BUILTIN_RESOURCES = [
    ("v1", "ConfigMap", "configmaps", True),
    ("v1", "Secret", "secrets", True),
    ("v1", "Service", "services", True),
    ("v1", "ServiceAccount", "serviceaccounts", True),
    ("v1", "Pod", "pods", True),
    ("v1", "PersistentVolumeClaim", "persistentvolumeclaims", True),
    ("v1", "Namespace", "namespaces", False),
    ("apps/v1", "StatefulSet", "statefulsets", True),
    ("apps/v1", "Deployment", "deployments", True),
    ("batch/v1", "Job", "jobs", True),
    ("rbac.authorization.k8s.io/v1", "Role", "roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings", True),
    ("networking.k8s.io/v1", "Ingress", "ingresses", True),
    ("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", True),
]

# Pod templates embedded in custom resources, validated against the Kubernetes PodTemplate schema too.
POD_TEMPLATE_PATHS = {
    "RayService": ["spec.rayClusterConfig"],
    "RayJob": ["spec.rayClusterSpec"],
}


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of user values over defaults: maps merge, null deletes, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def user_values(values_files: list[Path], overrides: list[dict[str, Any]]) -> dict[str, Any]:
    """The values `helm install -f a -f b --set-json ...` passes: later sources win, maps merge."""
    values: dict[str, Any] = {}
    for source in [yaml.safe_load(path.read_text()) or {} for path in values_files] + overrides:
        values = _merge_keep_nulls(values, source)
    return values


def _merge_keep_nulls(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_keep_nulls(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class DiscoveryServer:
    """A stand-in Kubernetes API server for Helm's Install: version, discovery, 404 on GET, echo on create."""

    def __init__(self, kube_version: str, resources: list[tuple[str, str, str, bool]]):
        by_group_version: dict[str, list[dict[str, Any]]] = {}
        for group_version, kind, plural, namespaced in resources:
            by_group_version.setdefault(group_version, []).append(
                {
                    "name": plural,
                    "singularName": kind.lower(),
                    "namespaced": namespaced,
                    "kind": kind,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                }
            )
        major, minor = kube_version.split(".")
        groups: dict[str, list[str]] = {}
        for group_version in by_group_version:
            if "/" in group_version:
                group, version = group_version.split("/")
                groups.setdefault(group, []).append(version)
        kinds = {(group_version, plural): kind for group_version, kind, plural, _ in resources}
        routes = {
            "/version": {"major": major, "minor": minor, "gitVersion": f"v{kube_version}.0"},
            "/api": {"kind": "APIVersions", "versions": ["v1"]},
            "/apis": {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": group,
                        "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                        "preferredVersion": {"groupVersion": f"{group}/{versions[0]}", "version": versions[0]},
                    }
                    for group, versions in groups.items()
                ],
            },
        }
        for group_version, items in by_group_version.items():
            path = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
            routes[path] = {"kind": "APIResourceList", "groupVersion": group_version, "resources": items}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Go's client expects (HTTP/1.0 costs it a retry)
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                if path in routes:
                    self._reply(200, routes[path])
                else:
                    self._reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "reason": "NotFound", "code": 404, "message": f"{path} not found"})

            def do_POST(self) -> None:  # noqa: N802
                # Bodies of built-in kinds arrive as protobuf; answer with the kind's bare JSON object.
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                parts = self.path.split("?")[0].strip("/").split("/")
                group_version = "v1" if parts[0] == "api" else "/".join(parts[1:3])
                self._reply(201, {"apiVersion": group_version, "kind": kinds[(group_version, parts[-1])],
                                  "metadata": {}})

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def kubeconfig(self, namespace: str) -> str:
        host, port = self._server.server_address
        return yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "stand-in", "cluster": {"server": f"http://{host}:{port}"}}],
                "users": [{"name": "stand-in", "user": {}}],
                "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "stand-in",
                                                               "namespace": namespace}}],
                "current-context": "stand-in",
            }
        )

    def close(self) -> None:
        self._server.shutdown()


def lint(chart: Path, values: dict[str, Any]) -> list[dict[str, str]]:
    """Helm's lint of `chart` with `values` coalesced over its defaults: [{severity, path}]."""
    with tempfile.TemporaryDirectory(prefix="rayfleet-lint-") as tmp:
        copy_dir = Path(tmp) / chart.name
        shutil.copytree(chart, copy_dir, symlinks=False)
        defaults = yaml.safe_load((chart / "values.yaml").read_text())
        (copy_dir / "values.yaml").write_text(yaml.safe_dump(merge_values(defaults, values), sort_keys=False))
        config = helm_sdkpy.Configuration(namespace="default")
        result = asyncio.run(helm_sdkpy.Lint(config).run(str(copy_dir)))
    return [
        {"severity": LINT_SEVERITY.get(message["Severity"], str(message["Severity"])), "path": message["Path"]}
        for message in result.get("Messages") or []
    ]


def render(chart: Path, values: dict[str, Any], release: str, namespace: str, crds: CRDSchemas,
           kube_version: str) -> dict[str, Any]:
    """Helm's Install of `chart` against the stand-in server: {objects, hooks, notes} or {error}."""
    resources = BUILTIN_RESOURCES + [
        (r["groupVersion"], r["kind"], r["plural"], r["namespaced"]) for r in crds.resources()
    ]
    server = DiscoveryServer(kube_version, resources)
    try:
        config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=server.kubeconfig(namespace))
        try:
            release_json = asyncio.run(
                helm_sdkpy.Install(config).run(release, str(chart), values=values or None, wait=False)
            )
        except helm_sdkpy.HelmError as error:
            return {"error": str(error)}
    finally:
        server.close()
    return {
        "objects": [doc for doc in yaml.safe_load_all(release_json.get("manifest", "")) if doc],
        "hooks": [
            {"name": hook["name"], "events": hook.get("events", []),
             "objects": [doc for doc in yaml.safe_load_all(hook["manifest"]) if doc]}
            for hook in release_json.get("hooks") or []
        ],
        "notes": release_json.get("info", {}).get("notes", ""),
    }


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj.get(part, {}) if isinstance(obj, dict) else {}
    return obj


def validation_errors(obj: dict[str, Any], crds: CRDSchemas, versions: list[str]) -> list[str]:
    """Why the API server (each Kubernetes version in `versions`, strict) would reject `obj`; [] if not."""
    if (obj["apiVersion"], obj["kind"]) in crds.kinds():
        errors = [f"CRD schema: {e}" for e in crds.errors(obj)]
        for cluster_path in POD_TEMPLATE_PATHS.get(obj["kind"], []):
            cluster = _lookup(obj, cluster_path)
            groups = [("headGroupSpec", cluster.get("headGroupSpec", {}))] + [
                (f"workerGroupSpecs[{i}]", group) for i, group in enumerate(cluster.get("workerGroupSpecs", []))
            ]
            for where, group in groups:
                pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                                "metadata": {"name": "check"}, "template": group.get("template", {})}
                errors += [f"{cluster_path}.{where}.{e}" for e in _kubernetes_errors(pod_template, versions)]
        return errors
    return _kubernetes_errors(obj, versions)


def _kubernetes_errors(obj: dict[str, Any], versions: list[str]) -> list[str]:
    errors = []
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path) or "<root>"
            errors.append(f"Kubernetes {version} (strict): {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"no schema: {error.message}")
    return errors


# kubernetes-validate re-reads its multi-megabyte definitions file on every call; the contents are
# immutable package data, so one read per process is enough.
kubernetes_validate.utils.schema_contents = functools.cache(kubernetes_validate.utils.schema_contents)


@functools.cache
def crd_schemas(crd_dir: Path) -> CRDSchemas:
    return CRDSchemas(sorted(crd_dir.glob("*_*.yaml")))


def check(values_files: list[Path], overrides: list[dict[str, Any]], release: str, namespace: str,
          chart: Path = CHART, crd_dir: Path = CRDS) -> dict[str, Any]:
    crds = crd_schemas(crd_dir)
    versions = [MIN_KUBERNETES, kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version())]
    values = user_values(values_files, overrides)
    report: dict[str, Any] = {"kubernetes_versions": versions, "lint": lint(chart, values)}
    report.update(render(chart, values, release, namespace, crds, versions[-1]))
    if "objects" in report:
        everything = report["objects"] + [obj for hook in report["hooks"] for obj in hook["objects"]]
        report["validation"] = {
            f"{obj['kind']}/{obj['metadata']['name']}": validation_errors(obj, crds, versions) for obj in everything
        }
    return report


def failed(report: dict[str, Any]) -> bool:
    return (
        any(message["severity"] in ("WARNING", "ERROR") for message in report["lint"])
        or "error" in report
        or any(report["validation"].values())
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-f", "--values", type=Path, action="append", default=[], help="values file (repeatable)")
    parser.add_argument("--set-json", type=json.loads, action="append", default=[], help="values as a JSON object")
    parser.add_argument("--release", default="rayfleet")
    parser.add_argument("--namespace", default="llm")
    parser.add_argument("--chart", type=Path, default=CHART)
    parser.add_argument("--crds", type=Path, default=CRDS, help="CRD YAML files the cluster would have")
    parser.add_argument("-o", "--output", choices=["json", "yaml"], default="json")
    parser.add_argument("--batch", action="store_true", help="read cases as JSON on stdin, print {case: report}")
    args = parser.parse_args(argv)
    if args.batch:
        cases = json.load(sys.stdin)
        print(json.dumps({
            name: check([Path(f) for f in case.get("values_files", [])], case.get("set_json", []),
                        case.get("release", args.release), case.get("namespace", args.namespace),
                        Path(case.get("chart", args.chart)), args.crds)
            for name, case in cases.items()
        }))
        return 0
    report = check(args.values, args.set_json, args.release, args.namespace, args.chart, args.crds)
    if args.output == "yaml" and "objects" in report:
        hooks = [obj for hook in report["hooks"] for obj in hook["objects"]]
        print(yaml.safe_dump_all(report["objects"] + hooks, sort_keys=False), end="")
    else:
        print(json.dumps(report, indent=1))
    if failed(report):
        print("chart check failed: " + json.dumps(
            {"lint": report["lint"], "error": report.get("error"),
             "validation": {k: v for k, v in report.get("validation", {}).items() if v}}), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
