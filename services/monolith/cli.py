"""`monolith <role>`: one entry point, one subcommand per role, plus benchmarks."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from monolith.common.errors import ConfigError, MonolithError
from monolith.common.server import ServerStartError
from monolith.common.tf_startup import quiet_tensorflow_startup

# Subcommand name -> (module path, help). Modules expose add_arguments(parser) and
# run(args) -> exit code, and are imported only when chosen (TensorFlow is slow to load).
_COMMANDS: dict[str, tuple[str, str]] = {
    "embedding-ps": ("monolith.embedding_ps.service", "serve one embedding-PS shard"),
    "dense-ps": ("monolith.dense_ps.service", "serve the dense model's parameters"),
    "trainer": ("monolith.trainer.service", "train against the embedding-PS and dense-PS"),
    "serving": ("monolith.serving.service", "serve the Predict API (TF Serving's PredictionService)"),
    "up": ("monolith.harness.stack.service", "run the whole stack on this machine until Ctrl-C"),
    "joiner": ("monolith.joiner.service", "join impressions and actions into training samples (ReportActions API)"),
    "replay": ("monolith.harness.replay.service", "replay MovieLens-100k as live traffic through a running stack"),
    "bench": ("monolith.harness.bench.cli", "run a benchmark and print one JSON line"),
    "controller": ("monolith.controller.service", "checkpoint the training cluster and recover it from failures"),
    "checkpoint": ("monolith.controller.commands", "save, list, restore or verify checkpoints"),
    "chaos": ("monolith.harness.chaos", "SIGKILL a part of a running `monolith up` during a replay; check it recovers"),
}


def _load(module_path: str) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    import importlib

    module = importlib.import_module(module_path)
    return module.add_arguments, module.run


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and runs the chosen role."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="monolith", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    chosen = next((a for a in argv if a in _COMMANDS), None)
    for name, (module_path, help_text) in _COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if name == chosen:
            with quiet_tensorflow_startup():  # the role's module may be the first to import TensorFlow
                add_arguments, run = _load(module_path)
            add_arguments(command)
            command.set_defaults(run=run)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"monolith {args.command}: invalid config: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"monolith {args.command}: {exc}", file=sys.stderr)
        return 2
    except (ServerStartError, MonolithError) as exc:
        # A busy port or an unreachable peer: the cause, not a traceback through gRPC.
        print(f"monolith {args.command}: {_one_line(str(exc))}", file=sys.stderr)
        return 1


def _one_line(message: str) -> str:
    return " ".join(message.split())


if __name__ == "__main__":
    sys.exit(main())
