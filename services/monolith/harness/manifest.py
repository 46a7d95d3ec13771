"""`<data-dir>/stack.json`: where a running local stack's parts listen, one typed contract.

`monolith up` writes it (atomically, once every part is up) and removes it when it stops,
so a reader that sees the file sees it whole and the stack running. The replay, chaos, the
benchmarks and the load test read it, all through `StackManifest.load`: one type, so a
field cannot be written under one name and read under another.
"""

from __future__ import annotations

import os
from typing import Annotated

import pydantic
from pydantic import Field

from monolith.common.channel import TlsConfig
from monolith.common.config import ConfigModel, describe_errors
from monolith.streams.config import StreamsConfig

FILE_NAME = "stack.json"
DEFAULT_CONSUMER = "trainer"

NonEmpty = Annotated[str, Field(min_length=1)]


class StackError(RuntimeError):
    """The stack did not come up, or its stack.json is missing or unusable."""


class StackManifest(ConfigModel):
    """What a client of a running stack needs to know.

    Attributes:
        pid: the `monolith up` process (SIGTERM stops the stack).
        config: the model config every part reads (absolute path).
        nats: the NATS URL.
        nats_monitor: NATS's HTTP monitoring URL.
        partitions: partitions of the EVENTS and SAMPLES streams.
        sync_interval: seconds between train-to-serve syncs.
        join_window: the joiner's window (event-time seconds).
        join_lateness: the joiner's allowed lateness (event-time seconds).
        trainer_consumer: the durable consumer the online trainers share on SAMPLES.
        serving: model-serving's "host:port".
        joiner: the joiner's "host:port".
        dense_ps: the dense-PS's "host:port".
        controller: the checkpoint controller's "host:port" (None: the stack runs without one).
        training_shards: the training embedding-PS shards, in shard order.
        serving_shards: the serving embedding-PS shards, in shard order.
        metrics: part name -> its /metrics URL.
        logs: the directory of the parts' logs.
        tls_ca: model-serving, the joiner and NATS serve TLS with this certificate (None: plaintext).
        tls_server_name: the name their certificate carries (dial 127.0.0.1, check this name).
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", strict=True)

    pid: Annotated[int, Field(gt=0)]
    config: NonEmpty
    nats: NonEmpty
    nats_monitor: NonEmpty
    partitions: Annotated[int, Field(ge=1)]
    sync_interval: Annotated[float, Field(gt=0)]
    join_window: Annotated[float, Field(gt=0)]
    join_lateness: Annotated[float, Field(ge=0)]
    trainer_consumer: NonEmpty = DEFAULT_CONSUMER
    serving: NonEmpty
    joiner: NonEmpty
    dense_ps: NonEmpty
    controller: NonEmpty | None = None
    training_shards: tuple[NonEmpty, ...]
    serving_shards: tuple[NonEmpty, ...]
    metrics: dict[str, str]
    logs: str
    tls_ca: NonEmpty | None = None
    tls_server_name: NonEmpty | None = None

    @property
    def tls(self) -> TlsConfig | None:
        """How to verify model-serving and the joiner (None: they serve plaintext)."""
        return None if self.tls_ca is None else TlsConfig(ca=self.tls_ca, server_name=self.tls_server_name)

    def streams_config(self) -> StreamsConfig:
        """How to reach the stack's NATS (over TLS when the stack serves it)."""
        return StreamsConfig(url=self.nats, partitions=self.partitions, tls_ca=self.tls_ca,
                             tls_server_name=self.tls_server_name)  # fmt: skip

    def client_tls(self) -> dict[str, str]:
        """`MonolithClient`'s TLS arguments for this stack (none for a plaintext one)."""
        if self.tls_ca is None:
            return {}
        return {"tls_ca": self.tls_ca, **({"tls_server_name": self.tls_server_name} if self.tls_server_name else {})}

    def write(self, path: str) -> None:
        """Writes `path` atomically: a reader sees the old file, no file, or the whole new one."""
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(self.model_dump_json(indent=2))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str) -> StackManifest:
        """Reads a stack.json.

        Raises:
            StackError: it is missing, not JSON, or not a stack manifest (naming the fields).
        """
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise StackError(f"{path} not found: start the stack with `monolith up` (or use --up)") from None
        except OSError as exc:
            raise StackError(f"{path}: {exc.strerror or exc}") from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, where: str = FILE_NAME) -> StackManifest:
        """A stack.json's text as a manifest.

        Raises:
            StackError: not JSON, or not a stack manifest (naming the fields).
        """
        try:
            return cls.model_validate_json(text)
        except pydantic.ValidationError as exc:
            raise StackError(f"{where}: not a stack manifest: {describe_errors(exc)}") from None

    def metrics_url(self, part: str) -> str:
        """The /metrics URL of a part.

        Raises:
            StackError: the stack has no such part with metrics.
        """
        try:
            return self.metrics[part]
        except KeyError:
            raise StackError(f"the stack has no metrics for {part!r}; it has: {', '.join(sorted(self.metrics))}") from None


def manifest_path(data_dir: str) -> str:
    """Where a stack started with `--data-dir data_dir` writes its manifest."""
    return os.path.join(data_dir, FILE_NAME)


def remove_manifest(path: str) -> None:
    """Removes a manifest if there is one."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def running_stack_pid(path: str) -> int | None:
    """The pid of the `monolith up` a stack.json names, if that process is alive; else None.

    A file left by an `up` that was SIGKILLed names a dead process: it is stale, not a
    running stack; so is an unreadable file, or one from an older release.
    """
    try:
        pid = StackManifest.load(path).pid
    except StackError:
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, another user's
    return pid
