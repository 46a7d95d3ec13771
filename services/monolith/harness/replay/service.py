"""`monolith replay`: MovieLens-100k as live traffic through a running stack.

    monolith replay --stack DIR/stack.json           # a stack started with `monolith up`
    monolith replay --up --data-dir DIR --speed 100  # start one, replay, stop it

Prints a live progress line on stderr, then a summary table and the path of the
rolling-AUC plot on stdout (with --json, one JSON line last).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from typing import Any

from monolith.common.config import positive_seconds, seconds
from monolith.harness.manifest import StackError, StackManifest
from monolith.harness.replay.launcher import LocalStack
from monolith.harness.replay.report import summary_table
from monolith.harness.replay.runner import Replay, ReplayOptions

PLOT_FILE = "replay_auc.png"
# `--up` asks for free ports: the replay reads every address from stack.json, and a fixed
# port (8500, 8600, 4222) might be taken on this machine.
FREE_PORTS = ("--serving-port", "0", "--joiner-port", "0", "--nats-port", "0")
# The joiner's window for MovieLens: a rating is the user's action on the movie at the very
# time it was shown, so an impression needs no hour-long wait to learn its label. The window
# is also how long a negative waits before the trainers see it while positives train at
# once; the joiner's default hour would train every session on its positives first.
JOIN_WINDOW = 10.0
JOIN_LATENESS = 10.0
# At 100 events/s a 1 s sync serves each event with a model ~100 events behind training,
# which costs ~0.015 AUC on this data (0.727 against 0.741 at 0.1 s, full replays); a sync
# moves only the rows changed since the last one, so syncing often is cheap.
SYNC_INTERVAL = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `monolith replay`."""
    defaults = ReplayOptions()
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--stack", help="the stack.json of a running stack (`monolith up --data-dir DIR` writes DIR/stack.json)")
    target.add_argument("--up", action="store_true",
                        help="start `monolith up --data-dir DIR` (on free ports), replay, then stop it")  # fmt: skip
    parser.add_argument("--data-dir", help="with --up: the stack's data directory (required)")
    parser.add_argument("--speed", type=float, default=defaults.speed,
                        help=f"events per second, the replay's pace (default {defaults.speed:g}; 0: as fast as it goes)")  # fmt: skip
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first N ratings by time (the batch stage gets 80%%, the replay the rest)")  # fmt: skip
    parser.add_argument("--plot", default=None, help=f"the rolling-AUC plot (default <data-dir>/{PLOT_FILE})")
    parser.add_argument("--cache-dir", default=None, help="where the data set is cached")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help=f"concurrent Predict/report_action workers (default {defaults.workers})")  # fmt: skip
    parser.add_argument("--probe-interval", type=float, default=defaults.probe_interval,
                        help=f"seconds between freshness probes (default {defaults.probe_interval:g}; 0: none)")  # fmt: skip
    parser.add_argument("--join-window", type=positive_seconds, default=JOIN_WINDOW,
                        help="with --up: the joiner's window in event-time seconds (default %(default)g: a rating "
                        "is its own action, at the impression's time)")  # fmt: skip
    parser.add_argument("--join-lateness", type=seconds, default=JOIN_LATENESS,
                        help="with --up: the joiner's allowed lateness in event-time seconds (default %(default)g)")  # fmt: skip
    parser.add_argument("--sync-interval", type=positive_seconds, default=SYNC_INTERVAL,
                        help="with --up: seconds between train-to-serve syncs of embeddings and dense "
                        "parameters (default %(default)g)")  # fmt: skip
    parser.add_argument("--up-timeout", type=float, default=300.0,
                        help="with --up: seconds to wait for the stack to be ready (default 300)")  # fmt: skip
    parser.add_argument("--implicit-negatives", action="store_true",
                        help="report nothing for a rating below 4, so the joiner's window makes its negative when it "
                        "closes (default: report it as a dislike, an explicit negative the joiner decides at once)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line (last line)")


def run(args: argparse.Namespace) -> int:
    """Replays; prints the summary. Exit 1 if there is no stack (or it does not come up), 130 on Ctrl-C."""
    if args.up and not args.data_dir:
        raise ValueError("--up needs --data-dir (where the stack keeps its data, logs and stack.json)")
    if args.speed < 0 or math.isnan(args.speed):
        raise ValueError(f"--speed must be >= 0 events/s, got {args.speed}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    data_dir = args.data_dir if args.up else os.path.dirname(os.path.abspath(args.stack))
    options = ReplayOptions(
        speed=args.speed,
        limit=args.limit,
        cache_dir=args.cache_dir,
        plot=os.path.abspath(args.plot or os.path.join(data_dir, PLOT_FILE)),
        workers=args.workers,
        probe_interval=args.probe_interval,
        implicit_negatives=args.implicit_negatives,
    )
    up_args = ("--join-window", f"{args.join_window:g}", "--join-lateness", f"{args.join_lateness:g}",
               "--sync-interval", f"{args.sync_interval:g}")  # fmt: skip
    try:
        result = replay(options, stack_file=None if args.up else args.stack, data_dir=data_dir if args.up else None,
                        up_timeout=args.up_timeout, up_args=up_args)  # fmt: skip
    except KeyboardInterrupt:
        print("monolith replay: interrupted", file=sys.stderr)
        return 130
    except StackError as exc:
        print(f"monolith replay: {exc}", file=sys.stderr)
        return 1
    print_summary(result, as_json=args.json)
    return 0


def replay(options: ReplayOptions, stack_file: str | None = None, data_dir: str | None = None,
           up_timeout: float = 300.0,
           up_args: tuple[str, ...] = ("--join-window", f"{JOIN_WINDOW:g}", "--join-lateness", f"{JOIN_LATENESS:g}",
                                       "--sync-interval", f"{SYNC_INTERVAL:g}"),
           ) -> dict[str, Any]:  # fmt: skip
    """Replays through the stack of `stack_file`, or through a stack started in `data_dir` and stopped after.

    SIGTERM ends the replay like Ctrl-C does, so a stack started here is always stopped.

    Args:
        options: how to replay.
        stack_file: a running stack's stack.json.
        data_dir: start `monolith up --data-dir data_dir` (on free ports) instead.
        up_timeout: seconds the stack has to come up.
        up_args: more flags for `monolith up` (by default the joiner's window and the sync
            interval that fit the replay).
    """
    previous = signal.signal(signal.SIGTERM, _interrupt)
    local = None
    try:
        if data_dir is not None:
            local = LocalStack(data_dir, up_args=FREE_PORTS + up_args)
            print(f"[replay] starting the stack: monolith up --data-dir {local.data_dir} (its output: {local.log_path})",
                  file=sys.stderr, flush=True)  # fmt: skip
            stack = local.start(up_timeout)
            print(f"[replay] stack ready: serving {stack.serving}, joiner {stack.joiner}, NATS {stack.nats}, "
                  f"logs in {stack.logs}", file=sys.stderr, flush=True)  # fmt: skip
        else:
            assert stack_file is not None
            stack = StackManifest.load(stack_file)
        return Replay(stack, options).run()
    finally:
        if local is not None:
            print("[replay] stopping the stack", file=sys.stderr, flush=True)
            local.stop()
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def print_summary(result: dict[str, Any], as_json: bool) -> None:
    """The summary table and the plot's path; with `as_json`, the JSON line last."""
    print("monolith replay: summary")
    print(summary_table(result))
    if result.get("plot"):
        print(f"plot: {result['plot']}")
    if as_json:
        print(json.dumps(json_ready(result), sort_keys=True))
    sys.stdout.flush()


def json_ready(result: dict[str, Any]) -> dict[str, Any]:
    """Floats rounded to 4 places; NaN (no figure) as null, which JSON can carry."""
    def clean(value: Any) -> Any:
        if isinstance(value, float):
            return None if math.isnan(value) or math.isinf(value) else round(value, 4)
        return value

    return {key: clean(value) for key, value in result.items()}
