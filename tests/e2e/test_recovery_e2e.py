"""kill -9 during online training: the local stack recovers by itself and nothing is lost or applied twice.

Starts `monolith up` (the real stack, with its checkpoint controller), replays a slice of
MovieLens-100k slowly through it, and meanwhile SIGKILLs, one after the other at a random
moment, the online trainer, a training embedding-PS shard, the dense-PS and the joiner
(`monolith.harness.chaos`). Each comes back by itself; afterwards every sample the joiner was
expected to publish is on the stream exactly once, the trainer has acknowledged all of
them, the parameter servers hold the effect of each exactly once (the controller's resume
position plus what the trainer applied since equals the consumer's acknowledgement
floor), and the serving shards never lost their rows while a shard they follow was down.
"""

from __future__ import annotations

import threading

import pytest

from helpers.waiting import wait_for
from monolith.controller.lineage import Lineage
from monolith.harness.replay.launcher import LocalStack
from monolith.harness.replay.runner import Replay, ReplayOptions
from monolith.harness.replay.service import FREE_PORTS
from monolith.harness.chaos import ChaosResult, inject, lineage
from monolith.harness.stack.parts import DENSE_PS, JOINER, TRAINER, training_shard

pytestmark = pytest.mark.slow  # a few minutes: ten processes and four recoveries on a loaded machine

LIMIT = 5000  # 4,000 ratings trained in batch, 1,000 replayed
SPEED = 8.0  # events/s: the replay lasts ~2 minutes, long enough for four kills and recoveries
KILLS = (TRAINER, training_shard(0), DENSE_PS, JOINER)  # the trainer first: its counter then spans the others


def test_kill_9_of_trainer_shard_dense_ps_and_joiner_during_a_replay(tmp_path) -> None:
    local = LocalStack(str(tmp_path / "stack"), up_args=(*FREE_PORTS, "--join-window", "10", "--join-lateness", "10",
                                                          "--sync-interval", "0.2"))  # fmt: skip
    manifest = local.start(300)
    try:
        replay = Replay(manifest, ReplayOptions(speed=SPEED, limit=LIMIT, probe_interval=0, progress=False))
        outcome: dict = {}
        replaying = threading.Thread(target=lambda: outcome.update(replay.run()), name="replay")
        replaying.start()
        results: list[ChaosResult] = []
        try:
            for seed, part in enumerate(KILLS):
                results.append(inject(manifest, part, delay=(1.0, 4.0), timeout=240, seed=seed))
                assert replaying.is_alive(), f"the replay ended before {part} was killed: slow it down"
        finally:
            replaying.join(timeout=900)
        assert not replaying.is_alive() and outcome

        for r in results:
            assert r.recovered, f"{r.part} did not come back: {r}"
            # Measured from just before the kill to the recovery (`ServingRows` polls until every
            # serving shard has answered once before it lets the kill happen).
            assert r.serving_rows_min_ratio >= 0.99, r
        by_part = {r.part: r for r in results}
        # A killed parameter server is restored (every PS rolled back to the last cut).
        assert by_part[training_shard(0)].restores >= 1 and by_part[DENSE_PS].restores >= 1
        # The joiner published every expected sample exactly once across its restart.
        assert outcome["samples_lost"] == 0 and outcome["samples_duplicated"] == 0, outcome
        assert outcome["samples_joined"] == outcome["samples_expected"] > 0
        assert outcome["predict_errors"] <= outcome["events"] * 0.05  # serving rode out its peers' restarts

        # The trainer drains the stream; what the PSs hold is each sample once.
        def drained() -> Lineage | None:
            state = lineage(manifest)
            return state if state is not None and state.drained else None

        state = wait_for(drained, "the trainer to drain the samples", timeout=180, interval=0.5)
        assert state.updates_lost == 0 and state.updates_applied_twice == 0, state
        assert state.ack_floor >= outcome["samples_joined"]
        print("chaos:", [(r.part, round(r.recovery_s or -1, 2), r.restores) for r in results], "lineage:", state)
    finally:
        assert local.stop() == 0
