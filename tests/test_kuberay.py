"""The Kubernetes scaler (control_plane/kuberay.py) and its accelerator mapping.

No Kubernetes API server exists on these machines. The scaler therefore talks, through the real
`kubernetes` client (its HTTP requests, content types and query parameters unchanged), to a stand-in
server defined here: it stores RayClusters, applies RFC 6902 JSON Patches the way the API server does
(a failed `test` operation rejects the whole patch), and rejects a result that violates the RayCluster
CRD's schema of KubeRay v1.7.0 (tests/data/kuberay), as the API server's structural-schema validation
with fieldValidation=Strict would. What it cannot show: authorization itself (the RBAC test compares
the requests sent with the rules the chart grants), CEL rules, and the KubeRay operator acting on the patch.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from kubernetes import client as k8s

from rayfleet.control_plane import kuberay
from rayfleet.control_plane.kuberay import KubeRayScaleError, KubeRayScaler, WorkerGroupScaleRequest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "kuberay"
sys.path.insert(0, str(REPO / "helm" / "tools"))
from crd_schema import CRDSchemas  # noqa: E402

NAMESPACE = "llm"
CLUSTER = "rayfleet-x7k2p"  # KubeRay names a RayService's cluster <rayservice>-<suffix>


@pytest.fixture(scope="module")
def crds() -> CRDSchemas:
    return CRDSchemas([DATA / "ray.io_rayclusters.yaml"])


@pytest.fixture
def raycluster() -> dict[str, Any]:
    """KubeRay v1.7.0's autoscaler-v2 sample, with an H100 group added the way the rayfleet chart writes one."""
    sample = next(doc for doc in yaml.safe_load_all((DATA / "ray-cluster.autoscaler-v2.yaml").read_text())
                  if doc and doc["kind"] == "RayCluster")
    sample["metadata"] = {"name": CLUSTER, "namespace": NAMESPACE, "resourceVersion": "1"}
    cpu_group = sample["spec"]["workerGroupSpecs"][0]
    cpu_group.update(replicas=2, minReplicas=1, maxReplicas=10)
    h100 = copy.deepcopy(cpu_group)
    h100.update(groupName="h100", replicas=2, minReplicas=0, maxReplicas=4, resources={"accelerator_type:H100": "1"})
    h100["template"]["spec"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}]}]}}}
    l4 = copy.deepcopy(cpu_group)
    l4.update(groupName="l4", replicas=1, minReplicas=0, maxReplicas=8)
    l4["template"]["spec"]["nodeSelector"] = {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    sample["spec"]["workerGroupSpecs"] += [h100, l4]
    return sample


def apply_json_patch(document: Any, operations: list[dict[str, Any]]) -> Any:
    """RFC 6902 (add, remove, replace, test) on a copy; ValueError when an operation fails."""
    result = copy.deepcopy(document)
    for operation in operations:
        *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in operation["path"].split("/")[1:]]
        target = result
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        key: Any = int(last) if isinstance(target, list) and last != "-" else last
        op = operation["op"]
        if op == "test":
            if isinstance(target, dict) and key not in target or target[key] != operation["value"]:
                raise ValueError(f"test failed at {operation['path']}")
        elif op == "add" and isinstance(target, list):
            target.insert(len(target) if key == "-" else key, operation["value"])
        elif op == "add" or (op == "replace" and (key in target if isinstance(target, dict) else key < len(target))):
            target[key] = operation["value"]
        elif op == "remove":
            del target[key]
        else:
            raise ValueError(f"{op} of missing {operation['path']}")
    return result


class StandInAPIServer:
    """Stores RayClusters of ray.io/v1 and answers GET and JSON-Patch PATCH on them, recording each request."""

    def __init__(self, crds: CRDSchemas, clusters: list[dict[str, Any]]):
        self.objects = {(c["metadata"]["namespace"], c["metadata"]["name"]): c for c in clusters}
        self.requests: list[dict[str, Any]] = []
        self.after_get = lambda obj: None  # lets a test change the object between a read and a patch
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "reason": reason, "code": code, "message": message})

            def _handle(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                server.requests.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                                        "content_type": self.headers.get("Content-Type"), "body": body})
                parts = url.path.strip("/").split("/")
                if parts[:3] != ["apis", "ray.io", "v1"] or len(parts) != 7 or parts[5] != "rayclusters":
                    return self._status(404, "NotFound", f"{url.path} not found")
                key = (parts[4], parts[6])
                if key not in server.objects:
                    return self._status(404, "NotFound", f'rayclusters.ray.io "{parts[6]}" not found')
                if self.command == "GET":
                    obj = server.objects[key]
                    answer = copy.deepcopy(obj)
                    server.after_get(obj)  # before the reply, so it precedes any request the reply leads to
                    return self._reply(200, answer)
                if self.headers.get("Content-Type") != "application/json-patch+json":
                    return self._status(415, "UnsupportedMediaType", "this stand-in serves JSON Patch only")
                try:
                    patched = apply_json_patch(server.objects[key], body)
                except (ValueError, KeyError, IndexError, TypeError) as error:
                    return self._status(422, "Invalid", str(error))
                errors = crds.errors(patched)
                if errors:
                    return self._status(422, "Invalid", "; ".join(errors))
                patched["metadata"]["resourceVersion"] = str(int(patched["metadata"]["resourceVersion"]) + 1)
                server.objects[key] = patched
                self._reply(200, patched)

            do_GET = do_PATCH = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def api(self) -> k8s.CustomObjectsApi:
        host, port = self._http.server_address
        return k8s.CustomObjectsApi(k8s.ApiClient(k8s.Configuration(host=f"http://{host}:{port}")))

    def cluster(self) -> dict[str, Any]:
        return self.objects[(NAMESPACE, CLUSTER)]

    def close(self) -> None:
        self._http.shutdown()


@pytest.fixture
def server(crds, raycluster):
    server = StandInAPIServer(crds, [raycluster])
    yield server
    server.close()


@pytest.fixture
def scaler(server) -> KubeRayScaler:
    return KubeRayScaler(CLUSTER, NAMESPACE, api=server.api())


def group(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    return next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == name)


def test_worker_groups_read_bounds_and_accelerators_from_the_cluster(scaler):
    groups = scaler.worker_groups()
    assert list(groups) == ["small-group", "h100", "l4"]
    h100 = groups["h100"]
    assert (h100.index, h100.replicas, h100.min_replicas, h100.max_replicas) == (1, 2, 0, 4)
    assert h100.workers_to_delete == ()
    assert {name: state.accelerator_type for name, state in groups.items()} == {
        "small-group": None, "h100": "H100", "l4": "L4"}


def test_scale_up_changes_only_the_groups_replicas(server, scaler, raycluster):
    scaler.scale(WorkerGroupScaleRequest(group="h100", replicas=4))
    after = server.cluster()
    assert group(after, "h100")["replicas"] == 4
    assert "workersToDelete" not in group(after, "h100").get("scaleStrategy", {})
    for name in ("small-group", "l4"):
        assert group(after, name) == group(raycluster, name)


def test_scale_down_names_the_drained_workers(server, scaler, crds):
    drained = "rayfleet-x7k2p-h100-worker-abcde"
    scaler.scale(WorkerGroupScaleRequest(group="h100", replicas=1, workers_to_delete=(drained,)))
    after = group(server.cluster(), "h100")
    assert after["replicas"] == 1
    assert after["scaleStrategy"] == {"workersToDelete": [drained]}
    assert crds.errors(server.cluster()) == []


def test_releasing_a_drained_pod_shrinks_its_group_by_exactly_that_pod(server, scaler, crds):
    before = group(server.cluster(), "h100")["replicas"]
    drained = "rayfleet-x7k2p-h100-worker-fghij"
    request = scaler.release_pod("h100", drained)
    after = group(server.cluster(), "h100")
    assert after["replicas"] == request.replicas == max(before - 1, after.get("minReplicas", 0))
    assert drained in after["scaleStrategy"]["workersToDelete"]
    assert crds.errors(server.cluster()) == []


def test_every_patch_operation_fits_the_raycluster_schema(server, scaler, crds):
    request = WorkerGroupScaleRequest(group="l4", replicas=0, workers_to_delete=("rayfleet-x7k2p-l4-worker-q9z8w",))
    body = scaler.patch_body(request, scaler.worker_groups()["l4"])
    assert [op["op"] for op in body] == ["test", "test", "replace", "add"]
    for operation in body:
        assert crds.subschema_errors("ray.io/v1", "RayCluster", operation["path"], operation["value"]) == []
    scaler.scale(request)
    assert crds.errors(server.cluster()) == []


def test_workers_already_queued_for_deletion_stay_queued(server, scaler):
    group(server.cluster(), "h100")["scaleStrategy"] = {"workersToDelete": ["queued-by-the-autoscaler"]}
    scaler.scale(WorkerGroupScaleRequest(group="h100", replicas=0, workers_to_delete=("drained-by-rayfleet",)))
    assert group(server.cluster(), "h100")["scaleStrategy"]["workersToDelete"] == [
        "queued-by-the-autoscaler", "drained-by-rayfleet"]


def test_replicas_outside_the_groups_bounds_are_refused_before_any_patch(server, scaler):
    with pytest.raises(KubeRayScaleError, match=r"replicas 5 outside \[minReplicas 0, maxReplicas 4\]"):
        scaler.scale(WorkerGroupScaleRequest(group="h100", replicas=5))
    assert [r["method"] for r in server.requests] == ["GET"]


def test_an_unknown_group_is_refused_with_the_groups_there_are(scaler):
    with pytest.raises(KubeRayScaleError, match="no worker group 'a100'; it has: h100, l4, small-group"):
        scaler.scale(WorkerGroupScaleRequest(group="a100", replicas=1))


def test_a_patch_computed_from_a_stale_read_changes_nothing(server, scaler):
    def autoscaler_scales_up_meanwhile(obj):
        group(obj, "h100")["replicas"] = 3
        server.after_get = lambda obj: None

    server.after_get = autoscaler_scales_up_meanwhile
    with pytest.raises(KubeRayScaleError, match=r"patch rayclusters/rayfleet-x7k2p in llm failed \(422"):
        scaler.scale(WorkerGroupScaleRequest(group="h100", replicas=1, workers_to_delete=("w-1",)))
    after = group(server.cluster(), "h100")
    assert after["replicas"] == 3 and "workersToDelete" not in after.get("scaleStrategy", {})


def test_a_missing_cluster_is_reported_with_the_api_servers_answer(server):
    scaler = KubeRayScaler("gone", NAMESPACE, api=server.api())
    with pytest.raises(KubeRayScaleError, match=r"get rayclusters/gone in llm failed \(404"):
        scaler.worker_groups()


def test_patches_are_json_patches_with_strict_field_validation(server, scaler):
    scaler.scale(WorkerGroupScaleRequest(group="l4", replicas=2))
    patch = next(r for r in server.requests if r["method"] == "PATCH")
    assert patch["path"] == f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters/{CLUSTER}"
    assert patch["content_type"] == "application/json-patch+json"
    assert patch["query"] == {"fieldValidation": ["Strict"]}


def rbac_attributes(request: dict[str, Any]) -> tuple[str, str, str]:
    """(apiGroup, resource, verb) the API server authorizes a request on a named custom resource as."""
    _, group_name, _, _, _, resource, _ = request["path"].strip("/").split("/")
    verb = {"GET": "get", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[request["method"]]
    return group_name, resource, verb


def test_rbac_rules_grant_exactly_the_requests_the_scaler_sends(server, scaler):
    scaler.worker_groups()
    scaler.scale(WorkerGroupScaleRequest(group="h100", replicas=1, workers_to_delete=("w-1",)))
    sent = {rbac_attributes(request) for request in server.requests}
    granted = {(g, r, v) for rule in kuberay.RBAC_RULES
               for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert sent == granted
    assert set(kuberay.API_VERBS.values()) == {verb for _, _, verb in sent}


def test_in_cluster_uses_the_pods_namespace_cluster_label_and_token(tmp_path):
    (tmp_path / "namespace").write_text("llm\n")
    (tmp_path / "token").write_text("token-of-the-service-account")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    environ = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443",
               kuberay.CLUSTER_NAME_ENV: CLUSTER}
    scaler = KubeRayScaler.in_cluster(service_account_dir=tmp_path, environ=environ)
    assert (scaler.cluster_name, scaler.namespace) == (CLUSTER, "llm")
    configuration = scaler.api.api_client.configuration
    assert configuration.host == "https://10.0.0.1:443"
    assert configuration.api_key["BearerToken"] == "bearer token-of-the-service-account"
    assert configuration.ssl_ca_cert == str(tmp_path / "ca.crt")


def test_in_cluster_without_the_cluster_name_says_who_sets_it(tmp_path):
    with pytest.raises(KubeRayScaleError, match="RAYFLEET_RAYCLUSTER_NAME is not set: the rayfleet Helm chart sets it"):
        KubeRayScaler.in_cluster(service_account_dir=tmp_path, environ={})


# NVML device names as `nvidia-smi` prints them; GPU feature discovery labels nodes with these, spaces as '-'.
NVML_NAMES = [
    "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA L4", "Tesla T4",
    "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A10G", "NVIDIA L40S", "NVIDIA B200",
    "Tesla V100-SXM2-16GB", "NVIDIA GH200 480GB", "NVIDIA RTX PRO 6000 Blackwell Server Edition",
    "NVIDIA GeForce RTX 4090",
]


@pytest.mark.parametrize("nvml_name", NVML_NAMES)
def test_gpu_product_labels_map_to_the_accelerator_type_ray_detects(nvml_name):
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    ray_detects = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(nvml_name)
    label = nvml_name.replace(" ", "-")
    assert kuberay.accelerator_type_from_node_labels({kuberay.GPU_PRODUCT_LABEL: label}) == ray_detects


@pytest.mark.parametrize("product", ["NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", "NVIDIA-A100-SXM4-40GB-SHARED"])
def test_mig_and_time_sliced_products_map_to_their_gpu(product):
    assert kuberay.accelerator_type_for_gpu_product(product) == "A100"


@pytest.mark.parametrize(("value", "expected"), [
    ("nvidia-h100-80gb", "H100"), ("nvidia-h100-mega-80gb", "H100"), ("nvidia-h200-141gb", "H200"),
    ("nvidia-l4", "L4"), ("nvidia-tesla-t4", "T4"), ("nvidia-a100-80gb", "A100"), ("nvidia-tesla-a100", "A100"),
    ("nvidia-b200", "B200"), ("nvidia-rtx-pro-6000", "RTX-PRO-6000"),
])
def test_gke_accelerator_labels_map_to_ray_accelerator_types(value, expected):
    assert kuberay.accelerator_type_from_node_labels({kuberay.GKE_ACCELERATOR_LABEL: value}) == expected


def test_a_node_without_gpu_labels_has_no_accelerator_type():
    assert kuberay.accelerator_type_from_node_labels({"kubernetes.io/arch": "amd64"}) is None
