"""skaffold.yaml against what it points at: the Dockerfile, the chart, the values the chart reads.

No skaffold binary can be installed here, so these checks stand in for `skaffold diagnose`:
every path exists, the artifact's image reaches exactly the chart values every workload's
image comes from, each profile's JSON patches apply and the resulting values render (schema
included), and the port-forwards name Services the release really has, on their ports.
"""

from __future__ import annotations

import copy
import itertools
import re

import pytest
import yaml
from deploy_tools import REPO, render, run_helm

SKAFFOLD = yaml.safe_load((REPO / "skaffold.yaml").read_text())


def _release(config: dict) -> dict:
    (release,) = config["deploy"]["helm"]["releases"]
    return release


def _apply(config: dict, patches: list[dict]) -> dict:
    """Skaffold's profile patches (JSON Patch `add`/`replace`; keys may contain dots)."""
    config = copy.deepcopy(config)
    for patch in patches:
        assert patch["op"] in ("add", "replace"), patch
        *parents, last = patch["path"].lstrip("/").split("/")
        node = config
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        assert patch["op"] == "add" or last in node, f"replace of a missing {patch['path']}"
        node[last] = patch["value"]
    return config


def _values(release: dict, image: str = "registry.test/monolith", tag: str = "abc1234") -> dict:
    """The values skaffold hands helm: setValues and setValueTemplates, as nested maps."""
    templates = {"{{.IMAGE_REPO_monolith}}": image, "{{.IMAGE_TAG_monolith}}": tag}
    flat = {**release.get("setValues", {}), **{k: templates[v] for k, v in release["setValueTemplates"].items()}}
    values: dict = {}
    for dotted, value in flat.items():
        *parents, last = dotted.split(".")
        node = values
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return values


def test_schema_version_and_the_build_artifact() -> None:
    assert re.fullmatch(r"skaffold/v4beta\d+", SKAFFOLD["apiVersion"]) and SKAFFOLD["kind"] == "Config"
    (artifact,) = SKAFFOLD["build"]["artifacts"]
    context = REPO / artifact["context"]
    assert (context / artifact["docker"]["dockerfile"]).is_file()
    assert (context / ".dockerignore").is_file(), "the build context is the repository: keep it filtered"


def test_release_uses_the_chart_and_its_image_values(helm) -> None:
    release = _release(SKAFFOLD)
    chart = REPO / release["chartPath"]
    assert (chart / "Chart.yaml").is_file() and (chart / "values.schema.json").is_file()
    (artifact,) = SKAFFOLD["build"]["artifacts"]
    suffix = re.sub(r"[/.:-]", "_", artifact["image"])  # how skaffold names an artifact's template fields
    assert release["setValueTemplates"] == {
        "image.repository": f"{{{{.IMAGE_REPO_{suffix}}}}}",
        "image.tag": f"{{{{.IMAGE_TAG_{suffix}}}}}",
    }
    docs = render(helm, _values(release))
    images = {c["image"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job", "Pod")
              for c in (d["spec"] if d["kind"] == "Pod" else d["spec"]["template"]["spec"])["containers"]}  # fmt: skip
    assert images == {"registry.test/monolith:abc1234"}, "every workload must run the image skaffold built"


@pytest.mark.parametrize(
    "profiles",
    # Every combination: the patches add distinct keys, so their order does not matter.
    [list(c) for n in range(len(SKAFFOLD["profiles"]) + 1) for c in itertools.combinations([p["name"] for p in SKAFFOLD["profiles"]], n)],
    ids=lambda p: "+".join(p) or "none",
)
def test_profiles_apply_and_render(helm, profiles) -> None:
    config = SKAFFOLD
    by_name = {p["name"]: p for p in SKAFFOLD["profiles"]}
    for name in profiles:
        config = _apply(config, by_name[name]["patches"])
    release = _release(config)
    values = _values(release)
    result = run_helm(helm, "template", release["name"], str(REPO / release["chartPath"]), "-n", release["namespace"], values=values)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert (("Job", "monolith-loadgenerator-master") in kinds) == ("loadtest" in profiles)
    assert (("ServiceMonitor", "monolith-metrics") in kinds) == ("monitoring" in profiles)
    if "small" in profiles:
        (training,) = [d for d in docs if d["metadata"]["name"] == "monolith-embedding-ps-training" and d["kind"] == "StatefulSet"]
        assert training["spec"]["replicas"] == 1


def test_port_forwards_name_release_services_and_their_ports(helm) -> None:
    release = _release(SKAFFOLD)
    assert release["namespace"] == "monolith"
    result = run_helm(helm, "template", release["name"], str(REPO / release["chartPath"]), "-n", release["namespace"],
                      values=_values(release))  # fmt: skip
    services = {d["metadata"]["name"]: d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "Service"}
    forwarded = set()
    for forward in SKAFFOLD["portForward"]:
        assert forward["resourceType"] == "service" and forward["address"] == "127.0.0.1"
        assert forward["namespace"] == release["namespace"]
        service = services[forward["resourceName"]]
        assert forward["port"] in {p["port"] for p in service["spec"]["ports"]}
        forwarded.add(service["spec"]["selector"]["app.kubernetes.io/component"])
    assert forwarded == {"serving", "joiner"}, "Predict and ReportActions are what a developer calls"

