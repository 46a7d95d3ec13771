"""The controller's Prometheus metrics."""

from __future__ import annotations

import prometheus_client

CHECKPOINTS = prometheus_client.Counter(
    "monolith_controller_checkpoints_total", "Checkpoints written, by kind (full, incremental).", ("kind",)
)
PAUSE_SECONDS = prometheus_client.Histogram(
    "monolith_controller_training_pause_seconds",
    "How long training was paused for one checkpoint's cut (pause request to resume).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0),
)
LAST_PAUSE_SECONDS = prometheus_client.Gauge(
    "monolith_controller_last_training_pause_seconds", "Training pause of the latest checkpoint."
)
LAST_CHECKPOINT = prometheus_client.Gauge(
    "monolith_controller_last_checkpoint_timestamp_seconds", "Wall-clock time the latest checkpoint was written."
)
RESTORES = prometheus_client.Counter(
    "monolith_controller_restores_total", "Rollbacks of every parameter server to a checkpoint, by cause.", ("reason",)
)
LAST_RESTORE_SECONDS = prometheus_client.Gauge(
    "monolith_controller_last_restore_seconds", "Duration of the latest restore, trainers paused throughout."
)
FAILURES = prometheus_client.Counter(
    "monolith_controller_failures_total", "Controller rounds (watch or checkpoint) that failed and were retried."
)
ROLLED_BACK = prometheus_client.Counter(
    "monolith_controller_samples_rolled_back_total",
    "Samples applied and acknowledged after a cut that a restore undid (the stream delivers them again).",
)
RESUME_POSITION = prometheus_client.Gauge(
    "monolith_controller_resume_position",
    "Stream sequence the trainers resumed after at the last restore or trainer check-in (every sample up to it "
    "is in the parameter servers, none after it).",
)
TRAINER_CHECKINS = prometheus_client.Counter(
    "monolith_controller_trainer_checkins_total",
    "Trainers resumed after a restore or a restart (checked in: the controller knows their incarnation).",
)
