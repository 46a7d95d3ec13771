"""The replay's data: MovieLens-100k in time order, as a product backend would send it.

The examples come from `load_movielens` (hashed ids, labels, timestamps) and are split by
time like every other run (`split_by_time`): the first part trains in batch, the rest is
replayed. Each replayed rating becomes a Predict whose features are the raw values
(`raw_feature_values`), so serving hashes them itself; the hashed ids of the examples map
back to those raw values (the hash is collisionless for this data, and checked to be).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from monolith.data.batch import Batch
from monolith.data.feature_ids import feature_ids
from monolith.data.movielens import load_movielens, raw_feature_values, split_by_time

USER_FEATURES = ("user_id", "age", "gender", "occupation", "zip")
ITEM_FEATURES = ("movie_id", "genres")


@dataclasses.dataclass(frozen=True, eq=False)
class ReplayData:
    """The batch part and the replayed part, with raw values for every replayed event.

    Attributes:
        data: every example used, in time order (the running-mean baseline runs over it).
        train: the first part, trained in batch.
        stream: the replayed part, in time order.
        users: raw user features, one dict per user.
        movies: raw movie features, one dict per movie.
        user_of: int [len(stream)], each replayed event's index into `users`.
        movie_of: int [len(stream)], each replayed event's index into `movies`.
    """

    data: Batch
    train: Batch
    stream: Batch
    users: list[dict[str, Any]]
    movies: list[dict[str, Any]]
    user_of: np.ndarray
    movie_of: np.ndarray

    def __len__(self) -> int:
        return len(self.stream)

    def user(self, i: int) -> dict[str, Any]:
        """Replayed event i's user features (one value each)."""
        return self.users[self.user_of[i]]

    def movie(self, i: int) -> dict[str, Any]:
        """Replayed event i's movie features: movie_id and its genres (a list)."""
        return self.movies[self.movie_of[i]]

    def item_id(self, i: int) -> str:
        """The item id actions on event i are reported under (the movie_id as text)."""
        return str(self.movie(i)["movie_id"])

    def label(self, i: int) -> float:
        return float(self.stream.labels[i])

    def event_time(self, i: int) -> float:
        return float(self.stream.timestamps[i])

    def features(self, indices: list[int] | range) -> dict[str, list[Any]]:
        """Predict inputs for several replayed events, one entry per event per feature."""
        users = [self.user(i) for i in indices]
        movies = [self.movie(i) for i in indices]
        out: dict[str, list[Any]] = {name: [u[name] for u in users] for name in USER_FEATURES}
        out.update({name: [m[name] for m in movies] for name in ITEM_FEATURES})
        return out


def load_replay_data(cache_dir: str | os.PathLike | None = None, limit: int | None = None,
                     fraction: float = 0.8) -> ReplayData:  # fmt: skip
    """Loads MovieLens-100k (the first `limit` ratings by time) and splits it for the replay.

    Raises:
        ValueError: `limit` leaves nothing to replay, or a hashed id has no raw value.
    """
    data = load_movielens(cache_dir, limit=limit)
    train, stream = split_by_time(data, fraction)
    if len(stream) == 0:
        raise ValueError(f"nothing to replay: {len(data)} ratings, the last {1 - fraction:.0%} of them is empty")
    raw = raw_feature_values(cache_dir)
    users, movies = raw["users"], raw["movies"]
    return ReplayData(
        data=data,
        train=train,
        stream=stream,
        users=users,
        movies=movies,
        user_of=_index_of("user_id", users, stream.ids["user_id"]),
        movie_of=_index_of("movie_id", movies, stream.ids["movie_id"]),
    )


def _index_of(name: str, rows: list[dict[str, Any]], hashed: np.ndarray) -> np.ndarray:
    """For each hashed id of feature `name`, the index of the row whose raw value hashes to it."""
    row_ids = feature_ids(name, np.array([row[name] for row in rows]))
    if np.unique(row_ids).shape[0] != row_ids.shape[0]:
        raise ValueError(f"two raw {name} values share a hashed id")
    order = np.argsort(row_ids)
    position = np.minimum(np.searchsorted(row_ids[order], hashed), len(order) - 1)
    found = order[position]
    if np.any(row_ids[found] != hashed):
        raise ValueError(f"{np.count_nonzero(row_ids[found] != hashed)} replayed {name}s have no raw value")
    return found
