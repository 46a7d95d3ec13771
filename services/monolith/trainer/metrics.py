"""Prometheus metrics of the online trainer (module globals: the registry is per process)."""

from __future__ import annotations

import prometheus_client

EXAMPLES = prometheus_client.Counter(
    "monolith_trainer_examples_total", "Samples trained on (their step's gradients applied and the samples acked)."
)
EXAMPLES_PER_SECOND = prometheus_client.Gauge(
    "monolith_trainer_examples_per_second", "Samples trained per second over the last few seconds."
)
STEPS = prometheus_client.Counter("monolith_trainer_steps_total", "Training steps applied.")
STEP_SECONDS = prometheus_client.Histogram(
    "monolith_trainer_step_seconds",
    "Time of one training step (lookup, dense tower, gradient pushes), retries excluded.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
BAD_SAMPLES = prometheus_client.Counter(
    "monolith_trainer_bad_samples_total",
    "Samples that cannot be trained on, terminated on the stream (never redelivered).",
    ("reason",),
)
RETRIES = prometheus_client.Counter(
    "monolith_trainer_retries_total",
    "Failed attempts retried after a backoff, by what failed (nats: the stream; ps: a parameter server).",
    ("dependency",),
)
CONSUMER_LAG = prometheus_client.Gauge(
    "monolith_trainer_consumer_lag",
    "Samples on the stream not yet delivered to any trainer sharing the consumer (num_pending).",
)
CONSUMER_ACK_PENDING = prometheus_client.Gauge(
    "monolith_trainer_consumer_ack_pending", "Samples delivered to the trainers and not yet acknowledged."
)
CONSUMER_ACK_FLOOR = prometheus_client.Gauge(
    "monolith_trainer_consumer_ack_floor", "Stream sequence up to which every sample is acknowledged (all trainers)."
)
LAST_SEQUENCE = prometheus_client.Gauge(
    "monolith_trainer_last_applied_sequence",
    "Stream sequence of the newest sample of the last step this trainer applied and acknowledged.",
)
NEWEST_EVENT_TIME = prometheus_client.Gauge(
    "monolith_trainer_newest_event_time_seconds", "Newest event time this trainer has trained on (data time)."
)
READY = prometheus_client.Gauge(
    "monolith_trainer_ready", "1 once the trainer has reached NATS and the parameter servers, else 0."
)
SINCE_ROLLBACK = prometheus_client.Gauge(
    "monolith_trainer_samples_since_rollback",
    "Samples trained on or terminated as bad since this trainer started or was last rolled back to a checkpoint "
    "(with the controller's resume position, where the parameter servers are in the stream).",
)
