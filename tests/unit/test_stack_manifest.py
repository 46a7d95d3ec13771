"""stack.json: one typed manifest that names every address, is replaced whole, and says when a stack runs."""

from __future__ import annotations

import os
import sys

import pytest

from helpers.processes import Command
from monolith.harness.manifest import StackError, StackManifest, remove_manifest, running_stack_pid
from monolith.harness.stack.manifest import stack_manifest
from monolith.harness.stack.parts import StackSettings, allocate_ports, stack_parts


def _manifest(tmp_path, pid: int = 1234, **settings: object) -> StackManifest:
    config = StackSettings(data_dir=str(tmp_path), config="/conf/model.yaml", partitions=3, **settings)
    ports = allocate_ports(nats_port=14222)
    return stack_manifest(config, ports, stack_parts(config, ports), pid=pid)


def test_the_manifest_names_every_address_the_clients_need(tmp_path) -> None:
    settings = StackSettings(data_dir=str(tmp_path), config="/conf/model.yaml", partitions=3, join_window=10.0,
                             trainer_consumer="online")  # fmt: skip
    ports = allocate_ports(nats_port=14222)
    parts = stack_parts(settings, ports)

    manifest = stack_manifest(settings, ports, parts, pid=1234)

    assert manifest.nats == "nats://127.0.0.1:14222"
    assert manifest.partitions == 3
    assert manifest.config == "/conf/model.yaml"
    assert manifest.serving == f"127.0.0.1:{ports.serving.port}"
    assert manifest.joiner == f"127.0.0.1:{ports.joiner.port}"
    assert manifest.dense_ps == f"127.0.0.1:{ports.dense_ps.port}"
    assert manifest.controller == f"127.0.0.1:{ports.controller.port}"
    assert manifest.training_shards == tuple(f"127.0.0.1:{e.port}" for e in ports.training)
    assert manifest.serving_shards == tuple(f"127.0.0.1:{e.port}" for e in ports.serving_shards)
    assert set(manifest.metrics) == {p.name for p in parts} - {"nats"}
    assert manifest.metrics_url("trainer") == f"http://127.0.0.1:{ports.trainer_metrics}/metrics"
    assert manifest.logs == os.path.join(str(tmp_path), "logs")
    assert manifest.pid == 1234
    # The joiner's window as given, its lateness as the joiner defaults it.
    assert (manifest.join_window, manifest.join_lateness) == (10.0, 60.0)
    # The consumer the manifest names is the one the trainer and the controller were started with.
    assert manifest.trainer_consumer == "online"
    for part in parts:
        if part.name in ("trainer", "controller"):
            assert ("--consumer", "online") in zip(part.argv, part.argv[1:]), part.argv


def test_the_manifest_reads_back_as_written_and_is_replaced_whole(tmp_path) -> None:
    path = str(tmp_path / "stack.json")
    first, second = _manifest(tmp_path, pid=1), _manifest(tmp_path, pid=2)
    first.write(path)

    second.write(path)

    assert StackManifest.load(path) == second
    assert os.listdir(tmp_path) == ["stack.json"]  # no temporary file left behind
    remove_manifest(path)
    remove_manifest(path)  # already gone: fine
    assert os.listdir(tmp_path) == []


def test_a_bad_manifest_is_one_clear_error(tmp_path) -> None:
    path = tmp_path / "stack.json"
    with pytest.raises(StackError, match="not found: start the stack"):
        StackManifest.load(str(path))
    path.write_text("{not json")
    with pytest.raises(StackError, match="not a stack manifest"):
        StackManifest.load(str(path))
    path.write_text(_manifest(tmp_path).model_dump_json().replace('"partitions":3', '"partitions":"3"'))
    with pytest.raises(StackError, match="partitions"):
        StackManifest.load(str(path))
    with pytest.raises(StackError, match="no metrics for 'nope'"):
        _manifest(tmp_path).metrics_url("nope")


def test_a_stack_counts_as_running_only_while_its_process_lives(tmp_path) -> None:
    path = str(tmp_path / "stack.json")
    assert running_stack_pid(path) is None  # no file
    (tmp_path / "stack.json").write_text("{not json")
    assert running_stack_pid(path) is None
    _manifest(tmp_path, pid=os.getpid()).write(path)
    assert running_stack_pid(path) is None  # ours: a leftover of this very process

    with Command([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "child") as child:
        _manifest(tmp_path, pid=child.pid).write(path)
        assert running_stack_pid(path) == child.pid
    assert running_stack_pid(path) is None  # stale: its `up` is gone (stopped and reaped)


def test_model_servings_cache_refreshes_four_times_per_sync_at_most_at_its_default(tmp_path) -> None:
    ports = allocate_ports()
    for sync, refresh in ((0.1, "0.025"), (1.0, "0.1"), (30.0, "0.1")):
        parts = stack_parts(StackSettings(data_dir=str(tmp_path), config="/c.yaml", sync_interval=sync), ports)
        [serving] = [p for p in parts if p.name == "serving"]
        assert ("--embedding-cache-refresh", refresh) in zip(serving.argv, serving.argv[1:]), serving.argv


def test_the_manifest_says_how_to_reach_a_tls_stack(tmp_path) -> None:
    assert _manifest(tmp_path).client_tls() == {} and _manifest(tmp_path).tls is None
    manifest = _manifest(tmp_path, tls_cert="/tls/c.crt", tls_key="/tls/c.key")
    assert manifest.client_tls() == {"tls_ca": "/tls/c.crt", "tls_server_name": "localhost"}
    assert (manifest.tls.ca, manifest.tls.server_name) == ("/tls/c.crt", "localhost")
    path = str(tmp_path / "stack.json")
    manifest.write(path)
    assert StackManifest.load(path) == manifest
