"""`monolith checkpoint save|list|restore|verify`: checkpoints from the command line.

`save` and `restore` ask the running controller (`--controller`), which pauses the
trainers for the cut or the rollback; `list` and `verify` read the storage directly
(`--storage`), so they work with the cluster down. Errors are one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import datetime
import json

from monolith.api.controller.v1 import controller_pb2 as pb
from monolith.checkpoint.store import CheckpointStore
from monolith.controller.client import ControllerClient
from monolith.controller.servicer import checkpoint_info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `monolith checkpoint`."""
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    save = actions.add_parser("save", help="take a checkpoint now (through the controller)")
    save.add_argument("--controller", required=True, help="host:port of the controller")
    save.add_argument("--full", action="store_true", help="a full checkpoint, not an incremental one")
    listing = actions.add_parser("list", help="list the checkpoints in storage")
    listing.add_argument("--storage", required=True, help="checkpoint storage: a directory or any fsspec URL")
    restore = actions.add_parser("restore", help="roll the cluster back to a checkpoint (through the controller)")
    restore.add_argument("--controller", required=True, help="host:port of the controller")
    restore.add_argument("--id", default="", help="checkpoint id (default: the newest)")
    verify = actions.add_parser("verify", help="check a checkpoint's chain: manifests, sizes, checksums, frames")
    verify.add_argument("--storage", required=True, help="checkpoint storage: a directory or any fsspec URL")
    verify.add_argument("--id", default=None, help="checkpoint id (default: the newest)")
    for p in (save, listing, restore, verify):
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")


def run(args: argparse.Namespace) -> int:
    """Runs one action; MonolithErrors become one line and exit 1 in the CLI."""
    if args.action in ("save", "restore"):
        with ControllerClient(args.controller, timeout=args.timeout) as controller:
            if args.action == "save":
                _print([controller.checkpoint(full=args.full)], args.json)
            else:
                response = controller.restore(args.id)
                _print([response.checkpoint], args.json, f"restored in {response.seconds:.2f} s")
        return 0
    store = CheckpointStore(args.storage)
    if args.action == "list":
        _print([checkpoint_info(m) for m in store.list()], args.json)
        return 0
    chain = store.verify(args.id)
    _print([checkpoint_info(m) for m in chain], args.json, f"{chain[-1].id}: chain of {len(chain)} verified")
    return 0


def _print(infos: list[pb.CheckpointInfo], as_json: bool, footer: str = "") -> None:
    if as_json:
        print(json.dumps([{"id": i.id, "kind": i.kind, "base": i.base, "rows": i.rows, "bytes": i.bytes,
                           "pause_seconds": i.pause_seconds, "stream_position": i.stream_position,
                           "created_at": i.created_at} for i in infos]))  # fmt: skip
        return
    for i in infos:
        when = datetime.datetime.fromtimestamp(i.created_at, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{i.id}  {i.kind:<11}  base {i.base}  {i.rows:>9} rows  {i.bytes:>11} bytes  "
              f"pause {i.pause_seconds:.3f} s  stream {i.stream_position}  {when}Z")  # fmt: skip
    if footer:
        print(footer)
