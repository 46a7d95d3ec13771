"""stack.json: what it names, that it is replaced whole, and when a stack counts as running."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from monolith.harness.stack.manifest import remove_manifest, running_stack_pid, stack_manifest, write_manifest
from monolith.harness.stack.parts import StackSettings, allocate_ports, stack_parts


def test_the_manifest_names_every_address_the_clients_need(tmp_path) -> None:
    settings = StackSettings(data_dir=str(tmp_path), config="/conf/model.yaml", partitions=3)
    ports = allocate_ports(nats_port=14222)
    parts = stack_parts(settings, ports)

    manifest = stack_manifest(settings, ports, parts, pid=1234)

    assert manifest["nats"] == "nats://127.0.0.1:14222"
    assert manifest["partitions"] == 3
    assert manifest["config"] == "/conf/model.yaml"
    assert manifest["serving"] == f"127.0.0.1:{ports.serving.port}"
    assert manifest["joiner"] == f"127.0.0.1:{ports.joiner.port}"
    assert manifest["dense_ps"] == f"127.0.0.1:{ports.dense_ps.port}"
    assert manifest["embedding_ps_training"] == [f"127.0.0.1:{e.port}" for e in ports.training]
    assert manifest["embedding_ps_serving"] == [f"127.0.0.1:{e.port}" for e in ports.serving_shards]
    assert set(manifest["metrics"]) == {p.name for p in parts} - {"nats"}
    assert manifest["metrics"]["trainer"] == f"http://127.0.0.1:{ports.trainer_metrics}/metrics"
    assert manifest["logs"] == os.path.join(str(tmp_path), "logs")
    assert manifest["pid"] == 1234


def test_the_manifest_is_replaced_whole_and_removed(tmp_path) -> None:
    path = str(tmp_path / "stack.json")
    write_manifest(path, {"pid": 1, "serving": "old"})

    write_manifest(path, {"pid": 2, "serving": "new"})

    assert json.loads((tmp_path / "stack.json").read_text()) == {"pid": 2, "serving": "new"}
    assert os.listdir(tmp_path) == ["stack.json"]  # no temporary file left behind
    remove_manifest(path)
    remove_manifest(path)  # already gone: fine
    assert os.listdir(tmp_path) == []


def test_a_stack_counts_as_running_only_while_its_process_lives(tmp_path) -> None:
    path = str(tmp_path / "stack.json")
    assert running_stack_pid(path) is None  # no file
    (tmp_path / "stack.json").write_text("{not json")
    assert running_stack_pid(path) is None
    write_manifest(path, {"pid": os.getpid()})
    assert running_stack_pid(path) is None  # ours: a leftover of this very process

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_manifest(path, {"pid": child.pid})
        assert running_stack_pid(path) == child.pid
    finally:
        child.kill()
        child.wait()
    assert running_stack_pid(path) is None  # stale: its `up` is gone
