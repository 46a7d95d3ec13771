"""The stack's `stack.json` (see harness/manifest.py): built from what `monolith up` started."""

from __future__ import annotations

from collections.abc import Sequence

from monolith.harness.manifest import StackManifest
from monolith.harness.stack.parts import (
    CONTROLLER,
    DENSE_PS,
    JOINER,
    SERVING,
    SHARDS,
    Part,
    StackPorts,
    StackSettings,
    serving_shard,
    training_shard,
)
from monolith.joiner.config import JoinerConfig


def stack_manifest(settings: StackSettings, ports: StackPorts, parts: Sequence[Part], pid: int) -> StackManifest:
    """The manifest of a started stack.

    Args:
        settings: what the stack was started with.
        ports: its ports.
        parts: its parts (their addresses and metrics URLs, by name).
        pid: the process of `monolith up` (SIGTERM it to stop the stack).
    """
    by_name = {p.name: p for p in parts}
    joiner = JoinerConfig()
    controller = by_name.get(CONTROLLER)
    return StackManifest(
        pid=pid,
        config=settings.config,
        nats=ports.nats_url,
        nats_monitor=f"http://127.0.0.1:{ports.nats.metrics_port}",
        partitions=settings.partitions,
        sync_interval=settings.sync_interval,
        join_window=joiner.window if settings.join_window is None else settings.join_window,
        join_lateness=joiner.lateness if settings.join_lateness is None else settings.join_lateness,
        trainer_consumer=settings.trainer_consumer,
        serving=_address(by_name[SERVING]),
        joiner=_address(by_name[JOINER]),
        dense_ps=_address(by_name[DENSE_PS]),
        controller=_address(controller) if controller is not None else None,
        training_shards=tuple(_address(by_name[training_shard(i)]) for i in range(SHARDS)),
        serving_shards=tuple(_address(by_name[serving_shard(i)]) for i in range(SHARDS)),
        metrics={p.name: p.metrics for p in parts if p.metrics},
        logs=settings.logs_dir,
        tls_ca=settings.tls_cert,
        tls_server_name=settings.tls_server_name if settings.tls_cert else None,
    )


def _address(part: Part) -> str:
    if part.address is None:
        raise ValueError(f"part {part.name} has no address")
    return part.address
