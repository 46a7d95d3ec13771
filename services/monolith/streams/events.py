"""The EVENTS stream's messages as the joiner reads them: impressions, one or a call's worth.

Model-serving logs a Predict call as one `Impressions` message (the call's shared features
once, then each candidate's own); older producers, and tests, log one `Impression` per
candidate. `expand_impressions` turns the first into the second, so everything downstream
(the join, samples, read-backs) sees one impression per candidate either way.
"""

from __future__ import annotations

from monolith.api.joiner.v1 import joiner_pb2 as pb


def expand_impressions(message: pb.Impressions) -> list[pb.Impression]:
    """One `Impression` per candidate, in candidate order (see `candidate_impression`)."""
    return [candidate_impression(message, idx) for idx in range(len(message.candidates))]


def candidate_impression(message: pb.Impressions, idx: int) -> pb.Impression:
    """The impression of candidate `idx` of a Predict call's message.

    It carries the message's request_id and model_version, the candidate's item id and
    score, the candidate's event time if it has one (else the message's), and the shared
    features merged with the candidate's own (its own win on a name clash).
    """
    candidate = message.candidates[idx]
    impression = pb.Impression(
        request_id=message.request_id,
        item_id=candidate.item_id,
        event_time=candidate.event_time if candidate.HasField("event_time") else message.event_time,
        model_version=message.model_version,
        score=candidate.score,
    )
    features = impression.features
    for name, values in message.shared_features.items():
        if name not in candidate.features:
            features[name].CopyFrom(values)
    for name, values in candidate.features.items():
        features[name].CopyFrom(values)
    return impression
