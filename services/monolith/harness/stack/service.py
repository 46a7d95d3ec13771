"""`monolith up`: starts the whole stack on this machine and keeps it running until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import time
from types import FrameType

from monolith.common.config import parse_config, positive_seconds, seconds
from monolith.common.errors import ConfigError
from monolith.model.config import default_config_path, load_model_config
from monolith.harness.manifest import manifest_path, remove_manifest, running_stack_pid
from monolith.harness.stack.manifest import stack_manifest
from monolith.harness.stack.parts import HOST, Part, StackPorts, StackSettings, allocate_ports, stack_parts
from monolith.harness.stack.supervisor import PartFailed, Supervisor
from monolith.streams.config import StreamsConfig
from monolith.streams.nats_server import NatsServerError


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 for a free one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535 (0: a free port), got {value}")
    return value


def _partitions(text: str) -> int:
    """An argparse type: a partition count the streams accept."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    try:
        return parse_config(StreamsConfig, {"partitions": count}).partitions
    except ConfigError as exc:  # out of the range the streams accept
        raise argparse.ArgumentTypeError(str(exc).removeprefix("partitions: ")) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `monolith up`."""
    parser.add_argument(
        "--config", default=default_config_path(), help="model config YAML every part reads (default: MovieLens)"
    )
    parser.add_argument("--data-dir", default=".monolith",
                        help="the stack's directory: JetStream store (nats/), logs (logs/), stack.json (default .monolith)")  # fmt: skip
    parser.add_argument(
        "--serving-port", type=_port, default=8500, help="Predict API port (default 8500; 0: a free one)"
    )
    parser.add_argument(
        "--joiner-port", type=_port, default=8600, help="ReportActions API port (default 8600; 0: a free one)"
    )
    parser.add_argument("--nats-port", type=_port, default=4222, help="NATS client port (default 4222; 0: a free one)")
    parser.add_argument("--partitions", type=_partitions, default=StreamsConfig().partitions,
                        help="partitions of the EVENTS and SAMPLES streams (default %(default)s)")  # fmt: skip
    parser.add_argument("--sync-interval", type=positive_seconds, default=1.0,
                        help="seconds between train-to-serve syncs of embeddings and dense parameters (default 1)")  # fmt: skip
    parser.add_argument("--checkpoint-interval", type=positive_seconds, default=StackSettings.checkpoint_interval,
                        help="seconds between the controller's checkpoints: the most a restore rolls back "
                        "(default %(default)g)")  # fmt: skip
    parser.add_argument("--join-window", type=positive_seconds, default=None,
                        help="the joiner's window, event-time seconds an impression waits for its action "
                        "(default: the joiner's)")  # fmt: skip
    parser.add_argument("--join-lateness", type=seconds, default=None,
                        help="the joiner's allowed lateness of event times, seconds (default: the joiner's)")  # fmt: skip
    parser.add_argument("--start-timeout", type=positive_seconds, default=180.0,
                        help="seconds each part has to become ready (default 180)")  # fmt: skip
    parser.add_argument("--stop-timeout", type=positive_seconds, default=15.0,
                        help="seconds each part has to exit after SIGTERM before SIGKILL (default 15)")  # fmt: skip
    parser.add_argument("--tls-cert", default=None,
                        help="PEM certificate chain: model-serving, the joiner and NATS serve TLS only (with "
                        "--tls-key); clients and every role trust it as their CA (stack.json names it)")  # fmt: skip
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name", default="localhost",
                        help="the name --tls-cert carries, checked when the stack's tools dial 127.0.0.1 "
                        "(default localhost)")  # fmt: skip
    parser.add_argument("--fresh", action="store_true",
                        help="delete the data dir's JetStream store and logs first (streams start empty)")  # fmt: skip


class _Signals:
    """Set by SIGINT or SIGTERM.

    Waiting sleeps and re-checks instead of blocking on a `threading.Event`: the handler
    runs on the main thread between bytecodes, and `Event.set` there could wait for the
    lock the interrupted `Event.wait` holds.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def is_set(self) -> bool:
        return self.received is not None

    def wait(self, timeout: float) -> bool:
        if self.received is None:
            time.sleep(timeout)
        return self.received is not None


def _taken_port(ports: dict[str, int]) -> str | None:
    """Why one of the ports asked for by number cannot be used (it is taken), or None."""
    for flag, port in ports.items():
        if not port:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
            try:
                probe.bind((HOST, port))
            except OSError as exc:
                return f"{flag} {port}: {HOST}:{port} is taken ({exc.strerror or exc}); 0 picks a free port"
    return None


def _tls_problem(cert: str | None, key: str | None) -> str | None:
    """What is wrong with --tls-cert/--tls-key (both or neither, readable), or None."""
    if (cert is None) != (key is None):
        return "--tls-cert and --tls-key go together: give both (TLS) or neither (plaintext)"
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if path is not None and not os.access(path, os.R_OK):
            return f"{flag} {path}: not a readable file"
    return None


def run(args: argparse.Namespace) -> int:
    """Starts the stack, supervises it until SIGINT or SIGTERM, then stops it; 0 on a clean stop."""
    config = os.path.abspath(args.config)
    load_model_config(config)  # a bad config fails here, not in nine logs
    data_dir = os.path.abspath(args.data_dir)
    ports = allocate_ports(args.nats_port, args.joiner_port, args.serving_port)  # refuses a port given twice
    try:
        os.makedirs(os.path.join(data_dir, "logs"), exist_ok=True)
    except OSError as exc:
        print(f"monolith up: cannot use --data-dir {data_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    path = manifest_path(data_dir)
    other = running_stack_pid(path)
    if other is not None:
        print(f"monolith up: a stack is already running from {data_dir} (pid {other}); stop it or use another --data-dir",
              file=sys.stderr)  # fmt: skip
        return 1
    taken = _taken_port(
        {"--nats-port": args.nats_port, "--joiner-port": args.joiner_port, "--serving-port": args.serving_port}
    )
    if taken:
        print(f"monolith up: {taken}", file=sys.stderr)
        return 1
    tls_problem = _tls_problem(args.tls_cert, args.tls_key)
    if tls_problem:
        print(f"monolith up: {tls_problem}", file=sys.stderr)
        return 2
    remove_manifest(path)  # stale: its `up` is gone
    settings = StackSettings(
        data_dir=data_dir,
        config=config,
        partitions=args.partitions,
        sync_interval=args.sync_interval,
        log_level=args.log_level.upper(),
        join_window=args.join_window,
        join_lateness=args.join_lateness,
        checkpoint_interval=args.checkpoint_interval,
        tls_cert=os.path.abspath(args.tls_cert) if args.tls_cert else None,
        tls_key=os.path.abspath(args.tls_key) if args.tls_key else None,
        tls_server_name=args.tls_server_name,
    )
    if args.fresh:
        for directory in (settings.nats_dir, settings.logs_dir):
            shutil.rmtree(directory, ignore_errors=True)
    try:
        parts = stack_parts(settings, ports)
    except NatsServerError as exc:
        print(f"monolith up: {exc}", file=sys.stderr)
        return 1
    return _run_stack(settings, ports, parts, args.start_timeout, args.stop_timeout)


def _run_stack(
    settings: StackSettings, ports: StackPorts, parts: list[Part], start_timeout: float, stop_timeout: float
) -> int:
    signals = _Signals()
    previous = {sig: signal.signal(sig, signals.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    supervisor = Supervisor(parts, settings.logs_dir, stop_timeout=stop_timeout)
    path = manifest_path(settings.data_dir)
    began = time.monotonic()
    print(f"monolith up: starting {len(parts)} parts; data in {settings.data_dir}", flush=True)
    try:
        if supervisor.start(signals, start_timeout):
            stack_manifest(settings, ports, parts, os.getpid()).write(path)
            print(f"monolith up: ready in {time.monotonic() - began:.1f} s; addresses in {path}; "
                  "Ctrl-C or SIGTERM stops the stack", flush=True)  # fmt: skip
            supervisor.supervise(signals)
    except PartFailed as exc:
        tail = "\n".join(f"    {line}" for line in exc.log_tail.splitlines()) or "    (nothing)"
        print(f"monolith up: {exc}; the last lines of {exc.log_path}:\n{tail}", file=sys.stderr, flush=True)
        return 1
    finally:
        # Gone before the parts stop: a client reading it would find a stopping stack.
        remove_manifest(path)
        if signals.received is not None:
            print(f"monolith up: {signals.received.name}: stopping", flush=True)
        supervisor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("monolith up: stopped", flush=True)
    return 0
