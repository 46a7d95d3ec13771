"""The sample-joiner: joins impressions with actions into training samples, exactly once.

- `config`: the join's settings (window, lateness, negative sampling, action kinds, limits).
- `window`: the join itself for one partition, a deterministic function of the events
  read in stream order (no clock, no I/O).
- `partition`: reads one partition of EVENTS, publishes its samples to SAMPLES in batches,
  and restarts from its last snapshot, publishing only what SAMPLES lacks.
- `snapshots`: saves a partition's join incrementally (a base and deltas) and loads it.
- `actions`: checks reported actions and stores them on EVENTS.
- `servicer`, `service`: the `ReportActions` gRPC API and the `monolith joiner` process.
"""
