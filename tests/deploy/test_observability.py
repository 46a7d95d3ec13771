"""The Prometheus rules and the Grafana dashboard shipped with the chart.

promtool (Debian's `prometheus` package, which `.ci/run` installs) checks the rule file and
runs its unit tests (prometheus_rules_test.yaml: each alert fires on the series that should
fire it and stays quiet otherwise). Every series the rules and the dashboard query is one
the roles export, so a renamed metric cannot leave a silent panel or a dead alert. The
scrape of a running stack by a real Prometheus is in tests/e2e/test_load_and_metrics.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FILES = REPO / "deploy" / "helm" / "monolith" / "files"
RULES = FILES / "prometheus" / "rules.yaml"
DASHBOARD = FILES / "grafana" / "monolith.json"


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed: it comes with Debian's prometheus package (.ci/run installs it)")
    return promtool


def _exported_metrics() -> set[str]:
    """Every series name the roles expose: metric names in the source, with the suffixes
    prometheus_client adds (counters `_total`, histograms `_bucket`/`_sum`/`_count`)."""
    names: set[str] = set()
    for path in (REPO / "services" / "monolith").rglob("*.py"):
        for kind, name in re.findall(r"(Counter|Gauge|Histogram|CounterMetricFamily|GaugeMetricFamily)\(\s*\"([a-z_]+)\"",
                                     path.read_text()):  # fmt: skip
            if kind.startswith("Counter"):
                names.add(name if name.endswith("_total") else name + "_total")
            elif kind == "Histogram":
                names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
            else:
                names.add(name)
    return names


def _queried_metrics(expression: str) -> set[str]:
    """Metric names in a PromQL expression (recording-rule names have a colon and are skipped)."""
    without_strings = re.sub(r'"[^"]*"', '""', expression)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    return set(re.findall(r"(?<![:\w])((?:grpc_server|monolith)_[a-z_]+)\b", without_labels))


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_rules_pass_promtool_check() -> None:
    result = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_exactly_when_they_should() -> None:
    tests = Path(__file__).with_name("prometheus_rules_test.yaml")
    result = subprocess.run([_promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_cover_freshness_lag_errors_and_checkpoint_age() -> None:
    alerts = {r["alert"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert {"MonolithServingStale", "MonolithTrainerFallingBehind", "MonolithGrpcErrors", "MonolithCheckpointTooOld"} <= set(alerts)


def test_rules_and_dashboard_query_only_exported_metrics() -> None:
    exported = _exported_metrics()
    rules = yaml.safe_load(RULES.read_text())
    expressions = [r["expr"] for g in rules["groups"] for r in g["rules"]] + _dashboard_expressions()
    queried = set().union(*(_queried_metrics(e) for e in expressions))
    assert queried, "no metric found in the expressions"
    assert not queried - exported, f"queried but exported by no role: {sorted(queried - exported)}"


def test_metric_names_follow_the_conventions() -> None:
    for name in _exported_metrics():
        assert name.startswith(("grpc_server_", "monolith_")), name
        if "seconds" in name or "bytes" in name:
            assert re.search(r"_(seconds|bytes)(_total|_bucket|_sum|_count)?$", name), f"{name}: the unit ends the name"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, passes promtool as a recording rule."""
    rules = [
        {"record": f"dashboard:panel_{i}", "expr": e.replace("$__rate_interval", "5m").replace("$namespace", ".*")}
        for i, e in enumerate(_dashboard_expressions())
    ]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_a_grafana_dashboard_on_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "monolith"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
