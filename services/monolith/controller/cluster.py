"""What the controller's loop needs of the place it runs in: when to look again, whether it
is the active controller, where trainers are, and where to record what it did.

Locally (`monolith up`) the controller polls the parts' gRPC health every watch interval,
it is the only controller, the trainers are given by flag and its records are log lines
(`LocalView`). In Kubernetes (`monolith.controller.kube.KubeView`) a pod watch wakes it at
once when a pod of the release fails, a Lease elects one active replica, trainers are the
release's trainer pods, and its records are Kubernetes Events.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

_LOGGER = logging.getLogger("monolith.controller")

NORMAL = "Normal"
WARNING = "Warning"


class ClusterView(Protocol):
    """The controller's view of its surroundings (see the module docstring)."""

    def start(self) -> None:
        """Starts whatever runs in the background (a pod watch, the lease's renewal)."""
        ...

    def close(self) -> None:
        """Stops it."""
        ...

    def is_leader(self) -> bool:
        """Whether this controller may act now (checkpoint, restore)."""
        ...

    def trainers(self) -> list[str] | None:
        """The trainers' control addresses now, or None: the ones the controller was given."""
        ...

    def wait(self, stop: threading.Event, timeout: float) -> None:
        """Waits up to `timeout` seconds, less if something changed or `stop` is set."""
        ...

    def record(self, kind: str, reason: str, message: str) -> None:
        """Records one thing the controller did or saw (`kind`: NORMAL or WARNING)."""
        ...


class LocalView:
    """The local stack's view: poll on the interval, always active, records are log lines."""

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def is_leader(self) -> bool:
        return True

    def trainers(self) -> list[str] | None:
        return None

    def wait(self, stop: threading.Event, timeout: float) -> None:
        stop.wait(timeout)

    def record(self, kind: str, reason: str, message: str) -> None:
        # The controller logs what it does itself; this only marks it as a record.
        _LOGGER.debug("%s %s: %s", kind, reason, message)
