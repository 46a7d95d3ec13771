"""`monolith bench <name> [--json]`: benchmarks that print one JSON line last."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from monolith.common.tf_startup import quiet_tensorflow_startup

# name -> module with `run(args) -> dict`.
BENCHMARKS = {
    "table": "monolith.harness.bench.table",
    "train": "monolith.harness.bench.train",
    "serving": "monolith.harness.bench.serving",
    "online": "monolith.harness.bench.online",
    "ablations": "monolith.harness.bench.ablations",
    "sweep": "monolith.harness.bench.sweep",
    "load": "monolith.harness.bench.load",
    "recovery": "monolith.harness.bench.recovery",
    "capacity": "monolith.harness.bench.capacity",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("--config", default=None, help="model config for the benchmarks that train a model")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line (last line)")
    parser.add_argument(
        "--set", action="append", metavar="PATH=V1[,V2..]",
        help="sweep only: a config field and the values to try (repeatable; the grid is their product)",
    )
    parser.add_argument(
        "--served-late", type=int, default=0, metavar="N",
        help="sweep only: also score each point by a copy refreshed every N events (as served, a sync behind)",
    )
    parser.add_argument("--plot", default=None, help="ablations only: where to write the PNG (default ablations.png)")
    parser.add_argument("--speed", type=float, default=None,
                        help="online only: the replay's events/s (default 120, make run's; 100 with --quick)")
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes and shorter rounds (a 100,000-row large table), for tests"
    )


def run(args: argparse.Namespace) -> int:
    with quiet_tensorflow_startup():  # the train and serving benchmarks import TensorFlow
        module = importlib.import_module(BENCHMARKS[args.name])
    result = module.run(args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    sys.stdout.flush()
    return 0
