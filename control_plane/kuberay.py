"""Elastic scaling of KubeRay worker groups, for a FleetController running inside a KubeRay cluster.

The controller decides *which* workers go (it drains, and with live migration migrates, their requests
first); this module only carries that decision to Kubernetes, the way the Ray autoscaler does it.

Why patching the RayCluster works under a RayService (checked in the KubeRay v1.7.0 source):
- The RayService controller creates the RayCluster from `spec.rayClusterConfig` and later compares a hash
  of that spec computed *without* the worker groups' `replicas`, `minReplicas`, `maxReplicas` and
  `scaleStrategy.workersToDelete` (`GenerateHashWithoutReplicasAndWorkersToDelete` in `utils/util.go`,
  `isClusterSpecHashEqual` in `rayservice_controller.go`). Edits of those fields on the RayCluster are
  therefore never reverted by the RayService and never trigger a new cluster (and, conversely, changing
  them in the RayService does not reach a running cluster).
- With `enableInTreeAutoscaling: true` the RayCluster controller never deletes random Pods when `replicas`
  drops (`reconcilePods` in `raycluster_controller.go`): it deletes exactly the Pods named in
  `workersToDelete`, then creates Pods while fewer than `replicas` run. A scale-down is thus
  "replicas - n, and these n Pods", nothing else.
- The Ray autoscaler's KubeRay provider (`ray/autoscaler/v2/instance_manager/cloud_providers/kuberay/`)
  patches `replicas` and `workersToDelete` with a JSON Patch (RFC 6902) addressed by worker group index. We mirror
  it, and add `test` operations on the group's name and current `replicas`: the autoscaler writes these
  fields too, so a patch computed from a stale read is rejected by the API server instead of
  overwriting the autoscaler's change. Custom resources accept no strategic merge patch, and a JSON
  merge patch would have to resend the whole `workerGroupSpecs` list, so JSON Patch is the only
  precise form.

A RayService's RayCluster gets a generated name (`<rayservice>-<suffix>`, new on every zero-downtime
upgrade), so the chart passes it to every Ray Pod as `RAYFLEET_RAYCLUSTER_NAME` from the Pod label
`ray.io/cluster` that KubeRay sets. KubeRay also gives every Ray container its Pod's name and worker
group (env RAY_CLOUD_INSTANCE_ID and RAY_NODE_TYPE_NAME), which Ray records for each node: the
`instance_id` and `ray_node_type_name` of `ray.autoscaler.v2.sdk.get_cluster_status(...).active_nodes`
turn the Ray node of a drained replica into the Pod and group of a `WorkerGroupScaleRequest`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes.config.incluster_config import InClusterConfigLoader

GROUP = "ray.io"
VERSION = "v1"
PLURAL = "rayclusters"

# The CustomObjectsApi methods this module calls, each with the RBAC verb the API server checks for it.
# The chart's Role (helm/rayfleet/templates/rbac.yaml) grants exactly RBAC_RULES, and the tests compare
# both with the requests the scaler really sends.
API_VERBS: Mapping[str, str] = {
    "get_namespaced_custom_object": "get",
    "patch_namespaced_custom_object": "patch",
}
RBAC_RULES: tuple[dict[str, list[str]], ...] = (
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": sorted(set(API_VERBS.values()))},
)

CLUSTER_NAME_ENV = "RAYFLEET_RAYCLUSTER_NAME"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
JSON_PATCH = "application/json-patch+json"

# Node labels that name a node's GPU model: NVIDIA GPU feature discovery (GPU operator) and GKE.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
# Ray's rule for NVML device names (ray/_private/accelerators/nvidia_gpu.py, NVIDIA_GPU_NAME_PATTERN):
# "NVIDIA H100 80GB HBM3" -> "H100", "Tesla T4" -> "T4", "NVIDIA RTX PRO 6000 ..." -> "RTX-PRO-6000".
_NVML_NAME = re.compile(r"\w+\s+((?:[A-Z]+\s+)*[A-Z0-9]*\d[A-Z0-9]*)")
# GPU feature discovery renames products under MIG (mixed strategy) and time-slicing; Ray sees the parent GPU.
_GFD_SUFFIX = re.compile(r"-(?:MIG-.*|SHARED)$")


class KubeRayScaleError(RuntimeError):
    """A scale request that was not carried out; the message says why (and nothing was changed)."""


def accelerator_type_for_gpu_product(product: str) -> str | None:
    """Ray accelerator type of a node whose `nvidia.com/gpu.product` label is `product`.

    GPU feature discovery writes the NVML device name with spaces replaced by '-'
    ("NVIDIA-H100-80GB-HBM3"); applying Ray's own rule to the restored name yields the type Ray
    auto-detects on that node ("H100"), so a nodeSelector and a Ray resource request agree.
    """
    name = _GFD_SUFFIX.sub("", product).replace("-", " ").strip()
    if not name:
        return None
    match = _NVML_NAME.match(name)
    if match and len(match.group(1)) > 1:
        return match.group(1).replace(" ", "-")
    # Ray's fallback for mixed-case consumer names ("NVIDIA GeForce RTX 4090" -> "GeForce-RTX-4090").
    return re.sub(r"^NVIDIA\s+", "", name).replace(" ", "-") or None


def accelerator_type_for_gke_accelerator(value: str) -> str | None:
    """Ray accelerator type of a GKE node labelled `cloud.google.com/gke-accelerator: value`.

    "nvidia-h100-80gb" -> "H100", "nvidia-tesla-t4" -> "T4", "nvidia-l4" -> "L4",
    "nvidia-rtx-pro-6000" -> "RTX-PRO-6000".
    """
    if not value.startswith("nvidia-"):
        return None
    model = re.sub(r"^nvidia-(?:tesla-)?", "", value)
    model = re.sub(r"(?:-mega)?(?:-\d+gb)?$", "", model)
    return model.upper() or None


def accelerator_type_from_node_labels(labels: Mapping[str, str]) -> str | None:
    """Ray accelerator type of a node (or a Pod's nodeSelector) from its labels; None for no known GPU."""
    if GPU_PRODUCT_LABEL in labels:
        return accelerator_type_for_gpu_product(labels[GPU_PRODUCT_LABEL])
    if GKE_ACCELERATOR_LABEL in labels:
        return accelerator_type_for_gke_accelerator(labels[GKE_ACCELERATOR_LABEL])
    return None


@dataclass(frozen=True)
class WorkerGroupScaleRequest:
    """Set `group` to `replicas` Pods; the Pods named in `workers_to_delete` (already drained) go first."""

    group: str
    replicas: int
    workers_to_delete: tuple[str, ...] = ()


@dataclass(frozen=True)
class GroupState:
    """One worker group as the RayCluster declares it now."""

    name: str
    index: int  # position in spec.workerGroupSpecs: JSON Patch paths address groups by index
    replicas: int
    min_replicas: int
    max_replicas: int
    workers_to_delete: tuple[str, ...]
    accelerator_type: str | None


def _declared_ray_resources(group: Mapping[str, Any]) -> Mapping[str, Any]:
    """Ray resources a group declares: the group's `resources` field, else `rayStartParams.resources`.

    Same precedence and format as the Ray autoscaler (`_get_custom_resources` in
    ray/autoscaler/_private/kuberay/autoscaling_config.py): the ray start parameter is a quoted,
    backslash-escaped JSON object, e.g. '"{\\"accelerator_type:H100\\": 1}"'.
    """
    if group.get("resources"):
        return group["resources"]
    declared = group.get("rayStartParams", {}).get("resources")
    return json.loads(declared[1:-1].replace("\\", "")) if declared else {}


def _group_accelerator_type(group: Mapping[str, Any]) -> str | None:
    """The group's Ray accelerator type: its declared `accelerator_type:X` resource, else its node placement."""
    for key in _declared_ray_resources(group):
        if key.startswith("accelerator_type:"):
            return key.removeprefix("accelerator_type:")
    pod_spec = group.get("template", {}).get("spec", {})
    found = accelerator_type_from_node_labels(pod_spec.get("nodeSelector", {}))
    if found:
        return found
    terms = (
        pod_spec.get("affinity", {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", {})
        .get("nodeSelectorTerms", [])
    )
    for term in terms:
        for expression in term.get("matchExpressions", []):
            if expression.get("operator") == "In":
                for value in expression.get("values", []):
                    found = accelerator_type_from_node_labels({expression["key"]: value})
                    if found:
                        return found
    return None


class KubeRayScaler:
    """Scales the worker groups of one RayCluster through the Kubernetes API (`CustomObjectsApi`)."""

    def __init__(self, cluster_name: str, namespace: str, api: k8s.CustomObjectsApi | None = None):
        self.cluster_name = cluster_name
        self.namespace = namespace
        self.api = api if api is not None else k8s.CustomObjectsApi()

    @classmethod
    def in_cluster(
        cls, service_account_dir: Path = SERVICE_ACCOUNT_DIR, environ: Mapping[str, str] = os.environ
    ) -> KubeRayScaler:
        """The scaler of the RayCluster this Pod belongs to, authenticated as the Pod's ServiceAccount."""
        cluster_name = environ.get(CLUSTER_NAME_ENV)
        if not cluster_name:
            raise KubeRayScaleError(
                f"{CLUSTER_NAME_ENV} is not set: the rayfleet Helm chart sets it on every Ray Pod from the "
                "label ray.io/cluster; set it to the RayCluster's name when running elsewhere"
            )
        namespace = (service_account_dir / "namespace").read_text().strip()
        configuration = k8s.Configuration()
        InClusterConfigLoader(
            token_filename=str(service_account_dir / "token"),
            cert_filename=str(service_account_dir / "ca.crt"),
            environ=environ,
        ).load_and_set(configuration)
        return cls(cluster_name, namespace, k8s.CustomObjectsApi(k8s.ApiClient(configuration)))

    def _call(self, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.api, method)(
                GROUP, VERSION, self.namespace, PLURAL, self.cluster_name, **kwargs
            )
        except k8s.ApiException as error:
            raise KubeRayScaleError(
                f"{API_VERBS[method]} rayclusters/{self.cluster_name} in {self.namespace} failed "
                f"({error.status} {error.reason}): {error.body}"
            ) from None

    def worker_groups(self) -> dict[str, GroupState]:
        """The worker groups of the RayCluster, by name, as declared now."""
        cluster = self._call("get_namespaced_custom_object")
        groups = {}
        for index, group in enumerate(cluster["spec"].get("workerGroupSpecs", [])):
            groups[group["groupName"]] = GroupState(
                name=group["groupName"],
                index=index,
                replicas=group.get("replicas", 0),
                min_replicas=group.get("minReplicas", 0),
                max_replicas=group.get("maxReplicas", 2**31 - 1),
                workers_to_delete=tuple(group.get("scaleStrategy", {}).get("workersToDelete", [])),
                accelerator_type=_group_accelerator_type(group),
            )
        return groups

    def patch_body(self, request: WorkerGroupScaleRequest, current: GroupState) -> list[dict[str, Any]]:
        """The JSON Patch that applies `request` to the group read as `current`.

        Workers already queued for deletion (by the Ray autoscaler, say) stay queued. The `test`
        operations make the API server reject the patch, changing nothing, when the group moved or its
        `replicas` changed since `current` was read.
        """
        if request.group != current.name:
            raise KubeRayScaleError(f"request for group {request.group!r} applied to group {current.name!r}")
        if not current.min_replicas <= request.replicas <= current.max_replicas:
            raise KubeRayScaleError(
                f"worker group {request.group!r}: replicas {request.replicas} outside "
                f"[minReplicas {current.min_replicas}, maxReplicas {current.max_replicas}]"
            )
        workers_to_delete = list(current.workers_to_delete)
        workers_to_delete += [pod for pod in request.workers_to_delete if pod not in workers_to_delete]
        group = f"/spec/workerGroupSpecs/{current.index}"
        body: list[dict[str, Any]] = [
            {"op": "test", "path": f"{group}/groupName", "value": current.name},
            {"op": "test", "path": f"{group}/replicas", "value": current.replicas},
            {"op": "replace", "path": f"{group}/replicas", "value": request.replicas},
        ]
        if workers_to_delete != list(current.workers_to_delete):
            # `add` sets the member whether or not `scaleStrategy` is present yet.
            body.append(
                {"op": "add", "path": f"{group}/scaleStrategy", "value": {"workersToDelete": workers_to_delete}}
            )
        return body

    def scale(self, request: WorkerGroupScaleRequest) -> None:
        """PATCH the RayCluster so KubeRay deletes `request.workers_to_delete` and keeps `request.replicas` Pods."""
        groups = self.worker_groups()
        if request.group not in groups:
            raise KubeRayScaleError(
                f"RayCluster {self.cluster_name} has no worker group {request.group!r}; "
                f"it has: {', '.join(sorted(groups)) or 'none'}"
            )
        self._call(
            "patch_namespaced_custom_object",
            body=self.patch_body(request, groups[request.group]),
            field_validation="Strict",
            _content_type=JSON_PATCH,
        )

    def release_pod(self, group: str, pod: str) -> WorkerGroupScaleRequest:
        """Shrink `group` by one, deleting exactly `pod` (a worker whose replicas were drained)."""
        groups = self.worker_groups()
        if group not in groups:
            raise KubeRayScaleError(f"RayCluster {self.cluster_name} has no worker group {group!r}")
        current = groups[group]
        request = WorkerGroupScaleRequest(group=group, replicas=max(current.replicas - 1, current.min_replicas),
                                          workers_to_delete=(pod,))
        self._call("patch_namespaced_custom_object", body=self.patch_body(request, current),
                   field_validation="Strict", _content_type=JSON_PATCH)
        return request
