"""The streams between the roles, on NATS JetStream: where they are, how they are set up.

Impressions (published by model-serving) and actions (reported through the joiner) share
the stream EVENTS, subject `events.<p>`; the joiner's samples go to the stream SAMPLES,
subject `samples.<p>`, with `p` the partition of the request_id. One stream for both event
kinds gives every partition one total order (the stream sequence), which is what makes
the join a deterministic function of its input (see joiner/).

Every use of the NATS client goes through this package (an import contract says so), so
another engine would replace this package and nothing else:
- `config`: where the streams are, their limits, subjects and partitions.
- `ids`: the one rule for ids from outside and the message ids built from them.
- `jetstream`: connecting, setting the streams up, an event loop for synchronous callers.
- `publish`: one message, or many pipelined, each with its message id.
- `reader`: one subject in sequence order from a given sequence (the joiner's partitions).
- `readback`: a whole stream read back, synchronously (tests, tools, the harness).
- `watch`: following a stream with a callback (the replay).
- `pull_consumer`: the durable consumer the online trainers share, and its admin.
- `state_store`: named blobs beside the streams (the joiner's snapshots).
- `nats_server`: a local nats-server for the local stack and the tests.
"""
