"""The Helm chart helm/rayfleet: lint, render and validation of every values file, and what the objects mean.

No Kubernetes API server exists on these machines. What runs for real: Helm v4's lint, values.schema.json
validation, template engine, hooks and NOTES (the Go library inside helm-sdkpy, run by
helm/tools/chart_check.py under the Helm tools' Python; its Install talks to a stand-in API server that
only answers discovery, so the manifest is exactly what Helm would apply); strict validation of every
rendered object against the Kubernetes OpenAPI schemas (kubernetes-validate, oldest supported and newest
known Kubernetes) and the KubeRay v1.7.0 / Prometheus Operator CRD schemas (tests/data/kuberay); the fleet
spec through rayfleet's own parser and the Serve config through Ray Serve's schema. Not reached: API-server
admission (CEL rules, defaulting), the KubeRay operator's Go-side validation, Pods actually running.

The Helm tools' environment comes from tests/setup_helm_tools.sh; without it these tests fail, they do not skip.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rayfleet.control_plane import kuberay
from rayfleet.control_plane.rl.config import parse_rl_config
from rayfleet.control_plane.spec import parse_spec

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "rayfleet"
sys.path.insert(0, str(REPO / "helm" / "tools"))
from helm_tools import HelmToolsMissing, check_cases  # noqa: E402

# Every values file users or CI install with: the chart's defaults, examples/values-*.yaml, ci/*-values.yaml.
VALUES_FILES = {
    "default": [],
    **{path.stem: [str(path)] for path in sorted((REPO / "examples").glob("values-*.yaml"))},
    **{f"ci-{path.stem}": [str(path)] for path in sorted((CHART / "ci").glob("*-values.yaml"))},
}
GRAFANA_ON = {"grafana": {"dashboards": {"enabled": True}}}
# Every switch the other values files leave on, off.
SWITCHES_OFF = {
    "autoscaler": {"enabled": False}, "apiKeys": {"enabled": False}, "rbac": {"create": False},
    "serviceAccount": {"create": False, "name": "existing"},
    "redis": {"mode": "external", "gcsFaultTolerance": False, "external": {"url": "redis://redis.example"}},
    "networkPolicy": {"enabled": False},
}
CASES = [*VALUES_FILES, "switches-off"]


@pytest.fixture(scope="module")
def chart_without_dashboards(tmp_path_factory) -> Path:
    """A copy of the chart whose dashboards/grafana/ (a link to the repo's dashboards/grafana) is empty."""
    chart = tmp_path_factory.mktemp("chart") / "rayfleet"
    shutil.copytree(CHART, chart)
    for dashboard in (chart / "dashboards" / "grafana").glob("*.json"):
        dashboard.unlink()
    return chart


@pytest.fixture(scope="module")
def reports(chart_without_dashboards) -> dict[str, dict[str, Any]]:
    cases = {name: {"values_files": files} for name, files in VALUES_FILES.items()}
    cases["switches-off"] = {"set_json": [SWITCHES_OFF]}
    cases["grafana"] = {"set_json": [GRAFANA_ON]}
    cases["grafana-without-dashboards"] = {"set_json": [GRAFANA_ON], "chart": str(chart_without_dashboards)}
    try:
        return check_cases(cases)
    except HelmToolsMissing as missing:
        pytest.fail(str(missing))


def rendered(report: dict[str, Any]) -> list[dict[str, Any]]:
    assert "error" not in report, report["error"]
    return report["objects"]


def only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{len(matches)} {kind} {name or ''} in {[o['metadata']['name'] for o in objects]}"
    return matches[0]


def ray_groups(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]


@pytest.mark.parametrize("case", CASES)
def test_chart_lints_clean(reports, case):
    assert reports[case]["lint"] == []


@pytest.mark.parametrize("case", CASES)
def test_every_rendered_object_passes_kubernetes_and_crd_schemas(reports, case):
    rendered(reports[case])
    failures = {name: errors for name, errors in reports[case]["validation"].items() if errors}
    assert failures == {}, json.dumps(failures, indent=1)
    assert len(reports[case]["kubernetes_versions"]) == 2


def test_defaults_render_a_rayservice_with_redis_rbac_and_endpoints(reports):
    objects = rendered(reports["default"])
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
    assert kinds == sorted([
        "RayService/rayfleet", "ConfigMap/rayfleet-fleet", "ServiceAccount/rayfleet", "Role/rayfleet-scaler",
        "RoleBinding/rayfleet-scaler", "Secret/rayfleet-api-keys", "Secret/rayfleet-redis",
        "StatefulSet/rayfleet-redis", "Service/rayfleet-redis", "Service/rayfleet-redis-headless",
        "Service/rayfleet-http", "Service/rayfleet-grpc", "Service/rayfleet-dashboard",
        "NetworkPolicy/rayfleet-ray", "NetworkPolicy/rayfleet-redis",
    ])
    cluster = only(objects, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    assert cluster["rayVersion"] == "2.60.0"


@pytest.mark.parametrize("case", CASES)
def test_the_fleet_spec_configmap_parses_as_a_fleet_spec(reports, case):
    objects = rendered(reports[case])
    configmap = only(objects, "ConfigMap", f"{only(objects, 'RayService')['metadata']['name']}-fleet")
    spec = parse_spec(yaml.safe_load(configmap["data"]["fleet.yaml"]))
    assert (spec.ingress.host, spec.ingress.port, spec.ingress.grpc_port) == ("0.0.0.0", 8000, 9000)
    assert spec.state_store.startswith(("redis://", "rediss://")) and "@" not in spec.state_store


@pytest.mark.parametrize("case", CASES)
def test_serve_config_is_rayfleets_app_in_ray_serves_schema(reports, case):
    from ray.serve.schema import ServeDeploySchema

    rayservice = only(rendered(reports[case]), "RayService")
    serve = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    (app,) = serve.applications
    assert app.import_path == "rayfleet.control_plane.serve_app:build_app"
    assert app.args == {"spec_path": "/etc/rayfleet/fleet.yaml"}
    assert (serve.http_options.host, serve.http_options.port, serve.grpc_options.port) == ("0.0.0.0", 8000, 9000)


@pytest.mark.parametrize("case", VALUES_FILES)
def test_role_grants_exactly_what_the_scaler_calls_to_the_pods_service_account(reports, case):
    objects = rendered(reports[case])
    role = only(objects, "Role")
    assert [{key: sorted(values) for key, values in rule.items()} for rule in role["rules"]] == list(kuberay.RBAC_RULES)
    binding = only(objects, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    (subject,) = binding["subjects"]
    for name, group in ray_groups(only(objects, "RayService")["spec"]["rayClusterConfig"]):
        assert group["template"]["spec"]["serviceAccountName"] == subject["name"], name


@pytest.mark.parametrize("case", VALUES_FILES)
def test_every_ray_container_knows_its_raycluster_and_secrets(reports, case):
    objects = rendered(reports[case])
    for name, group in ray_groups(only(objects, "RayService")["spec"]["rayClusterConfig"]):
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env[kuberay.CLUSTER_NAME_ENV]["valueFrom"] == {
            "fieldRef": {"fieldPath": "metadata.labels['ray.io/cluster']"}}
        assert "secretKeyRef" in env["RAYFLEET_API_KEYS"]["valueFrom"], name
        assert env["RAYFLEET_STATE_STORE"]["value"].startswith(("redis://", "rediss://")), name
        assert "REDIS_PASSWORD" not in env, "KubeRay rejects REDIS_PASSWORD on the head with GCS fault tolerance"


def test_worker_groups_carry_their_accelerator_bounds_and_placement(reports):
    values = yaml.safe_load((REPO / "examples" / "values-heterogeneous.yaml").read_text())
    cluster = only(rendered(reports["values-heterogeneous"]), "RayService")["spec"]["rayClusterConfig"]
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == [g["name"] for g in values["workerGroups"]]
    for want, group in zip(values["workerGroups"], cluster["workerGroupSpecs"]):
        accelerator = want["accelerator"]
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (
            want["replicas"], want["minReplicas"], want["maxReplicas"])
        assert group["resources"] == {f"accelerator_type:{accelerator['type']}": "1"}
        pod = group["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == accelerator["count"]
        (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        (expression,) = term["matchExpressions"]
        assert {kuberay.accelerator_type_from_node_labels({expression["key"]: v}) for v in expression["values"]} == {
            accelerator["type"]}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_the_scaler_reads_the_chart_cluster_groups_with_their_accelerators(reports):
    """The RayCluster KubeRay builds from the RayService has its spec; a stub API hands it to the scaler."""
    rayservice = only(rendered(reports["values-heterogeneous"]), "RayService")
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "llm-rayfleet-x7k2p"},
               "spec": rayservice["spec"]["rayClusterConfig"]}

    class OneClusterAPI:
        def get_namespaced_custom_object(self, group, version, namespace, plural, name):
            return cluster

    groups = kuberay.KubeRayScaler("llm-rayfleet-x7k2p", "llm", api=OneClusterAPI()).worker_groups()
    assert {name: (g.accelerator_type, g.min_replicas, g.max_replicas) for name, g in groups.items()} == {
        "h100": ("H100", 1, 2), "l4": ("L4", 0, 8)}


@pytest.mark.parametrize("values_file", [CHART / "values.yaml", CHART / "ci" / "all-features-values.yaml"])
def test_accelerator_node_labels_map_back_to_their_ray_accelerator_type(values_file):
    accelerators = {**yaml.safe_load((CHART / "values.yaml").read_text())["accelerators"],
                    **yaml.safe_load(values_file.read_text()).get("accelerators", {})}
    for accelerator_type, products in accelerators["products"].items():
        for product in products:
            labels = {accelerators["nodeLabel"]: product}
            assert kuberay.accelerator_type_from_node_labels(labels) == accelerator_type, labels


@pytest.mark.parametrize("case", VALUES_FILES)
def test_services_reach_serve_ports_of_ready_ray_pods(reports, case):
    objects = rendered(reports[case])
    cluster = only(objects, "RayService")["spec"]["rayClusterConfig"]
    fullname = only(objects, "RayService")["metadata"]["name"]
    for endpoint, port_name in [("http", "serve"), ("grpc", "serve-grpc"), ("dashboard", "serve")]:
        service = only(objects, "Service", f"{fullname}-{endpoint}")
        assert service["spec"]["selector"]["ray.io/serve"] == "true"
        assert service["spec"]["selector"]["app.kubernetes.io/component"] == "ray"
        (port,) = service["spec"]["ports"]
        assert port["targetPort"] == port_name
        for name, group in ray_groups(cluster):
            container = group["template"]["spec"]["containers"][0]
            assert port_name in {p["name"] for p in container["ports"]}, (endpoint, name)
            assert group["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "ray"


def test_bundled_redis_backs_gcs_fault_tolerance_and_the_state_store(reports):
    objects = rendered(reports["default"])
    cluster = only(objects, "RayService")["spec"]["rayClusterConfig"]
    redis = only(objects, "StatefulSet", "rayfleet-redis")
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert "--appendonly" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
    ft = cluster["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == "rayfleet-redis.llm.svc:6379"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "rayfleet-redis", "key": "redis-password"}
    only(objects, "Service", "rayfleet-redis")
    assert "redis-password" in only(objects, "Secret", "rayfleet-redis")["data"]


def test_helm_test_hook_lists_models_and_asks_one_completion(reports):
    (hook,) = reports["default"]["hooks"]
    assert hook["events"] == ["test"]
    (pod,) = hook["objects"]
    container = pod["spec"]["containers"][0]
    script = container["args"][0]
    assert "/v1/models" in script and "/v1/completions" in script
    env = {e["name"]: e for e in container["env"]}
    assert env["MODEL"]["value"] == "qwen2-5-7b"
    assert env["BASE_URL"]["value"] == "http://rayfleet-http:8000"


def test_notes_tell_where_the_endpoints_are(reports):
    notes = reports["default"]["notes"]
    for text in ("rayfleet-http:8000", "rayfleet-grpc:9000", "rayfleet-dashboard:8000/dashboard", "helm test"):
        assert text in notes


def test_optional_parts_render_when_enabled(reports):
    kinds = {o["kind"] for o in rendered(reports["ci-all-features-values"])}
    assert {"Ingress", "ServiceMonitor", "PodMonitor", "NetworkPolicy", "RayJob"} <= kinds
    assert "StatefulSet" not in kinds, "external Redis: no bundled StatefulSet"


def test_rl_job_runs_on_its_own_cluster_with_its_own_fleet_spec(reports):
    objects = rendered(reports["ci-all-features-values"])
    job = only(objects, "RayJob", "fleet-rl-7")
    assert job["spec"]["entrypoint"].startswith("python -m rayfleet.control_plane.rl ")
    assert [g["groupName"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]] == ["h100"]
    assert "gcsFaultToleranceOptions" not in job["spec"]["rayClusterSpec"]
    spec = parse_spec(yaml.safe_load(only(objects, "ConfigMap", "fleet-rl-7")["data"]["fleet.yaml"]))
    assert (spec.name, spec.state_store) == ("rl-rollouts", "memory://")
    assert spec.pool("rollout").rollout
    config = parse_rl_config(yaml.safe_load(only(objects, "ConfigMap", "fleet-rl-7")["data"]["rl.yaml"]))
    assert (config.rollout_pool, config.staleness_bound) == ("rollout", 2)


def test_grafana_dashboards_come_from_the_dashboards_folder(reports):
    configmap = only(rendered(reports["grafana"]), "ConfigMap", "rayfleet-grafana-dashboards")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((REPO / "dashboards" / "grafana" / "rayfleet-fleet.json").read_text())
    assert json.loads(configmap["data"]["rayfleet-fleet.json"]) == shipped
    assert shipped["title"] == "rayfleet: fleet" and shipped["panels"]


def test_grafana_dashboards_without_any_dashboard_fail_with_the_reason(reports):
    error = reports["grafana-without-dashboards"]["error"]
    assert "grafana.dashboards.enabled: the chart holds no dashboards/grafana/*.json" in error


def test_switches_off_leave_out_rbac_api_keys_autoscaling_and_gcs_fault_tolerance(reports):
    objects = rendered(reports["switches-off"])
    assert {o["kind"] for o in objects} == {"RayService", "ConfigMap", "Service"}
    cluster = only(objects, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster
    assert "gcsFaultToleranceOptions" not in cluster
    for name, group in ray_groups(cluster):
        assert group["template"]["spec"]["serviceAccountName"] == "existing", name
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert "RAYFLEET_API_KEYS" not in env and "RAYFLEET_REDIS_PASSWORD" not in env
        assert env["RAYFLEET_STATE_STORE"]["value"] == "redis://redis.example:6379/1"
    spec = parse_spec(yaml.safe_load(only(objects, "ConfigMap")["data"]["fleet.yaml"]))
    assert spec.ingress.api_keys_env is None
    assert spec.ingress.auth == "none", "serving without keys must be stated in the spec, not implied"


@pytest.mark.parametrize("case", [c for c in CASES if c != "switches-off"])
def test_ray_pods_run_as_non_root_without_capabilities(reports, case):
    cluster = only(rendered(reports[case]), "RayService")["spec"]["rayClusterConfig"]
    for name, group in ray_groups(cluster):
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        container = pod["containers"][0]["securityContext"]
        assert container["allowPrivilegeEscalation"] is False and container["capabilities"]["drop"] == ["ALL"], name


def test_network_policy_is_on_by_default_and_keeps_ray_ports_inside(reports):
    policy = only(rendered(reports["default"]), "NetworkPolicy", "rayfleet-ray")["spec"]
    open_ports = {p["port"] for rule in policy["ingress"] if "from" not in rule for p in rule["ports"]}
    assert open_ports <= {8000, 9000, 8080}, "only the API and metrics ports may be reachable from outside"
    operator_rule = next(r for r in policy["ingress"] if "namespaceSelector" in r["from"][0])
    assert 8265 in {p["port"] for p in operator_rule["ports"]}


def test_ingress_publishes_no_admin_route(reports):
    ingress = only(rendered(reports["ci-all-features-values"]), "Ingress")
    paths = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert paths and "/" not in paths and not any(p.startswith("/v1/fleet") for p in paths)


def test_admin_keys_come_from_the_secret(reports):
    objects = rendered(reports["default"])
    cluster = only(objects, "RayService")["spec"]["rayClusterConfig"]
    env = {e["name"]: e for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAYFLEET_ADMIN_KEYS"]["valueFrom"]["secretKeyRef"]["key"] == "admin-keys"
    assert set(only(objects, "Secret", "rayfleet-api-keys")["data"]) == {"api-keys", "admin-keys"}
    spec = parse_spec(yaml.safe_load(only(objects, "ConfigMap")["data"]["fleet.yaml"]))
    assert (spec.ingress.api_keys_env, spec.ingress.admin_keys_env) == ("RAYFLEET_API_KEYS", "RAYFLEET_ADMIN_KEYS")
