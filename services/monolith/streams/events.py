"""The EVENTS stream's messages as the joiner reads them: impressions, one or a call's worth.

Model-serving logs a Predict call as one `Impressions` message (the call's shared features
once, then each candidate's own); older producers, and tests, log one `Impression` per
candidate. `expand_impressions` turns the first into the second, so everything downstream
(the join, samples, read-backs) sees one impression per candidate either way.
"""

from __future__ import annotations

from collections.abc import MutableMapping

from monolith.api.joiner.v1 import joiner_pb2 as pb


def expand_impressions(message: pb.Impressions) -> list[pb.Impression]:
    """One `Impression` per candidate, in candidate order (see `candidate_impression`)."""
    return [candidate_impression(message, idx) for idx in range(len(message.candidates))]


def candidate_impression(message: pb.Impressions, idx: int) -> pb.Impression:
    """The impression of candidate `idx` of a Predict call's message.

    It carries the message's request_id and model_version, the candidate's item id and
    score, its event time (`candidate_time`) and features (`merge_candidate_features`).
    """
    candidate = message.candidates[idx]
    impression = pb.Impression(
        request_id=message.request_id,
        item_id=candidate.item_id,
        event_time=candidate_time(message, candidate),
        model_version=message.model_version,
        score=candidate.score,
    )
    merge_candidate_features(impression.features, message, candidate)
    return impression


def candidate_time(message: pb.Impressions, candidate: pb.Candidate) -> float:
    """A candidate's event time: its own if set, else the message's."""
    return candidate.event_time if candidate.HasField("event_time") else message.event_time


def merge_candidate_features(features: MutableMapping[str, pb.FeatureValues], message: pb.Impressions,
                             candidate: pb.Candidate) -> None:  # fmt: skip
    """Writes the call's shared features, then the candidate's own (its own win on a name clash:
    merging a protobuf map replaces a value whose key it has) into `features`."""
    features.MergeFrom(message.shared_features)  # type: ignore[attr-defined]
    features.MergeFrom(candidate.features)  # type: ignore[attr-defined]
