"""Fault injection into a running `monolith up`: SIGKILL one part at a random moment, check the outcome.

    monolith chaos --stack DIR/stack.json --part embedding-ps-training-0 --json

The harness waits until the online trainer has trained on the stream (a replay is
running: the batch stage trains through its own worker, not the stream), then a random
delay, then SIGKILLs the part (found among the children of the `up` process that
stack.json names, by the port on its command line). It then waits until the supervisor
has restarted the part and the part is ready again; for a training shard or the dense-PS
ready means SERVING, which they report only once the controller has restored them.
Throughout, it polls the serving shards' row counts, so the outcome says whether serving
ever answered from an emptied table.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable

import grpc

from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as eps_pb
from monolith.api.embedding_ps.v1 import embedding_ps_pb2_grpc as eps_grpc
from monolith.common.channel import open_channel
from monolith.controller.lineage import Lineage
from monolith.harness.stack.health import GrpcHealth, HttpOk
from monolith.harness.manifest import StackError, StackManifest, manifest_path
from monolith.harness.stack.parts import CONTROLLER, DENSE_PS, JOINER, NATS, SERVING, TRAINER, serving_shard, training_shard
from monolith.common.scrape import try_scrape
from monolith.streams.config import SAMPLES_STREAM
from monolith.streams.pull_consumer import ConsumerAdmin, ConsumerSettings

POLL = 0.1  # seconds between checks while waiting for a condition


class ChaosError(RuntimeError):
    """The fault could not be injected (no such part, the stack is gone)."""


def metric_sum(url: str | None, name: str, timeout: float = 2.0) -> float | None:
    """The sum of one metric's series at a /metrics URL; None if there is no URL or it does not answer."""
    page = try_scrape(url, timeout) if url else None
    return page.sum(name) if page is not None else None


def _children(pid: int) -> dict[int, list[str]]:
    """The live child processes of `pid`: pid -> argv."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue  # it exited while we looked
        if int(ppid) == pid and state != "Z":
            found[int(entry)] = argv
    return found


def _port(url: str) -> str:
    return url.rstrip("/").rsplit(":", 1)[1].split("/", 1)[0]


@dataclasses.dataclass(frozen=True)
class Target:
    """One part of a running stack: how to find its process and how to tell it is back.

    Attributes:
        name: the part's name (stack.json, `monolith up`'s log names).
        flag: the flag on its command line that only it has, with `value`.
        value: that flag's value (a port).
        ready: whether the part is ready again (for a restored part: SERVING).
    """

    name: str
    flag: str
    value: str
    ready: Callable[[], bool]

    def pids(self, up_pid: int) -> list[int]:
        return [pid for pid, argv in _children(up_pid).items()
                if any(a == self.flag and b == self.value for a, b in itertools.pairwise(argv))]  # fmt: skip


def target(manifest: StackManifest, name: str) -> Target:
    """The part `name` of the stack described by `manifest`.

    Raises:
        ChaosError: the stack has no such part.
    """
    metrics = manifest.metrics
    addresses = {SERVING: manifest.serving, JOINER: manifest.joiner, DENSE_PS: manifest.dense_ps,
                 **{training_shard(i): a for i, a in enumerate(manifest.training_shards)},
                 **{serving_shard(i): a for i, a in enumerate(manifest.serving_shards)}}  # fmt: skip
    if name == NATS:
        monitor = manifest.nats_monitor
        return Target(name, "--http_port", _port(monitor), HttpOk(f"{monitor}/healthz?js-enabled-only=true").ready)
    if name not in metrics:
        known = sorted([NATS, *metrics])
        raise ChaosError(f"the stack has no part {name!r}; its parts: {', '.join(known)}")
    url = str(metrics[name])
    if addresses.get(name):
        ready = GrpcHealth(str(addresses[name]), manifest.tls if name in (SERVING, JOINER) else None).ready
    elif name == TRAINER:
        ready = lambda: metric_sum(url, "monolith_trainer_ready") == 1.0
    else:  # the controller: its /metrics answers once it runs (SERVING comes only after a restore)
        ready = HttpOk(url).ready
    return Target(name, "--metrics-port", _port(url), ready)


class ServingRows:
    """Polls the serving shards' row counts in the background; the fewest each held.

    Args:
        addresses: the serving embedding-PS shards.
        interval: seconds between polls.
    """

    def __init__(self, addresses: list[str], interval: float = 0.2) -> None:
        self._addresses = list(addresses)
        self._channels = [open_channel(a) for a in addresses]
        self._stubs = [eps_grpc.EmbeddingPSStub(c) for c in self._channels]
        self._interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.before: list[int] = []
        self.fewest: list[int] = []
        self._thread = threading.Thread(target=self._run, name="serving-rows", daemon=True)

    def rows(self) -> list[int | None]:
        out: list[int | None] = []
        for stub in self._stubs:
            try:
                stats = stub.Stats(eps_pb.StatsRequest(), timeout=2.0)
                out.append(sum(t.rows for t in stats.tables))
            except grpc.RpcError:
                out.append(None)  # restarting: it answers nothing, so from no table either
        return out

    def start(self, timeout: float = 30.0) -> ServingRows:
        """Reads every shard's rows (the ratio's denominators), then polls in the background.

        A shard that does not answer at once (a first connection on a loaded machine, a
        Stats call over its 2 s) is asked again until it does, so each ratio is measured.

        Raises:
            ChaosError: a serving shard did not answer within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        before = self.rows()
        while None in before:
            if time.monotonic() > deadline:
                silent = [a for a, n in zip(self._addresses, before) if n is None]
                self.stop()
                raise ChaosError(f"serving shard(s) {', '.join(silent)} did not answer Stats within {timeout:g} s")
            time.sleep(POLL)
            before = [n if n is not None else again for n, again in zip(before, self.rows())]
        self.before = [int(n) for n in before if n is not None]
        self.fewest = list(self.before)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            now = self.rows()
            with self._lock:
                self.fewest = [f if n is None else min(f, n) for f, n in zip(self.fewest, now)]

    def stop(self) -> float:
        """Stops polling; the fewest rows any serving shard held over its rows at the start.

        A shard that held no rows at the start had none to lose: its ratio is 1.
        """
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for channel in self._channels:
            channel.close()
        return min((f / b if b else 1.0 for b, f in zip(self.before, self.fewest)), default=1.0)


@dataclasses.dataclass
class ChaosResult:
    """What one injected failure did.

    Attributes:
        part: the part killed.
        pid: its process, SIGKILLed.
        new_pid: the process that replaced it (None: not restarted in time).
        waited_s: seconds from the harness's start to the kill (the random moment).
        recovery_s: seconds from the kill to the part ready again (None: not in time).
        restores: restores the controller did meanwhile (rollbacks to a checkpoint).
        serving_rows_min_ratio: the fewest rows any serving shard held from the kill until
            recovery, over its rows just before the kill.
        trainer_examples_at_kill: the trainer's examples_total read just before the kill.
        rollback_samples: samples applied and acknowledged after the restored checkpoint's
            cut, which the restores undid and the stream delivers again (the controller's
            monolith_controller_samples_rolled_back_total over the failure); None without
            the controller's metrics.
    """

    part: str
    pid: int
    new_pid: int | None
    waited_s: float
    recovery_s: float | None
    restores: int
    serving_rows_min_ratio: float
    trainer_examples_at_kill: float | None
    rollback_samples: int | None = None

    @property
    def recovered(self) -> bool:
        return self.recovery_s is not None


def _wait(condition: Callable[[], bool], deadline: float, stop: threading.Event | None) -> bool:
    while not condition():
        if time.monotonic() > deadline or (stop is not None and stop.is_set()):
            return False
        time.sleep(POLL)
    return True


ROLLED_BACK = "monolith_controller_samples_rolled_back_total"


def inject(manifest: StackManifest, part: str, delay: tuple[float, float] = (2.0, 10.0), timeout: float = 180.0,
           seed: int | None = None, stop: threading.Event | None = None,
           wait_for_training: bool = True) -> ChaosResult:  # fmt: skip
    """SIGKILLs `part` at a random moment during a replay and waits for the stack to recover.

    Args:
        manifest: the stack's stack.json.
        part: the part's name, e.g. "embedding-ps-training-0", "dense-ps", "trainer", "joiner".
        delay: the kill comes a uniformly random number of seconds in this range after the
            online trainer has trained on the stream (or after the call, without `wait_for_training`).
        timeout: seconds to wait for training to start, and again for the recovery.
        seed: the random delay's seed (None: random).
        stop: set to give up waiting.
        wait_for_training: wait for the online trainer's first samples before the delay.

    Raises:
        ChaosError: no such part, its process is not found, or training never started.
    """
    started = time.monotonic()
    chosen = target(manifest, part)
    up_pid = manifest.pid
    metrics = manifest.metrics
    trainer_url = metrics.get(TRAINER)
    controller_url = metrics.get(CONTROLLER)
    if wait_for_training and trainer_url:
        trained = lambda: (metric_sum(trainer_url, "monolith_trainer_examples") or 0) > 0
        if not _wait(trained, started + timeout, stop):
            raise ChaosError(f"the online trainer trained on nothing within {timeout:g} s: is a replay running?")
    pause = random.Random(seed).uniform(*delay)
    if stop is not None and stop.wait(pause):
        raise ChaosError("stopped before the kill")
    if stop is None:
        time.sleep(pause)
    pids = chosen.pids(up_pid)
    if len(pids) != 1:
        raise ChaosError(f"found {len(pids)} processes of {part} among the children of monolith up (pid {up_pid})")
    restores_before = metric_sum(controller_url, "monolith_controller_restores") if controller_url else None
    checkins = metric_sum(controller_url, "monolith_controller_trainer_checkins") if controller_url else None
    rows = ServingRows(list(manifest.serving_shards)).start()
    examples = metric_sum(trainer_url, "monolith_trainer_examples") if trainer_url else None
    rolled_back = metric_sum(controller_url, ROLLED_BACK) if controller_url else None
    killed_at = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    deadline = killed_at + timeout
    replaced = lambda: bool(set(chosen.pids(up_pid)) - {pids[0]})

    def back() -> bool:
        if not (replaced() and chosen.ready()):
            return False
        if part == TRAINER and checkins is not None:
            # A restarted trainer waits, paused, until the controller has checked it in.
            return (metric_sum(controller_url, "monolith_controller_trainer_checkins") or 0) > checkins
        if (part == DENSE_PS or part.startswith(training_shard(0)[:-1])) and restores_before is not None:
            # SERVING comes as the controller restores it; back once the whole rollback is done.
            return (metric_sum(controller_url, "monolith_controller_restores") or 0) > restores_before
        return True

    recovered = _wait(back, deadline, stop)
    recovery = time.monotonic() - killed_at if recovered else None
    ratio = rows.stop()
    new = sorted(set(chosen.pids(up_pid)) - {pids[0]})
    restores_after = metric_sum(controller_url, "monolith_controller_restores") if controller_url else None
    restores = (
        int(restores_after - restores_before) if restores_after is not None and restores_before is not None else 0
    )
    rollback = None
    if rolled_back is not None:
        rollback = int((metric_sum(controller_url, ROLLED_BACK) or 0) - rolled_back)  # type: ignore[arg-type]
    return ChaosResult(part, pids[0], new[0] if new else None, killed_at - started, recovery, restores, ratio, examples,
                       rollback)  # fmt: skip


def lineage(manifest: StackManifest) -> Lineage | None:
    """The stack's `Lineage` now (one trainer), or None if a part does not answer."""
    resume = metric_sum(manifest.metrics_url(CONTROLLER), "monolith_controller_resume_position")
    applied = metric_sum(manifest.metrics_url(TRAINER), "monolith_trainer_samples_since_rollback")
    streams = manifest.streams_config()
    admin = ConsumerAdmin(streams, ConsumerSettings(SAMPLES_STREAM, "samples.>", manifest.trainer_consumer))
    try:
        state = admin.position()
    finally:
        admin.close()
    if resume is None or applied is None or state is None:
        return None
    return Lineage(int(resume), int(applied), state.ack_floor, state.pending, state.ack_pending)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `monolith chaos`."""
    parser.add_argument("--stack", default=manifest_path(".monolith"),
                        help="the running stack's stack.json (default .monolith/stack.json)")  # fmt: skip
    parser.add_argument("--part", required=True, help="the part to SIGKILL, e.g. embedding-ps-training-0, dense-ps, "
                        "trainer, joiner, serving, controller, nats")  # fmt: skip
    parser.add_argument(
        "--min-delay", type=float, default=2.0, help="seconds after training starts, at least (default 2)"
    )
    parser.add_argument(
        "--max-delay", type=float, default=10.0, help="seconds after training starts, at most (default 10)"
    )
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="seconds to wait for training, and for the recovery"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the random moment")
    parser.add_argument("--now", action="store_true", help="do not wait for the online trainer to train first")
    parser.add_argument("--json", action="store_true", help="print the outcome as one JSON line")


def run(args: argparse.Namespace) -> int:
    """Injects one failure; exit 0 if the stack recovered and serving kept its rows, 1 otherwise."""
    if not 0 <= args.min_delay <= args.max_delay:
        raise ValueError(f"need 0 <= --min-delay <= --max-delay, got {args.min_delay} and {args.max_delay}")
    try:
        manifest = StackManifest.load(args.stack)
    except StackError as exc:
        print(f"monolith chaos: {exc}", file=sys.stderr)
        return 1
    try:
        result = inject(manifest, args.part, (args.min_delay, args.max_delay), args.timeout, args.seed,
                        wait_for_training=not args.now)  # fmt: skip
    except ChaosError as exc:
        print(f"monolith chaos: {exc}", file=sys.stderr)
        return 1
    outcome = {**dataclasses.asdict(result), "recovered": result.recovered}
    if args.json:
        print(json.dumps(outcome, sort_keys=True))
    else:
        print(f"killed {result.part} (pid {result.pid}) after {result.waited_s:.1f} s; "
              + (f"ready again in {result.recovery_s:.2f} s (pid {result.new_pid})" if result.recovered
                 else f"not ready again within {args.timeout:g} s")
              + f"; {result.restores} restore(s); serving rows min ratio {result.serving_rows_min_ratio}")  # fmt: skip
    return 0 if result.recovered and result.serving_rows_min_ratio >= 0.99 else 1
