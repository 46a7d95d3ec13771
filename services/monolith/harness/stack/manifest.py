"""`<data-dir>/stack.json`: where a running stack's parts listen, for clients (`monolith replay`).

It exists only while every part is up: written atomically once the stack is ready, removed
when it stops, so a reader that sees the file sees it whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from monolith.harness.stack.parts import (
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

FILE_NAME = "stack.json"


def manifest_path(data_dir: str) -> str:
    return os.path.join(data_dir, FILE_NAME)


def stack_manifest(settings: StackSettings, ports: StackPorts, parts: Sequence[Part], pid: int) -> dict:
    """The contents of stack.json (the format is the contract `monolith replay` reads).

    Args:
        settings: what the stack was started with.
        ports: its ports.
        parts: its parts (their metrics URLs, by name).
        pid: the process of `monolith up` (SIGTERM it to stop the stack).
    """
    by_name = {p.name: p for p in parts}
    return {
        "nats": ports.nats_url,
        "nats_monitor": f"http://127.0.0.1:{ports.nats.metrics_port}",
        "partitions": settings.partitions,
        "sync_interval": settings.sync_interval,
        **({"joiner_window": settings.join_window} if settings.join_window is not None else {}),
        **({"joiner_lateness": settings.join_lateness} if settings.join_lateness is not None else {}),
        "config": settings.config,
        "serving": by_name[SERVING].address,
        "joiner": by_name[JOINER].address,
        "dense_ps": by_name[DENSE_PS].address,
        "embedding_ps_training": [by_name[training_shard(i)].address for i in range(SHARDS)],
        "embedding_ps_serving": [by_name[serving_shard(i)].address for i in range(SHARDS)],
        "metrics": {p.name: p.metrics for p in parts if p.metrics},
        "logs": settings.logs_dir,
        "pid": pid,
    }


def write_manifest(path: str, manifest: dict) -> None:
    """Writes `path` atomically: a reader sees the old file, no file, or the whole new one."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def remove_manifest(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def running_stack_pid(path: str) -> int | None:
    """The pid of the `monolith up` a stack.json names, if that process is alive; else None.

    A file left by an `up` that was SIGKILLed names a dead process: it is stale, not a
    running stack.
    """
    try:
        with open(path, encoding="utf-8") as f:
            pid = json.load(f).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, another user's
    return pid
