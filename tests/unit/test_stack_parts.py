"""`monolith up`'s parts: each command line is one its role accepts, wired to the right peers."""

from __future__ import annotations

import argparse
import importlib
import os

import pytest

from monolith.cli import _COMMANDS
from monolith.harness.stack.parts import (
    CONTROLLER,
    DENSE_PS,
    JOINER,
    NATS,
    SERVING,
    SHARDS,
    TRAINER,
    Part,
    StackSettings,
    allocate_ports,
    serving_shard,
    stack_parts,
    training_shard,
)
from monolith.harness.stack.supervisor import Supervisor

SETTINGS = StackSettings(data_dir="/data/stack", config="/conf/model.yaml", partitions=4, sync_interval=0.5,
                         checkpoint_interval=12.5)  # fmt: skip


@pytest.fixture(scope="module")
def stack() -> tuple[dict[str, Part], object]:
    ports = allocate_ports(nats_port=14222, joiner_port=18600, serving_port=18500)
    return {p.name: p for p in stack_parts(SETTINGS, ports)}, ports


def role_args(part: Part) -> list[str]:
    """The arguments after `python -m monolith.cli` (and the global --log-level)."""
    argv = list(part.argv)
    assert argv[1:3] == ["-m", "monolith.cli"], argv
    assert argv[3:5] == ["--log-level", "INFO"], argv
    return argv[5:]


def parse_as_role(part: Part) -> argparse.Namespace:
    """Parses a part's command line with its role's own flags (so a renamed flag fails here)."""
    role, *rest = role_args(part)
    parser = argparse.ArgumentParser(prog=f"monolith {role}", exit_on_error=False)
    importlib.import_module(_COMMANDS[role][0]).add_arguments(parser)
    return parser.parse_args(rest)


def test_the_stack_has_every_part_in_a_valid_start_order(stack, tmp_path) -> None:
    parts, _ = stack
    names = list(parts)

    assert set(names) == {
        NATS, DENSE_PS, JOINER, TRAINER, SERVING, CONTROLLER,
        *(training_shard(i) for i in range(SHARDS)), *(serving_shard(i) for i in range(SHARDS)),
    }  # fmt: skip
    Supervisor(list(parts.values()), str(tmp_path))  # refuses a part listed before what it waits for
    assert set(parts[SERVING].after) >= {NATS, DENSE_PS, TRAINER, serving_shard(0), serving_shard(1)}
    assert set(parts[TRAINER].after) >= {NATS, DENSE_PS, CONTROLLER, training_shard(0), training_shard(1)}
    assert set(parts[CONTROLLER].after) == {NATS, DENSE_PS, training_shard(0), training_shard(1)}
    assert parts[JOINER].after == (NATS,)
    for i in range(SHARDS):
        assert parts[serving_shard(i)].after == (training_shard(i),)


@pytest.mark.parametrize("name", [training_shard(0), serving_shard(1), DENSE_PS, JOINER, TRAINER, SERVING])
def test_every_role_accepts_its_command_line(stack, name) -> None:
    parts, _ = stack

    args = parse_as_role(parts[name])

    assert args.config == SETTINGS.config


def test_requested_ports_are_kept_and_the_others_are_distinct(stack) -> None:
    parts, ports = stack

    assert parts[NATS].address == "nats://127.0.0.1:14222"
    assert parts[JOINER].address == "127.0.0.1:18600"
    assert parts[SERVING].address == "127.0.0.1:18500"
    assert len(set(ports.all())) == len(ports.all())
    assert all(0 < p < 65536 for p in ports.all())


def test_duplicate_requested_ports_are_refused() -> None:
    with pytest.raises(ValueError, match="must differ"):
        allocate_ports(nats_port=9000, serving_port=9000)


def test_shards_listen_where_the_stack_says_and_serving_shards_follow_their_training_shard(stack) -> None:
    parts, _ = stack
    for i in range(SHARDS):
        training, serving = parse_as_role(parts[training_shard(i)]), parse_as_role(parts[serving_shard(i)])

        assert (training.shard, training.num_shards, training.role) == (i, SHARDS, "training")
        assert (serving.shard, serving.num_shards, serving.role) == (i, SHARDS, "serving")
        assert f"{training.host}:{training.port}" == parts[training_shard(i)].address
        assert serving.sync_from == parts[training_shard(i)].address
        assert serving.sync_interval == SETTINGS.sync_interval
        assert parts[serving_shard(i)].metrics == f"http://127.0.0.1:{serving.metrics_port}/metrics"


def test_the_trainer_trains_online_against_the_training_shards(stack) -> None:
    parts, _ = stack

    args = parse_as_role(parts[TRAINER])

    assert args.mode == "online"
    assert args.embedding_ps == ",".join(parts[training_shard(i)].address for i in range(SHARDS))
    assert args.dense_ps == parts[DENSE_PS].address
    assert (args.nats, args.partitions) == (parts[NATS].address, SETTINGS.partitions)
    assert parts[TRAINER].metrics == f"http://{args.host}:{args.metrics_port}/metrics"
    assert parts[TRAINER].address is None  # it serves no gRPC; its /metrics tells it is up


def test_serving_reads_the_serving_shards_logs_impressions_and_follows_dense_every_sync_interval(stack) -> None:
    parts, _ = stack

    args = parse_as_role(parts[SERVING])

    assert args.embedding_ps == ",".join(parts[serving_shard(i)].address for i in range(SHARDS))
    assert args.dense_ps == parts[DENSE_PS].address
    assert (args.nats, args.partitions) == (parts[NATS].address, SETTINGS.partitions)
    assert args.dense_sync_interval == SETTINGS.sync_interval
    assert f"{args.host}:{args.port}" == parts[SERVING].address


def test_the_joiner_reads_and_writes_the_stack_streams(stack) -> None:
    parts, _ = stack

    args = parse_as_role(parts[JOINER])

    assert (args.nats, args.partitions) == (parts[NATS].address, SETTINGS.partitions)
    assert f"{args.host}:{args.port}" == parts[JOINER].address


def test_nats_keeps_jetstream_under_the_data_dir_and_listens_on_loopback(stack) -> None:
    parts, ports = stack
    argv = list(parts[NATS].argv)

    assert os.path.basename(argv[0]) == "nats-server"
    assert "--jetstream" in argv
    assert argv[argv.index("--store_dir") + 1] == os.path.join(SETTINGS.data_dir, "nats")
    assert argv[argv.index("--addr") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == str(ports.nats.port)
    assert str(parts[NATS].probe) == f"GET http://127.0.0.1:{ports.nats.metrics_port}/healthz?js-enabled-only=true"


def test_the_controller_restores_the_training_shards_and_the_dense_ps_and_pauses_the_trainer(stack) -> None:
    parts, ports = stack

    args = parse_as_role(parts[CONTROLLER])
    trainer = parse_as_role(parts[TRAINER])

    assert args.storage == os.path.join(SETTINGS.data_dir, "checkpoints")
    assert args.interval == SETTINGS.checkpoint_interval
    assert args.embedding_ps == ",".join(parts[training_shard(i)].address for i in range(SHARDS))
    assert args.dense_ps == parts[DENSE_PS].address
    assert args.trainers == f"127.0.0.1:{trainer.control_port}" and trainer.start_paused
    assert (args.nats, args.partitions) == (parts[NATS].address, SETTINGS.partitions)
    for name in (training_shard(0), training_shard(1), DENSE_PS):
        assert parse_as_role(parts[name]).restore_required, name
    assert not parse_as_role(parts[serving_shard(0)]).restore_required
    assert f"{args.host}:{args.port}" == parts[CONTROLLER].address


def test_with_a_certificate_serving_and_the_joiner_serve_tls_and_are_probed_over_it() -> None:
    settings = StackSettings(data_dir="/data/stack", config="/conf/model.yaml", tls_cert="/tls/c.crt",
                             tls_key="/tls/c.key", tls_server_name="monolith.local")  # fmt: skip
    ports = allocate_ports(nats_port=14223, joiner_port=18601, serving_port=18501)
    parts = {p.name: p for p in stack_parts(settings, ports)}
    for name in (SERVING, JOINER):
        args = parse_as_role(parts[name])
        assert (args.tls_cert, args.tls_key) == ("/tls/c.crt", "/tls/c.key"), name
        assert parts[name].probe.tls == settings.tls, name
        assert settings.tls.ca == "/tls/c.crt" and settings.tls.server_name == "monolith.local"
    for name in (DENSE_PS, training_shard(0), serving_shard(0)):  # gRPC inside the stack: plaintext
        assert "--tls-cert" not in parts[name].argv, name
    nats = list(parts[NATS].argv)
    assert nats[nats.index("--tlscert") + 1] == "/tls/c.crt" and "--tls" in nats
    for name in (JOINER, SERVING, TRAINER, CONTROLLER):  # every NATS client verifies it
        args = parse_as_role(parts[name]) if name != CONTROLLER else None
        argv = list(parts[name].argv)
        assert argv[argv.index("--nats-tls-ca") + 1] == "/tls/c.crt", name
        assert argv[argv.index("--nats-tls-server-name") + 1] == "monolith.local", name
        assert args is None or args.nats_tls_ca == "/tls/c.crt"
    plain = {p.name: p for p in stack_parts(SETTINGS, ports)}
    assert "--tls-cert" not in plain[SERVING].argv and plain[SERVING].probe.tls is None
