"""A running stack as the replay sees it (`stack.json`), and `monolith up` as a child process.

The replay talks to the stack only through the addresses `monolith up` writes to
`<data-dir>/stack.json`; it never imports the stack's code. With `--up` it starts
`monolith up` itself, waits (bounded) for a stack.json written by that very process (the
`pid` in the file, so a stale file of an earlier stack is never taken for it), and stops it
with SIGTERM at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

from monolith.joiner.config import JoinerConfig
from monolith.common.process import terminate

STACK_FILE = "stack.json"


class StackError(RuntimeError):
    """The stack did not come up, or its stack.json is unusable."""


@dataclasses.dataclass(frozen=True)
class StackInfo:
    """What the replay needs to know about a running stack.

    Attributes:
        serving: model-serving's "host:port".
        joiner: the joiner's "host:port".
        dense_ps: the dense-PS's "host:port".
        training_shards: the training embedding-PS shards, in shard order.
        nats: the NATS URL.
        partitions: partitions of the EVENTS and SAMPLES streams.
        config: the model config every part reads.
        metrics: part name -> its /metrics URL.
        logs: the directory of the parts' logs.
        window: the joiner's window (event-time seconds).
        lateness: the joiner's allowed lateness (event-time seconds).
        negative_sample_rate: the joiner's rate of negatives kept (None: the model config's).
        trainer_consumer: the durable consumer the online trainers share on SAMPLES.
    """

    serving: str
    joiner: str
    dense_ps: str
    training_shards: tuple[str, ...]
    nats: str
    partitions: int
    config: str
    metrics: dict[str, str]
    logs: str
    window: float = JoinerConfig().window
    lateness: float = JoinerConfig().lateness
    negative_sample_rate: float | None = None
    trainer_consumer: str = "trainer"

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], where: str = STACK_FILE) -> StackInfo:
        """Reads the fields of a stack.json; the joiner's settings default to the joiner's defaults.

        Raises:
            StackError: a field is missing or has the wrong type.
        """
        try:
            return cls(
                serving=str(manifest["serving"]),
                joiner=str(manifest["joiner"]),
                dense_ps=str(manifest["dense_ps"]),
                training_shards=tuple(str(a) for a in manifest["embedding_ps_training"]),
                nats=str(manifest["nats"]),
                partitions=int(manifest["partitions"]),
                config=str(manifest["config"]),
                metrics={str(k): str(v) for k, v in dict(manifest.get("metrics", {})).items()},
                logs=str(manifest.get("logs", "")),
                window=float(manifest.get("joiner_window", JoinerConfig().window)),
                lateness=float(manifest.get("joiner_lateness", JoinerConfig().lateness)),
                negative_sample_rate=(None if manifest.get("negative_sample_rate") is None
                                      else float(manifest["negative_sample_rate"])),  # fmt: skip
                trainer_consumer=str(manifest.get("trainer_consumer", "trainer")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StackError(f"{where}: not a stack manifest ({type(exc).__name__}: {exc})") from None

    @classmethod
    def load(cls, path: str) -> StackInfo:
        """Reads a stack.json.

        Raises:
            StackError: it is missing or malformed.
        """
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise StackError(f"{path} not found: start the stack with `monolith up` (or use --up)") from None
        except (OSError, ValueError) as exc:
            raise StackError(f"{path}: {exc}") from None
        if not isinstance(manifest, dict):
            raise StackError(f"{path}: not a JSON object")
        return cls.from_manifest(manifest, path)


class LocalStack:
    """`monolith up --data-dir DIR` as a child process.

    Args:
        data_dir: the stack's data directory (created if missing).
        up_args: more flags for `monolith up`.
        log_path: where `monolith up`'s own output goes (default `<data_dir>/up.log`).
    """

    def __init__(self, data_dir: str, up_args: tuple[str, ...] = (), log_path: str | None = None) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.stack_file = os.path.join(self.data_dir, STACK_FILE)
        self.log_path = log_path or os.path.join(self.data_dir, "up.log")
        self._up_args = up_args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> StackInfo:
        """Starts `monolith up` and waits until it has written its stack.json.

        Raises:
            StackError: `monolith up` exited, or wrote no stack.json within `timeout` seconds
                (it is stopped then); the message ends with its log's tail.
        """
        os.makedirs(self.data_dir, exist_ok=True)
        command = [sys.executable, "-m", "monolith.cli", "up", "--data-dir", self.data_dir, *self._up_args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise StackError(f"monolith up exited with {code} before the stack was ready{self._log_tail()}")
            manifest = self._own_manifest()
            if manifest is not None:
                return StackInfo.from_manifest(manifest, self.stack_file)
            if time.monotonic() > deadline:
                self.stop()
                raise StackError(f"monolith up wrote no {self.stack_file} within {timeout:.0f} s{self._log_tail()}")
            time.sleep(0.25)

    def _own_manifest(self) -> dict[str, Any] | None:
        """stack.json if it exists and names our child as the stack's process."""
        try:
            with open(self.stack_file, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            return None  # not written yet (it is replaced atomically, so never half-written)
        assert self.process is not None
        return manifest if isinstance(manifest, dict) and manifest.get("pid") == self.process.pid else None

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the stack stops its parts in order), SIGKILL after `timeout`; the exit code."""
        if self.process is None:
            return None
        return terminate(self.process, timeout)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                tail = f.readlines()[-lines:]
        except OSError:
            return ""
        return f" (log {self.log_path}):\n" + "".join(tail).rstrip() if tail else f" (log {self.log_path} is empty)"
