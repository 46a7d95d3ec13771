"""Training samples from the SAMPLES stream (serialized `Sample` protos) to a `Batch`.

A sample carries each feature's raw values as text, exactly as model-serving received
them, keyed by the feature's source (the Predict input name). Ids are hashed from that
text with the source as the hash's feature key, as serving does (`FeatureIdCache`), so
the ids a trainer updates are the ids serving looks up: an int 196 and the text "196"
hash alike.

A sample that cannot be trained on (not a `Sample`, an unknown or missing feature, a
single-valued feature without exactly one value, a label outside [0, 1], an event time
that is not a time) is rejected with a reason; the others still make a batch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
from google.protobuf.message import DecodeError

from monolith.api.joiner.v1 import joiner_pb2
from monolith.data.batch import Batch
from monolith.data.feature_ids import FeatureIdCache

PAD = ""  # pads the rows of a multi-valued string input; not a value


@dataclasses.dataclass(frozen=True)
class SampleFeature:
    """One feature as samples carry it.

    Attributes:
        source: the key in `Sample.features` (the Predict input name); also the hash key.
        multi_valued: whether a sample may hold several values (else exactly one).
    """

    source: str
    multi_valued: bool = False


@dataclasses.dataclass(frozen=True)
class Rejected:
    """A sample left out of a batch.

    Attributes:
        position: its position in the decoded payloads.
        kind: "malformed" (not a `Sample`) or "invalid" (a `Sample` the model cannot use).
        reason: why, in one line.
    """

    position: int
    kind: str
    reason: str


@dataclasses.dataclass(frozen=True)
class DecodedSamples:
    """What a list of payloads turned into.

    Attributes:
        batch: the usable samples, in input order (ids per source, labels, event times).
        kept: the input position of each of the batch's examples.
        rejected: every sample left out.
    """

    batch: Batch
    kept: list[int]
    rejected: list[Rejected]


class SampleError(ValueError):
    """A sample that cannot be trained on; the message says why.

    Attributes:
        kind: "malformed" or "invalid" (see `Rejected`).
    """

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


class SampleDecoder:
    """Turns `Sample` payloads into batches for the model's features.

    Args:
        features: the features the model reads, in its order.
        max_time_ahead: seconds an event time may be ahead of this machine's clock. The
            clock is only a sanity bound here, as on the embedding-PS (which refuses a
            whole step with such a time): a far-future time would move every table's
            data clock and expire every row.
        clock: the wall clock (seconds since the epoch), for that bound only.
    """

    def __init__(self, features: Sequence[SampleFeature], max_time_ahead: float = 86_400.0,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        if not features:
            raise ValueError("features: at least one feature is required")
        by_source: dict[str, SampleFeature] = {}
        for feature in features:  # two features may read one source; it is decoded once
            if by_source.setdefault(feature.source, feature) != feature:
                raise ValueError(f"features: source {feature.source!r} is declared both single- and multi-valued")
        self.features = tuple(by_source.values())
        self._known = {f.source for f in self.features}
        self._max_time_ahead = max_time_ahead
        self._clock = clock
        self._ids = FeatureIdCache()

    def decode(self, payloads: Sequence[bytes]) -> DecodedSamples:
        """A batch of the usable samples among `payloads`, and why the others were left out."""
        values: dict[str, list[list[str]]] = {f.source: [] for f in self.features}
        labels: list[float] = []
        times: list[int] = []
        kept: list[int] = []
        rejected: list[Rejected] = []
        now = self._clock()
        for position, payload in enumerate(payloads):
            try:
                sample = self.parse(payload)
                rows = self._rows(sample)
                self._check_times(sample, now)
            except SampleError as exc:
                rejected.append(Rejected(position, exc.kind, str(exc)))
                continue
            for source, row in rows.items():
                values[source].append(row)
            labels.append(sample.label)
            times.append(math.floor(sample.event_time))
            kept.append(position)
        ids: dict[str, np.ndarray] = {}
        row_splits: dict[str, np.ndarray] = {}
        for feature in self.features:
            rows = values[feature.source]
            flat = np.array([value for row in rows for value in row], dtype=object)
            ids[feature.source] = self._ids(feature.source, flat) if flat.size else np.zeros(0, np.int64)
            row_splits[feature.source] = np.cumsum([0] + [len(row) for row in rows], dtype=np.int64)
        batch = Batch(ids, row_splits, np.array(labels, np.float32), np.array(times, np.int64))
        return DecodedSamples(batch, kept, rejected)

    @staticmethod
    def parse(payload: bytes) -> joiner_pb2.Sample:
        """The `Sample` in a payload.

        Raises:
            SampleError: the payload is not a serialized `Sample`.
        """
        sample = joiner_pb2.Sample()
        try:
            sample.ParseFromString(payload)
        except DecodeError as exc:
            raise SampleError(f"not a Sample message ({len(payload)} bytes): {exc}", "malformed") from None
        return sample

    def _rows(self, sample: joiner_pb2.Sample) -> dict[str, list[str]]:
        """Each feature's values in one sample, checked against the feature."""
        unknown = sorted(set(sample.features) - self._known)
        if unknown:
            raise SampleError(
                f"unknown feature(s) {', '.join(_short(n) for n in unknown[:5])}; the model reads "
                f"{', '.join(f.source for f in self.features)}"
            )
        rows: dict[str, list[str]] = {}
        for feature in self.features:
            if feature.source not in sample.features:
                raise SampleError(f"feature {feature.source!r} is missing")
            row = list(sample.features[feature.source].values)
            if feature.multi_valued:
                row = [value for value in row if value != PAD]
            elif len(row) != 1:
                raise SampleError(f"feature {feature.source!r} is single-valued but has {len(row)} values")
            rows[feature.source] = row
        if not 0.0 <= sample.label <= 1.0:  # also refuses NaN
            raise SampleError(f"label must be in [0, 1], got {sample.label}")
        if not 0.0 <= sample.sample_rate <= 1.0:
            raise SampleError(f"sample_rate must be in [0, 1], got {sample.sample_rate}")
        return rows

    def _check_times(self, sample: joiner_pb2.Sample, now: float) -> None:
        event_time = sample.event_time
        if not (math.isfinite(event_time) and event_time >= 0):
            raise SampleError(f"event_time must be a finite number of seconds >= 0, got {event_time}")
        if event_time > now + self._max_time_ahead:
            raise SampleError(
                f"event_time {event_time:.0f} is more than {self._max_time_ahead:g} s ahead of this machine's clock"
            )


def _short(text: str, limit: int = 64) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
