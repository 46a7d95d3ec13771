"""`monolith bench capacity`: the highest request rate the whole loop keeps pace with, against each stage alone.

1. **Stack and tables.** `monolith up` on free ports (the shipped MovieLens config, unchanged;
   a join window of `JOIN_WINDOW` s and lateness `JOIN_LATENESS` s, so negatives flow within
   a step). A batch stage trains one pass over a synthetic history that touches each of the
   world's 1,000,000 users once (`loop.fill_tables`), through the stack's training shards and
   dense-PS as the replay's batch stage does; the controller then checkpoints it (a later
   rollback keeps it) and the run waits until the serving shards hold the rows.
2. **Predict alone** on the stack's serving (`stages.predict_alone`); the search starts at
   `START_FRACTION` of it and never goes above it.
3. **The loop** (`loop`). Open-loop traffic from the world (`synthetic`: Zipf users over
   1,000,000 ids and items over 100,000, 20..100 candidates per request, clicks drawn from
   known probabilities and reported through ReportActions) at a target rate for one step;
   `pace.missed_pace` says whether the loop kept pace (the generator kept its schedule, no
   impression dropped, the joiner's lag and the trainers' backlog not growing by more than a
   second of traffic, freshness p99 <= 5 s from probes running throughout); `pace.RateSearch`
   doubles, then bisects. Between steps the backlogs drain (bounded). Each step also records
   the CPU each of the stack's processes used.
4. **Exactly once.** After the last step one impression per partition far ahead in event
   time closes every join window; SAMPLES is read back and reconciled with the samples the
   traffic must produce (every candidate of every answered call, positive if its click was
   reported), leaving out steps in which serving dropped impressions: `samples_lost`,
   `samples_duplicated`.
5. **Tables.** `table_rows`: every table's rows on every training shard, from their /metrics.
6. **Each stage alone** (`stages`), the stack idle: impression publishing (a serving process
   of its own publishing to a NATS server of the benchmark's own), the joiner (on that server,
   its EVENTS holding a copy of the loop's followed by the impressions just published; paused
   between rounds) with the bare JetStream publish rate of a nats-py client, on copies of the
   joiner's messages, in rounds interleaved with the joiner's; and the trainer (a trainer of
   its own reading the loop's SAMPLES from the start).

Figures in candidates/s compare like with like: a sample is a candidate the joiner kept (all
of them at the shipped negative sample rate of 1), so a stage's samples/s is divided by the
loop's samples per candidate. `bars_met` checks exactly the issue's bars; a missed bar gets
`limits`: what bears on it, with a sampling profile of the stage alone that the first step
missing pace points at (its role run again under `sampling.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import tempfile
import time
import uuid
from typing import Any, Callable

from monolith.harness.bench import pace, stages
from monolith.harness.bench.loop import (
    Probes,
    StackView,
    Traffic,
    fill_tables,
    reconcile_samples,
    search,
    wait_until_served,
)
from monolith.harness.bench.stages import FreshNats, ImpressionsAlone, JoinerAlone, RankingRequest, progress
from monolith.harness.bench.synthetic import SyntheticWorld, TrafficShape
from monolith.harness.manifest import StackManifest
from monolith.harness.replay.launcher import LocalStack
from monolith.model.config import load_model_config
from monolith.streams.config import EVENTS_STREAM
from monolith_client import MonolithClient

SEED = 0
JOIN_WINDOW = 5.0  # event-time seconds an impression waits for its click
JOIN_LATENESS = 2.0
CONCURRENCY = 8  # closed-loop callers of each stage measured alone


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How long each part runs (the default run, or --quick)."""

    step_seconds: float
    max_steps: int
    drain_seconds: float
    stage_seconds: float  # one round of a stage alone
    bare_seconds: float  # one bare publish round (the joiner is paused meanwhile: kept short)
    events_copied: int
    resolution: float


FULL = Sizes(step_seconds=25.0, max_steps=9, drain_seconds=60.0, stage_seconds=3.0, bare_seconds=0.5,
             events_copied=400_000, resolution=0.15)  # fmt: skip
QUICK = Sizes(step_seconds=10.0, max_steps=4, drain_seconds=20.0, stage_seconds=1.0, bare_seconds=0.5,
              events_copied=100_000, resolution=0.25)  # fmt: skip
START_FRACTION = 1 / 16  # the search starts at this fraction of what Predict alone sustains

BARS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "loop_candidates_per_s>=0.5*min_stage_candidates_per_s":
        lambda r: r["loop_candidates_per_s"] >= 0.5 * r["min_stage_candidates_per_s"],
    "joiner_samples_per_s>=0.5*jetstream_publish_per_s":
        lambda r: r["joiner_samples_per_s"] >= 0.5 * r["jetstream_publish_per_s"],
    "table_rows>=1000000": lambda r: r["table_rows"] >= 1_000_000,
    "samples_lost==0": lambda r: r["samples_lost"] == 0,
    "samples_duplicated==0": lambda r: r["samples_duplicated"] == 0,
}  # fmt: skip



# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = QUICK if getattr(args, "quick", False) else FULL
    world = SyntheticWorld(TrafficShape(), SEED)
    run_id = uuid.uuid4().hex[:8]
    limits: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="monolith-bench-capacity-") as workdir:
        up = ("--serving-port", "0", "--joiner-port", "0", "--nats-port", "0",
              "--join-window", f"{JOIN_WINDOW:g}", "--join-lateness", f"{JOIN_LATENESS:g}")  # fmt: skip
        if getattr(args, "config", None):
            up += ("--config", args.config)
        local = LocalStack(os.path.join(workdir, "stack"), up)
        stack = local.start(timeout=300)
        view = StackView(stack)
        client = MonolithClient(stack.serving, joiner_address=stack.joiner, timeout=10.0)
        try:
            result = _run_on_stack(stack, view, client, world, sizes, run_id, workdir, limits)
        finally:
            client.close()
            view.close()
            local.stop()
    result["bars_met"] = {bar: bool(check(result)) for bar, check in BARS.items()}
    result["limits"] = {bar: lines for bar, lines in limits.items() if not result["bars_met"].get(bar, True)}
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}


def _run_on_stack(stack: StackManifest, view: StackView, client: MonolithClient, world: SyntheticWorld, sizes: Sizes,
                  run_id: str, workdir: str, limits: dict[str, list[str]]) -> dict[str, Any]:  # fmt: skip
    shape = world.shape
    result: dict[str, Any] = {"users": shape.users, "items": shape.items,
                              "candidates_per_request": [shape.min_candidates, shape.max_candidates]}  # fmt: skip
    result.update(fill_tables(stack, world))
    wait_until_served(view, timeout=120.0)

    traffic = Traffic(world, client, f"cap{run_id}-r")
    alone = [traffic.features(10**9 + i) for i in range(256)]  # requests no step sends
    progress(f"Predict alone: {CONCURRENCY} callers, {stages.ROUNDS} rounds of {sizes.stage_seconds:g} s")
    result.update(stages.predict_alone(client, alone, CONCURRENCY, sizes.stage_seconds))
    ceiling = result["predict_requests_per_s"]

    probes = Probes(stack, f"cap{run_id}-p")
    probes.start()
    cpu_before, wall_before = _cpu_seconds(), time.monotonic()
    start = max(0.5, round(ceiling * START_FRACTION, 1))
    rates = pace.RateSearch(
        start, sizes.resolution, sizes.max_steps, floor=min(start, 0.5), ceiling=max(start, ceiling)
    )
    try:
        steps, clean = search(traffic, view, probes, rates, sizes.step_seconds, sizes.drain_seconds)
    finally:
        probes.stop()
    generator_cpu = (_cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
    best = rates.best
    best_row = next((s for s in steps if s["kept_pace"] and s["target_rps"] == round(best, 2)), None) if best else None
    result.update({
        "loop_requests_per_s": best_row["requests_per_s"] if best_row else 0.0,
        "loop_candidates_per_s": best_row["candidates_per_s"] if best_row else 0.0,
        "loop_samples_per_s": best_row["samples_per_s"] if best_row else 0.0,
        "loop_freshness_p99_s": best_row["freshness_p99_s"] if best_row else math.nan,
        "steps": steps,
        "generator_cpu_share": round(generator_cpu, 3),
        "predict_errors": traffic.predict_errors,
        "action_errors": traffic.action_errors,
    })  # fmt: skip
    last_event = view.last_sequence(EVENTS_STREAM)
    config = load_model_config(stack.config)
    result.update(reconcile_samples(traffic, view, clean, config.training.negative_sample_rate, timeout=300.0))
    rows = view.rows("training")
    result["table_rows"] = int(sum(rows.values()))
    result["table_rows_by_table"] = {table: int(n) for table, n in sorted(rows.items())}

    per_candidate = (
        result["samples_expected"] / result["candidates_impressed"] if result["candidates_impressed"] else 1.0
    )
    factory = lambda address: MonolithClient(address, timeout=10.0)  # noqa: E731
    progress("impression publishing and the joiner alone, on a NATS server of their own")
    with FreshNats(os.path.join(workdir, "stages"), stack.partitions) as nats:
        joiner = JoinerAlone(stack, nats, workdir)
        joiner.start()  # paused before any event is there: its whole backlog is measured
        try:
            joiner.copy_loop_events(last_event, sizes.events_copied)
            impressions = ImpressionsAlone(stack, nats, workdir, factory)
            result.update(impressions.measure(alone, CONCURRENCY, sizes.stage_seconds))
            progress("the joiner alone, interleaved with bare JetStream publishes")
            result.update(joiner.measure(sizes.stage_seconds, sizes.bare_seconds))
        finally:
            joiner.stop()
    progress("the trainer alone")
    result.update(stages.trainer_alone(stack, workdir, f"capacity{run_id}", sizes.stage_seconds))
    result["samples_per_candidate"] = round(per_candidate, 4)
    stage_candidates = {
        "predict": result["predict_candidates_per_s"],
        "impressions": result["impressions_candidates_per_s"],
        "joiner": result["joiner_samples_per_s"] / per_candidate,
        "trainer": result["trainer_samples_per_s"] / per_candidate,
    }
    result["stage_candidates_per_s"] = {k: round(v, 1) for k, v in stage_candidates.items()}
    known = {k: v for k, v in stage_candidates.items() if not math.isnan(v)}
    result["slowest_stage"] = min(known, key=known.get) if known else None
    result["min_stage_candidates_per_s"] = known[result["slowest_stage"]] if known else math.nan
    _explain(result, stack, workdir, sizes, last_event, alone, factory, limits)
    return result


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _explain(result: dict[str, Any], stack: StackManifest, workdir: str, sizes: Sizes, last_event: int,
             alone: list[RankingRequest], factory: Callable[[str], Any],
             limits: dict[str, list[str]]) -> None:  # fmt: skip
    """What bears on each missed bar, with a sampling profile of the stage implicated (run again alone)."""
    missed = {bar for bar, check in BARS.items() if not check(result)}
    profiles: dict[str, list[str]] = {}

    def profile(stage: str) -> list[str]:
        if stage not in profiles:
            progress(f"profiling the {stage} alone (a bar was missed)")
            profiles[stage] = _profile_stage(stage, stack, workdir, sizes, last_event, alone, factory)
        return profiles[stage]

    loop_bar = "loop_candidates_per_s>=0.5*min_stage_candidates_per_s"
    if loop_bar in missed:
        failed = [s for s in result["steps"] if not s["kept_pace"]]
        first = min(failed, key=lambda s: s["target_rps"]) if failed else None
        reasons = first["missed"] if first else ["no step missed pace: the search ran out of steps"]
        stage = first["implicates"] if first else str(result["slowest_stage"])
        limits[loop_bar] = [
            f"the loop kept pace up to {result['loop_requests_per_s']} requests/s "
            f"({result['loop_candidates_per_s']} candidates/s); at "
            f"{first['target_rps'] if first else '?'} requests/s: {'; '.join(reasons)}",
            f"stages alone, candidates/s: {result['stage_candidates_per_s']} (slowest: {result['slowest_stage']})",
            f"CPU over that step, in cores, per process (this machine has {os.cpu_count()}; 'generator' is this "
            f"benchmark's traffic): {first['cpu_share'] if first else {}}",
            f"sampling profile of the {stage} alone (the stage that step points at most):", *profile(stage),
        ]  # fmt: skip
    joiner_bar = "joiner_samples_per_s>=0.5*jetstream_publish_per_s"
    if joiner_bar in missed:
        limits[joiner_bar] = [
            f"the joiner alone published {result['joiner_samples_per_s']:.0f} samples/s over "
            f"{result['joiner_rounds']} rounds (restarts during them: {result['joiner_restarts_alone']}); a bare "
            f"nats-py client published {result['jetstream_publish_per_s']:.0f} messages/s of the same "
            f"{result['sample_message_bytes']:.0f} bytes",
            "sampling profile of the joiner alone:", *profile("joiner"),
        ]  # fmt: skip
    if "table_rows>=1000000" in missed:
        limits["table_rows>=1000000"] = [f"rows per table on the training shards: {result['table_rows_by_table']}"]
    for bar in ("samples_lost==0", "samples_duplicated==0"):
        if bar in missed:
            limits[bar] = [
                f"{result['samples_lost']} of {result['samples_expected']} expected samples lost, "
                f"{result['samples_duplicated']} duplicated, {result['samples_unexpected']} unexpected, "
                f"{result['samples_mislabeled']} mislabeled; steps: "
                + ", ".join(f"{s['target_rps']}/s {'ok' if s['kept_pace'] else 'missed'}" for s in result["steps"]),
            ]


def _profile_stage(stage: str, stack: StackManifest, workdir: str, sizes: Sizes, last_event: int,
                   alone: list[RankingRequest], factory: Callable[[str], Any]) -> list[str]:  # fmt: skip
    """The stage run again alone, shorter, its role under the sampling profiler; the profile's lines."""
    if stage == "trainer":
        measured = stages.trainer_alone(stack, workdir, f"capacity-profile{os.getpid()}", sizes.stage_seconds,
                                        rounds=2, profile=True)  # fmt: skip
        return list(measured["profile"])
    with FreshNats(os.path.join(workdir, f"profile-{stage}"), stack.partitions) as nats:
        if stage == "joiner":
            joiner = JoinerAlone(stack, nats, workdir, profile=True)
            joiner.start()  # paused before any event is there: the profile covers its backlog
            joiner.copy_loop_events(last_event, sizes.events_copied)
            return joiner.profile(3 * sizes.stage_seconds)
        measured = ImpressionsAlone(stack, nats, workdir, factory, profile=True).measure(
            alone, CONCURRENCY, sizes.stage_seconds, rounds=2
        )
    return list(measured["profile"])
