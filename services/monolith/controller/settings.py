"""The controller's settings, and how it dials the parts it drives."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from monolith.common.channel import UNLIMITED, ChannelConfig
from monolith.common.config import ConfigModel

RPC_TIMEOUT = 5.0  # seconds for a small call (Stats, Pause, Resume, Status)
STREAM_TIMEOUT = 300.0  # seconds an Export or a Restore of a whole shard may take

# The controller reaches parts that restart (that is its job) and moves whole tables and the
# dense parameters: fast reconnects, no message limit.
CHANNEL = ChannelConfig(max_send_bytes=UNLIMITED, max_receive_bytes=UNLIMITED, fast_reconnect=True)


class ControllerSettings(ConfigModel):
    """How often and how the controller checkpoints.

    Attributes:
        interval: seconds between periodic checkpoints.
        full_every: every this many checkpoints one is full; the others are incremental.
        keep_full: full checkpoints kept, each with its incrementals.
        pause_lease: seconds a trainer stays paused at most if the controller vanishes.
        pause_timeout: seconds to wait for a trainer to finish its step.
        drain_timeout: seconds to wait for delivered samples to be acknowledged at a cut.
        watch_interval: seconds between health checks of every part.
    """

    interval: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 60.0
    full_every: Annotated[int, Field(ge=1)] = 10
    keep_full: Annotated[int, Field(ge=1)] = 2
    pause_lease: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 60.0
    pause_timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 10.0
    drain_timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 5.0
    watch_interval: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
