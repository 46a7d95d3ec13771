"""Whether the parameter servers hold each sample's update exactly once: the accounting behind "nothing lost, nothing applied twice"."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Lineage:
    """Where the parameter servers are in the samples stream, counted two independent ways.

    The controller's resume position R (every sample up to it is in the parameter servers,
    restored from a cut or adopted, none after it) plus the samples the trainer applied
    since it resumed there (its own counter, reset at each rollback) is how many samples
    the parameter servers hold the effect of; the consumer's acknowledgement floor F says
    how many the stream has seen applied. Drained (nothing pending or unacknowledged),
    `R + applied == F` means no sample lost and none applied twice; a difference is one or
    the other. (A count: one lost and one applied twice would cancel. The controller's
    rollback of every PS to one cut is what rules that out by construction.)

    Attributes:
        resume_position: R, the controller's monolith_controller_resume_position.
        applied: the trainer's monolith_trainer_samples_since_rollback.
        ack_floor: F.
        pending: samples not yet delivered.
        ack_pending: samples delivered, not yet acknowledged.
    """

    resume_position: int
    applied: int
    ack_floor: int
    pending: int
    ack_pending: int

    @property
    def drained(self) -> bool:
        return self.pending == 0 and self.ack_pending == 0

    @property
    def updates_lost(self) -> int:
        return max(0, self.ack_floor - self.resume_position - self.applied)

    @property
    def updates_applied_twice(self) -> int:
        return max(0, self.resume_position + self.applied - self.ack_floor)
