"""`monolith bench recovery`: kill -9 of a training shard during online training, against an undisturbed run.

Two replays of the same MovieLens-100k slice through `monolith up` (the checkpoint
controller included), one after the other in this run: one undisturbed, one during which
`monolith.harness.chaos` SIGKILLs training embedding-PS shard 0 at a random moment while the
online trainer consumes the stream. Reported:

- `auc_undisturbed`, `auc_with_failure`: the served progressive AUC of each replay;
- `recovery_s`: from the kill until the restarted shard is SERVING again, which it reports
  only once the controller has restored it (every PS rolled back to the last cut);
- `updates_lost`, `updates_applied_twice`: once the trainer has drained the stream, the
  controller's resume position plus the samples the trainer applied since (its own
  counter) against the consumer's acknowledgement floor (`controller.lineage.Lineage`);
- `serving_rows_min_ratio`: the fewest rows any serving shard held from the kill until the
  recovery, over its rows just before;
- checkpoint cost, measured here on a synthetic table of `TABLE_ROWS` rows (the
  MovieLens tables are a few MB, too small to time): `full_write_mb_per_s` (a full
  checkpoint written through `CheckpointStore`: frames, hashing, manifest) against
  `disk_write_mb_per_s` (a plain sequential write of as many bytes to the same disk, both
  synced to the device),
  medians of 5 interleaved rounds after a warm-up; `incremental_bytes` of an incremental
  checkpoint after `CHANGED_ROWS` rows changed, against `changed_rows * row_bytes`;
- `max_training_pause_s`: the longest training pause of any checkpoint either stack took;
- `rollback_samples`: samples the restore undid, which the trainer learned from again
  (the controller's count), against `checkpoint_interval_s` x the replay's events/s (one
  sample per event).

`bars_met` checks exactly the issue's bars; `limits` holds the figures behind a missed one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import numpy as np

from monolith.checkpoint.checksums import CRC32C, checksum
from monolith.checkpoint.store import CheckpointStore
from monolith.embedding.config import TableConfig
from monolith.embedding.table import EmbeddingTable
from monolith.harness.replay.launcher import LocalStack
from monolith.harness.replay.runner import Replay, ReplayOptions
from monolith.harness.replay.service import FREE_PORTS, JOIN_LATENESS, JOIN_WINDOW, SYNC_INTERVAL, json_ready
from monolith.controller.lineage import Lineage
from monolith.harness.chaos import ChaosError, ChaosResult, inject, lineage
from monolith.harness.manifest import StackManifest
from monolith.harness.stack.parts import training_shard

SPEED = 100.0  # events/s, as `make run`
KILL_DELAY = (10.0, 60.0)  # seconds after online training starts: a random moment mid-stream
QUICK_LIMIT = 3_000  # ratings for --quick: 2,400 in batch, 600 replayed
QUICK_SPEED = 20.0  # the 600 events last 30 s, so the kill lands mid-stream
QUICK_KILL_DELAY = (3.0, 8.0)
TABLE_ROWS = 500_000  # the synthetic table whose checkpoints are timed (--quick: 100,000)
QUICK_TABLE_ROWS = 100_000
CHANGED_ROWS = 10_000
DIM = 16
ROUNDS = 5
DRAIN_TIMEOUT = 300.0
CHECKPOINT_INTERVAL = 30.0  # the stacks' `monolith up --checkpoint-interval`: what bounds a rollback

BARS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "abs(auc_with_failure-auc_undisturbed)<=0.005":
        lambda r: abs(r["auc_with_failure"] - r["auc_undisturbed"]) <= 0.005,
    "updates_lost==0": lambda r: r["updates_lost"] == 0,
    "updates_applied_twice==0": lambda r: r["updates_applied_twice"] == 0,
    "serving_rows_min_ratio>=0.99": lambda r: r["serving_rows_min_ratio"] >= 0.99,
    "full_write_mb_per_s>=0.5*disk_write_mb_per_s": lambda r: r["full_write_mb_per_s"] >= 0.5 * r["disk_write_mb_per_s"],
    "incremental_bytes<=1.2*changed_rows*row_bytes":
        lambda r: r["incremental_bytes"] <= 1.2 * r["changed_rows"] * r["row_bytes"],
    "max_training_pause_s<=2": lambda r: r["max_training_pause_s"] <= 2.0,
    "rollback_samples<=checkpoint_interval_s*events_per_s*1.5":
        lambda r: r["rollback_samples"] <= r["checkpoint_interval_s"] * r["speed"] * 1.5,
}  # fmt: skip


def _say(message: str) -> None:
    print(f"[bench recovery] {message}", file=sys.stderr, flush=True)


def _replay(options: ReplayOptions, kill: tuple[float, float] | None, seed: int) -> dict[str, Any]:
    """One replay through a fresh stack; with `kill`, training shard 0 is SIGKILLed at a random moment in it."""
    with tempfile.TemporaryDirectory(prefix="monolith-bench-recovery-") as data_dir:
        up_args = (*FREE_PORTS, "--join-window", f"{JOIN_WINDOW:g}", "--join-lateness", f"{JOIN_LATENESS:g}",
                   "--sync-interval", f"{SYNC_INTERVAL:g}", "--checkpoint-interval", f"{CHECKPOINT_INTERVAL:g}")  # fmt: skip
        local = LocalStack(data_dir, up_args=up_args)
        try:
            manifest = local.start(300)
            chaos: dict[str, Any] = {}
            stop = threading.Event()

            def fault() -> None:
                try:
                    chaos["result"] = inject(manifest, training_shard(0), delay=kill, timeout=300, seed=seed, stop=stop)
                except ChaosError as exc:
                    chaos["error"] = str(exc)

            injector = threading.Thread(target=fault, name="chaos", daemon=True)
            if kill is not None:
                injector.start()
            result = Replay(manifest, options).run()
            if kill is not None:
                injector.join(timeout=600)
            stop.set()
            drained = _drained(manifest)
            pauses = [m.pause_seconds for m in CheckpointStore(os.path.join(data_dir, "checkpoints")).list()]
            return {"replay": json_ready(result), "chaos": chaos.get("result"), "chaos_error": chaos.get("error"),
                    "lineage": drained, "pauses": pauses}  # fmt: skip
        finally:
            local.stop()


def _drained(manifest: StackManifest) -> Lineage | None:
    """The stack's lineage once the trainer has applied and acknowledged every sample (or at the deadline)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    state = lineage(manifest)
    while (state is None or not state.drained) and time.monotonic() < deadline:
        time.sleep(0.5)
        state = lineage(manifest)
    return state


def checkpoint_cost(rows: int, changed: int, rounds: int = ROUNDS) -> dict[str, Any]:
    """Full checkpoint writes against plain sequential writes of the same bytes; an incremental's size.

    Both sides write to the same temporary directory and sync what they wrote to the
    device (a checkpoint fsyncs its files before its manifest), one after the other in
    each round, after one warm-up round.
    """
    table = EmbeddingTable(TableConfig(name="t", dim=DIM))
    ids = np.arange(1, rows + 1, dtype=np.int64)
    for start in range(0, rows, 65_536):
        table.lookup_train(ids[start : start + 65_536], None, 1.0e9, 1)
    batches = list(table.export(0, True, 65_536))
    width = int(batches[0].values.shape[1])
    row_bytes = 8 + 4 * width + 4  # id, embedding + optimizer state, update time
    empty = np.zeros(0, np.int64)
    full_s, disk_s, hash_s, full_bytes = [], [], [], 0
    with tempfile.TemporaryDirectory(prefix="monolith-bench-checkpoint-") as root:
        store = CheckpointStore(os.path.join(root, "store"))
        for round_ in range(rounds + 1):
            started = time.perf_counter()
            writer = store.begin("full", 1)
            with writer.shard(0, "bench", 0) as out:
                for batch in batches:
                    out.write("t", batch, empty)
                out.version = 1
            manifest = writer.commit()
            seconds = time.perf_counter() - started
            full_bytes = sum(f.bytes for f in manifest.files)
            payload = np.random.default_rng(round_).integers(0, 255, size=full_bytes, dtype=np.uint8).tobytes()
            started = time.perf_counter()
            with open(os.path.join(root, f"plain-{round_}.bin"), "wb") as f:
                for offset in range(0, len(payload), 1 << 20):
                    f.write(payload[offset : offset + (1 << 20)])
                f.flush()
                os.fsync(f.fileno())  # as the checkpoint syncs its files before its manifest
            plain = time.perf_counter() - started
            started = time.perf_counter()
            checksum(CRC32C, payload)  # every byte of the checkpoint is checksummed for its manifest
            hashed = time.perf_counter() - started
            os.remove(os.path.join(root, f"plain-{round_}.bin"))
            store.retain(1)
            if round_ > 0:  # round 0 warms up both paths
                full_s.append(seconds)
                disk_s.append(plain)
                hash_s.append(hashed)
        # An incremental checkpoint after `changed` rows changed.
        rng = np.random.default_rng(0)
        touched = rng.choice(ids, size=changed, replace=False)
        table.apply_gradients(touched, np.ones((changed, DIM), np.float32), 1.0e9 + 1, 2)
        base = store.load()
        writer = store.begin("incremental", 1, base)
        with writer.shard(0, "bench", 1) as out:
            for batch in table.export(1, True, 65_536):
                out.write("t", batch, table.deleted_since(1))
            out.version = 2
        incremental = writer.commit()
    mb = full_bytes / 1e6
    return {
        "checkpoint_table_rows": rows,
        "full_checkpoint_bytes": full_bytes,
        "full_write_mb_per_s": mb / statistics.median(full_s),
        "disk_write_mb_per_s": mb / statistics.median(disk_s),
        "crc32c_mb_per_s": mb / statistics.median(hash_s),
        "incremental_bytes": incremental.shards[0].bytes,
        "incremental_rows": incremental.shards[0].rows,
        "changed_rows": changed,
        "row_bytes": row_bytes,
    }


def _limits(bar: str, r: dict[str, Any]) -> list[str]:
    """The figures that bear on a missed bar."""
    if "auc" in bar:
        return [f"served AUC {r['auc_with_failure']} with the kill against {r['auc_undisturbed']} undisturbed, over "
                f"{r['events']} events at {r['speed']} events/s; recovery took {r['recovery_s']} s"]  # fmt: skip
    if "updates" in bar:
        return [f"lineage after the drain: {r['lineage']}; the chaos harness: {r['chaos']}"]
    if "serving" in bar:
        return [f"serving rows min ratio {r['serving_rows_min_ratio']} over the failure ({r['chaos']})"]
    if "write" in bar:
        return [f"{r['full_checkpoint_bytes']} bytes: checkpoint {r['full_write_mb_per_s']:.1f} MB/s, plain write "
                f"{r['disk_write_mb_per_s']:.1f} MB/s; CRC32C alone {r['crc32c_mb_per_s']:.1f} MB/s on this CPU (every "
                "byte is checksummed for the manifest as it is written)"]  # fmt: skip
    if "incremental" in bar:
        return [f"{r['incremental_bytes']} bytes for {r['incremental_rows']} rows of {r['row_bytes']} bytes"]
    if "rollback" in bar:
        return [f"{r['rollback_samples']} samples undid by {r['restores']} restore(s), checkpoints every "
                f"{r['checkpoint_interval_s']:g} s at {r['speed']:g} events/s; the kill came {r['killed_after_s']} s "
                "into online training"]  # fmt: skip
    return [f"checkpoint pauses (s): {r['training_pauses_s']}"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = getattr(args, "quick", False)
    options = ReplayOptions(speed=QUICK_SPEED if quick else SPEED, limit=QUICK_LIMIT if quick else None, plot=None,
                            progress=True, probe_interval=0)  # fmt: skip
    kill = QUICK_KILL_DELAY if quick else KILL_DELAY
    seed = int(time.time())
    _say(f"undisturbed replay of {'a slice of ' if quick else ''}MovieLens-100k at {options.speed:g} events/s")
    undisturbed = _replay(options, None, seed)
    _say(f"the same replay, training shard 0 SIGKILLed {kill[0]:g}-{kill[1]:g} s into online training")
    disturbed = _replay(options, kill, seed)
    _say("checkpoint cost on a synthetic table")
    cost = checkpoint_cost(QUICK_TABLE_ROWS if quick else TABLE_ROWS, CHANGED_ROWS)
    chaos: ChaosResult | None = disturbed["chaos"]
    state: Lineage | None = disturbed["lineage"]
    pauses = undisturbed["pauses"] + disturbed["pauses"]
    out: dict[str, Any] = {
        "auc_undisturbed": undisturbed["replay"]["served_progressive_auc"],
        "auc_with_failure": disturbed["replay"]["served_progressive_auc"],
        "recovery_s": chaos.recovery_s if chaos else None,
        "updates_lost": state.updates_lost if state and state.drained else None,
        "updates_applied_twice": state.updates_applied_twice if state and state.drained else None,
        "serving_rows_min_ratio": chaos.serving_rows_min_ratio if chaos else None,
        **cost,
        "max_training_pause_s": max(pauses) if pauses else None,
        "training_pauses_s": [round(p, 4) for p in pauses],
        "checkpoints": len(pauses),
        "killed_after_s": chaos.waited_s if chaos else None,
        "restores": chaos.restores if chaos else None,
        "rollback_samples": chaos.rollback_samples if chaos else None,
        "checkpoint_interval_s": CHECKPOINT_INTERVAL,
        "chaos": {k: v for k, v in vars(chaos).items()} if chaos else disturbed["chaos_error"],
        "lineage": vars(state) if state else None,
        "events": disturbed["replay"]["events"],
        "speed": options.speed,
        "samples_lost": disturbed["replay"]["samples_lost"],
        "samples_duplicated": disturbed["replay"]["samples_duplicated"],
        "predict_errors_with_failure": disturbed["replay"]["predict_errors"],
    }
    bars_met = {}
    for bar, check in BARS.items():
        try:
            bars_met[bar] = bool(check(out))
        except TypeError:  # a figure is missing (None): the bar is not met
            bars_met[bar] = False
    out["bars_met"] = bars_met
    out["limits"] = {bar: _limits(bar, out) for bar, met in bars_met.items() if not met}
    return json_ready(out)
