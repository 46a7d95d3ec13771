"""`monolith` commands that load TensorFlow print none of its start-up lines on stderr.

TensorFlow prints, before its logging honours TF_CPP_MIN_LOG_LEVEL, absl's banner, oneDNN
and CUDA notes, CPU-feature notes, and a cuInit error at the first device scan. These
tests run the real commands as a user would (the console script, default environment)
and read their stderr.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.processes import MONOLITH, ParameterServers
from monolith.model.config import default_config_path

# What TensorFlow's start-up output looks like: any absl/glog-prefixed native line (the
# services log through Python's logging, which never prints this prefix), or the words of
# the known start-up lines.
NOISE = re.compile(
    r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\]|absl::InitializeLog|oneDNN|cuInit|cuda drivers|cudart|"
    r"cpu_feature_guard|This TensorFlow binary is optimized|^WARNING:absl:",
    re.MULTILINE,
)


def _environment() -> dict[str, str]:
    """The caller's environment without any TensorFlow logging setting of its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP_", "TF_ENABLE_ONEDNN"))}


def _assert_quiet(name: str, stderr: str) -> None:
    assert NOISE.search(stderr) is None, f"{name} printed TensorFlow start-up lines:\n{stderr[-3000:]}"


@pytest.mark.parametrize("command", ["serving", "trainer"])
def test_help_of_a_role_that_imports_tensorflow_is_quiet(command: str) -> None:
    done = subprocess.run([MONOLITH, command, "--help"], check=False, capture_output=True, text=True, timeout=120,
                          env=_environment())  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"usage: monolith {command}")
    _assert_quiet(f"monolith {command} --help", done.stderr)
    assert done.stderr == ""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ParameterServers]:
    """One embedding-PS shard and a dense-PS as processes."""
    servers = ParameterServers.start(tmp_path, default_config_path(), num_shards=1)
    try:
        servers.wait_healthy(timeout=60)
        yield servers
    finally:
        servers.stop()


def test_a_training_run_is_quiet(cluster: ParameterServers) -> None:
    done = subprocess.run(
        [MONOLITH, "trainer", "--config", default_config_path(), "--embedding-ps", cluster.shards[0],
         "--dense-ps", cluster.dense, "--limit", "1000"],
        check=False, capture_output=True, text=True, timeout=180, env=_environment(),
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    _assert_quiet("monolith trainer", done.stderr)
    for role in cluster.roles:
        _assert_quiet(role.log_path.name, role.log())
