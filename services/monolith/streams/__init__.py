"""The streams between the roles, on NATS JetStream: where they are, how they are set up.

Impressions (published by model-serving) and actions (reported through the joiner) share
the stream EVENTS, subject `events.<p>`; the joiner's samples go to the stream SAMPLES,
subject `samples.<p>`, with `p` the partition of the request_id. One stream for both event
kinds gives every partition one total order (the stream sequence), which is what makes
the join a deterministic function of its input (see joiner/).

Every use of the NATS client goes through this package, so another engine would replace
this package and nothing else.
"""
