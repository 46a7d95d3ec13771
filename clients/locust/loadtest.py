"""Runs the Locust load test headless against a local stack: `monolith up`, Locust, stop.

    python clients/locust/loadtest.py --up .monolith-loadtest --users 20 --run-time 60s
    python clients/locust/loadtest.py --stack .monolith/stack.json   # a stack already running

Locust writes `<out>/locust_stats.csv` (and the other CSVs) and `<out>/locust.html`; its
exit code is this script's: 0 when every call succeeded and the SLO gate passed. With
--up, the stack is started on free ports in a fresh data directory and stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from monolith.harness.manifest import StackError, StackManifest
from monolith.harness.replay.launcher import LocalStack

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def locust_command(serving: str, joiner: str, out: Path, args: argparse.Namespace) -> list[str]:
    """Locust's headless command line for one run against `serving` and `joiner`."""
    locust = shutil.which("locust", path=str(Path(sys.executable).parent)) or "locust"
    return [
        locust, "--locustfile", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", serving, "--joiner", joiner,
        "--users", str(args.users), "--spawn-rate", str(args.spawn_rate), "--run-time", args.run_time,
        "--stop-timeout", "10",
        "--candidates", str(args.candidates), "--action-share", str(args.action_share),
        "--max-error-ratio", str(args.max_error_ratio), "--max-p95-ms", str(args.max_p95_ms),
        "--csv", str(out / "locust"), "--html", str(out / "locust.html"),
        *(["--processes", str(args.processes)] if args.processes else []),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--stack", help="stack.json of a running `monolith up`")
    where.add_argument("--up", metavar="DATA_DIR", help="start `monolith up` in DATA_DIR (wiped first), stop it after")
    parser.add_argument("--out", help="where the reports go (default: the stack's directory)")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--spawn-rate", type=float, default=5)
    parser.add_argument("--run-time", default="60s")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--action-share", type=float, default=0.1)
    parser.add_argument("--max-error-ratio", type=float, default=0.0)
    parser.add_argument("--max-p95-ms", type=float, default=500.0)
    parser.add_argument("--processes", type=int, default=0, help="Locust worker processes (0: one process)")
    parser.add_argument("--up-timeout", type=float, default=300.0, help="seconds the stack may take to come up")
    args = parser.parse_args(argv)

    stack = None
    try:
        if args.up:
            shutil.rmtree(args.up, ignore_errors=True)
            stack = LocalStack(args.up, ("--serving-port", "0", "--joiner-port", "0", "--nats-port", "0"))
            info = stack.start(args.up_timeout)
            out = Path(args.out or args.up)
        else:
            info = StackManifest.load(args.stack)
            out = Path(args.out or os.path.dirname(os.path.abspath(args.stack)))
        out.mkdir(parents=True, exist_ok=True)
        print(f"load test: Predict at {info.serving}, ReportActions at {info.joiner}; reports in {out}", file=sys.stderr)
        return subprocess.run(locust_command(info.serving, info.joiner, out, args), check=False).returncode
    except StackError as exc:
        print(f"load test: {exc}", file=sys.stderr)
        return 2
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
