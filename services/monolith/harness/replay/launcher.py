"""`monolith up` as a child process, for the replay, the benchmarks and the load test.

The replay talks to the stack only through the addresses `monolith up` writes to
`<data-dir>/stack.json` (`monolith.harness.manifest`); it never imports the stack's code.
With `--up` it starts `monolith up` itself, waits (bounded) for a stack.json written by that very process (the
`pid` in the file, so a stale file of an earlier stack is never taken for it), and stops it
with SIGTERM at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from monolith.common.process import terminate
from monolith.harness.manifest import StackError, StackManifest, manifest_path


class LocalStack:
    """`monolith up --data-dir DIR` as a child process.

    Args:
        data_dir: the stack's data directory (created if missing).
        up_args: more flags for `monolith up`.
        log_path: where `monolith up`'s own output goes (default `<data_dir>/up.log`).
    """

    def __init__(self, data_dir: str, up_args: tuple[str, ...] = (), log_path: str | None = None) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.stack_file = manifest_path(self.data_dir)
        self.log_path = log_path or os.path.join(self.data_dir, "up.log")
        self._up_args = up_args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> StackManifest:
        """Starts `monolith up` and waits until it has written its stack.json.

        Raises:
            StackError: `monolith up` exited, or wrote no stack.json within `timeout` seconds
                (it is stopped then); the message ends with its log's tail.
        """
        os.makedirs(self.data_dir, exist_ok=True)
        command = [sys.executable, "-m", "monolith.cli", "up", "--data-dir", self.data_dir, *self._up_args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise StackError(f"monolith up exited with {code} before the stack was ready{self._log_tail()}")
            manifest = self._own_manifest()
            if manifest is not None:
                return manifest
            if time.monotonic() > deadline:
                self.stop()
                raise StackError(f"monolith up wrote no {self.stack_file} within {timeout:.0f} s{self._log_tail()}")
            time.sleep(0.25)

    def _own_manifest(self) -> StackManifest | None:
        """stack.json if it exists and names our child as the stack's process."""
        if not os.path.exists(self.stack_file):
            return None  # not written yet (it is replaced atomically, so never half-written)
        try:
            manifest = StackManifest.load(self.stack_file)
        except StackError:
            return None  # removed between the check and the read, or an older stack's leftover
        assert self.process is not None
        return manifest if manifest.pid == self.process.pid else None

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the stack stops its parts in order), SIGKILL after `timeout`; the exit code."""
        if self.process is None:
            return None
        return terminate(self.process, timeout)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                tail = f.readlines()[-lines:]
        except OSError:
            return ""
        return f" (log {self.log_path}):\n" + "".join(tail).rstrip() if tail else f" (log {self.log_path} is empty)"
