"""Helpers of the deployment tests: the tools `make tools` fetches, and rendering the chart."""

from __future__ import annotations

import functools
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "monolith"
TOOLS = REPO / ".tools"
RELEASE = "rel"
NAMESPACE = "monolith"
# What a production install (and skaffold) sets: the image pinned by content.
DIGEST = "sha256:" + "ab" * 32


@functools.cache
def _fetch_tools() -> str | None:
    """Runs `make tools` once when a tool is missing; the reason it failed, or None."""
    if (TOOLS / "bin" / "helm").exists() and (TOOLS / "checkov" / ".installed").exists():
        return None
    result = subprocess.run(["make", "-s", "tools"], cwd=REPO, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        return f"`make tools` could not fetch helm/checkov (no package index?): {result.stderr.strip()[-500:]}"
    return None


def tool(relative: str) -> Path:
    """A tool under .tools/, fetched by `make tools` if needed; skips the test only when it cannot be had."""
    path = TOOLS / relative
    if not path.exists():
        reason = _fetch_tools()
        if reason:
            pytest.skip(reason)
    assert path.exists(), f"`make tools` ran but {path} is missing"
    return path


def run_helm(helm: Path, *args: str, values: dict | None = None) -> subprocess.CompletedProcess:
    """helm with the values written to a file (typed, unlike --set strings)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(values or {}, f)
        f.flush()
        return subprocess.run([str(helm), *args, "-f", f.name], capture_output=True, text=True, timeout=120)


@functools.cache
def _render(helm: Path, values_yaml: str) -> tuple[dict, ...]:
    result = run_helm(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, values=yaml.safe_load(values_yaml))
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(helm: Path, values: dict | None = None) -> list[dict]:
    """The chart's objects for `values` (cached: scenarios render once per session)."""
    return list(_render(helm, yaml.safe_dump(values or {}, sort_keys=True)))
