"""monolith-client as a product backend installs it: `pip install ./clients/python` into a fresh
virtual environment (no TensorFlow, no server package), then a Predict and a ReportActions call
against `monolith up`, plain and over TLS (serving, the joiner and NATS with a
self-signed certificate, which the client and every role trust as their CA; plaintext is refused)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.processes import MONOLITH, Command
from helpers.tls import HAVE_OPENSSL, self_signed
from helpers.waiting import wait_for
from monolith.common.errors import Unavailable
from monolith.harness.manifest import StackError, StackManifest
from monolith.streams.config import StreamsConfig
from monolith.streams.jetstream import connect

REPO = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).with_name("uv")
START_TIMEOUT = 300.0
FREE_PORTS = ("--serving-port", "0", "--joiner-port", "0", "--nats-port", "0")

# Run by the fresh environment's interpreter: one ranking call and one click, as JSON.
CALLS = """
import json, sys, time
started = time.perf_counter()
import monolith_client
imported = time.perf_counter() - started
from monolith_client import ActionError, MonolithClient, PredictError

serving, joiner, tls = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
user = {"user_id": 196, "age": 49, "gender": "M", "occupation": "writer", "zip": "55105"}
candidates = {"movie_id": [242, 302, 377], "genres": [["Comedy"], ["Crime", "Film-Noir"], ["Action"]]}
out = {"import_s": imported, "heavy_modules": sorted({m.split(".")[0] for m in sys.modules} & {"tensorflow", "monolith"})}
with MonolithClient(serving, joiner_address=joiner, timeout=30, **tls) as client:
    out["scores"] = client.score(user, candidates, request_id="venv-1").tolist()
    out["accepted"] = client.report_actions([("venv-1", 302, "click")])
if tls:
    with MonolithClient(serving, joiner_address=joiner, timeout=5, retries=0) as plain:
        for name, call in (("predict", lambda: plain.score(user, candidates)),
                           ("actions", lambda: plain.report_action("venv-2", 242))):
            try:
                call()
                out[f"plaintext_{name}"] = "answered"
            except (PredictError, ActionError) as exc:
                out[f"plaintext_{name}"] = exc.code.name
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def light_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a fresh virtual environment with monolith-client installed."""
    venv = tmp_path_factory.mktemp("light-venv") / "venv"
    subprocess.run([str(UV), "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, timeout=120)
    # --compile-bytecode: as pip installs (byte-compiled), so an import reads no source.
    installed = subprocess.run([str(UV), "pip", "install", "--quiet", "--compile-bytecode", "--python",
                                str(venv / "bin" / "python"), str(REPO / "clients" / "python")],
                               capture_output=True, text=True, timeout=600)  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    listed = subprocess.run([str(UV), "pip", "list", "--python", str(venv / "bin" / "python"), "--format", "json"],
                            check=True, capture_output=True, text=True, timeout=60)  # fmt: skip
    packages = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "monolith-client" in packages
    assert not {p for p in packages if p.startswith("tensorflow") or p in ("monolith", "keras")}, sorted(packages)
    return venv / "bin" / "python"


def _stack(data_dir: Path, output: Path, *flags: str) -> Iterator[StackManifest]:
    up = Command([MONOLITH, "up", "--data-dir", str(data_dir), "--fresh", *FREE_PORTS, *flags], output)
    try:

        def written() -> StackManifest | None:
            assert up.alive(), f"monolith up exited with {up.process.returncode}: {up.describe()}"
            try:
                manifest = StackManifest.load(str(data_dir / "stack.json"))
            except StackError:
                return None
            return manifest if manifest.pid == up.pid else None

        yield wait_for(written, "stack.json", timeout=START_TIMEOUT, interval=0.2)
    finally:
        up.stop(timeout=120)


def _calls(python: Path, stack: StackManifest) -> dict:
    done = subprocess.run([str(python), "-c", CALLS, stack.serving, stack.joiner, json.dumps(stack.client_tls())],
                          capture_output=True, text=True, timeout=120, cwd="/")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_fresh_environment_scores_and_reports_against_monolith_up_in_plaintext(light_python, tmp_path) -> None:
    for stack in _stack(tmp_path / "stack", tmp_path / "up"):
        result = _calls(light_python, stack)
    assert result["heavy_modules"] == []
    assert len(result["scores"]) == 3 and all(0.0 < s < 1.0 for s in result["scores"])
    assert result["accepted"] == 1


@pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl is needed to make a test certificate")
def test_a_fresh_environment_scores_and_reports_over_tls_and_plaintext_is_refused(light_python, tmp_path) -> None:
    cert, key = self_signed(tmp_path / "tls")
    for stack in _stack(tmp_path / "stack", tmp_path / "up", "--tls-cert", cert, "--tls-key", key):
        assert stack.client_tls() == {"tls_ca": cert, "tls_server_name": "localhost"}
        result = _calls(light_python, stack)
        with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"):  # NATS too: every role verified it
            asyncio.run(_nats_plaintext(stack.nats))
    assert result["heavy_modules"] == []
    assert len(result["scores"]) == 3 and result["accepted"] == 1
    assert result["plaintext_predict"] == result["plaintext_actions"] == "UNAVAILABLE"


async def _nats_plaintext(url: str) -> None:
    client = await connect(StreamsConfig(url=url), "test-plaintext", attempts=1)
    await client.close()
