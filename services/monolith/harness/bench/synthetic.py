"""Synthetic traffic at scale: Zipf users and items, ranking requests, clicks from known probabilities.

`SyntheticWorld` is a population the MovieLens model config fits unchanged (the features
user_id, age, gender, occupation, zip, movie_id, genres), at any size: by default a million
users and a hundred thousand items, so the tables of a stack it drives hold over a million rows.

- **Popularity.** Users and items are drawn from bounded Zipf laws (`BoundedZipf`): rank r of
  n has probability proportional to r^-s, sampled by inverting the cumulative distribution;
  ranks are shuffled into ids, so a popular id is not a small one.
- **Features.** Every user id has fixed side features (an age bucket, a gender, one of the 21
  MovieLens occupations, a three-digit zip prefix) and a favourite genre; every item id has
  one to three of the 18 MovieLens genres. All are drawn once from the seed.
- **Clicks.** A user clicks a shown item with the known probability
  `sigmoid(base + taste[user] + quality[item] + affinity * [the item has the user's favourite genre])`
  (`click_probability`), so labels carry signal a model can learn, and a draw's expected
  value is known exactly.
- **Requests.** Request k ranks 20..100 distinct candidates (uniform) for one user, both
  drawn from the laws above, and its clicks are drawn from those probabilities; everything
  about request k is a function of (seed, k) alone, so traffic is the same whatever order
  or thread builds it.
- **History.** `history` touches every user once (one impression each, its item and label
  drawn as above), as hashed examples for a batch stage that fills the tables.

Raw values go to the Predict API as a product backend would send them; the history's ids are
the same values hashed by `monolith.data.feature_ids`, the one id rule serving applies.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from monolith.data.batch import Batch
from monolith.data.feature_ids import feature_ids
from monolith.data.movielens import GENRES

AGES = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
GENDERS = ("F", "M")
OCCUPATIONS = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive", "healthcare",
    "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer", "retired", "salesman",
    "scientist", "student", "technician", "writer",
)  # fmt: skip
ZIPS = tuple(f"{z:03d}" for z in range(1000))
ITEM_GENRES = GENRES[1:]  # "unknown" is MovieLens's mark of a movie with no genre; every item here has one
USER_FEATURES = ("user_id", "age", "gender", "occupation", "zip")
ITEM_FEATURES = ("movie_id", "genres")


@dataclasses.dataclass(frozen=True)
class TrafficShape:
    """The population and the click model.

    Attributes:
        users: distinct user ids (1..users).
        items: distinct item ids (1..items).
        user_exponent: the Zipf exponent of user popularity.
        item_exponent: the Zipf exponent of item popularity.
        min_candidates: the fewest candidates a request ranks.
        max_candidates: the most (uniform in between, both included).
        base_logit: the click logit of an average user on an average item without affinity.
        taste_scale: the standard deviation of a user's click propensity (logit).
        quality_scale: the standard deviation of an item's appeal (logit).
        affinity: the logit added when the item has the user's favourite genre.
    """

    users: int = 1_000_000
    items: int = 100_000
    user_exponent: float = 1.1
    item_exponent: float = 1.1
    min_candidates: int = 20
    max_candidates: int = 100
    base_logit: float = -3.0
    taste_scale: float = 0.5
    quality_scale: float = 0.8
    affinity: float = 1.5

    def __post_init__(self) -> None:
        if self.users < 1 or self.items < 1:
            raise ValueError(f"users and items must be >= 1, got {self.users} and {self.items}")
        if not 1 <= self.min_candidates <= self.max_candidates <= self.items:
            raise ValueError(
                f"candidates must satisfy 1 <= min ({self.min_candidates}) <= max ({self.max_candidates}) "
                f"<= items ({self.items})"
            )

    @property
    def mean_candidates(self) -> float:
        return (self.min_candidates + self.max_candidates) / 2


class BoundedZipf:
    """Ranks 0..n-1 with P(r) proportional to (r + 1)^-exponent, by inverse CDF.

    Args:
        n: the number of ranks.
        exponent: s > 0.
    """

    def __init__(self, n: int, exponent: float) -> None:
        if n < 1 or not exponent > 0:
            raise ValueError(f"need n >= 1 and exponent > 0, got {n} and {exponent}")
        weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
        self.probabilities = weights / weights.sum()
        self._cdf = np.cumsum(self.probabilities)
        self._cdf[-1] = 1.0  # rounding must not leave a draw above the last rank

    def __len__(self) -> int:
        return int(self._cdf.shape[0])

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """`size` ranks (int64)."""
        return np.searchsorted(self._cdf, rng.random(size), side="right").astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class Request:
    """One ranking request and what its user does.

    Attributes:
        index: its number k (everything here is a function of the seed and k).
        user: the user id.
        items: int64 [n] distinct candidate item ids, in the order shown.
        probabilities: float64 [n] the known click probability of each candidate.
        clicks: bool [n] the clicks drawn from them.
    """

    index: int
    user: int
    items: np.ndarray
    probabilities: np.ndarray
    clicks: np.ndarray

    def __len__(self) -> int:
        return int(self.items.shape[0])

    @property
    def clicked(self) -> np.ndarray:
        """The item ids clicked."""
        return self.items[self.clicks]


class SyntheticWorld:
    """Users, items and the click model, drawn once from `seed`.

    Args:
        shape: the population and click model.
        seed: everything (features, ranks, requests) follows from it.
    """

    def __init__(self, shape: TrafficShape = TrafficShape(), seed: int = 0) -> None:
        self.shape = shape
        self.seed = seed
        rng = np.random.default_rng([seed, 0])
        n, m = shape.users, shape.items
        self._user_zipf = BoundedZipf(n, shape.user_exponent)
        self._item_zipf = BoundedZipf(m, shape.item_exponent)
        self.user_of_rank = rng.permutation(n).astype(np.int64) + 1  # ids 1..n
        self.item_of_rank = rng.permutation(m).astype(np.int64) + 1
        # Per id, index 0 unused so an id indexes directly.
        self.taste = np.concatenate([[0.0], rng.normal(0.0, shape.taste_scale, n)]).astype(np.float32)
        self.favourite = np.concatenate([[0], rng.integers(0, len(ITEM_GENRES), n)]).astype(np.int8)
        self.age = np.concatenate([[0], rng.integers(0, len(AGES), n)]).astype(np.int8)
        self.gender = np.concatenate([[0], rng.integers(0, len(GENDERS), n)]).astype(np.int8)
        self.occupation = np.concatenate([[0], rng.integers(0, len(OCCUPATIONS), n)]).astype(np.int8)
        self.zip = np.concatenate([[0], rng.integers(0, len(ZIPS), n)]).astype(np.int16)
        self.quality = np.concatenate([[0.0], rng.normal(0.0, shape.quality_scale, m)]).astype(np.float32)
        self._vocabularies: dict[str, np.ndarray] = {}
        self.genre_mask = np.zeros(m + 1, dtype=np.int32)  # bit g: the item has ITEM_GENRES[g]
        counts = rng.integers(1, 4, m)
        for k in range(3):
            has = counts > k
            genre = rng.integers(0, len(ITEM_GENRES), m)
            self.genre_mask[1:][has] |= (1 << genre[has]).astype(np.int32)

    # ------------------------------------------------------------------ draws

    def sample_users(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """`size` user ids, Zipf by popularity."""
        return self.user_of_rank[self._user_zipf.sample(rng, size)]

    def sample_items(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """`size` item ids, Zipf by popularity (with repeats)."""
        return self.item_of_rank[self._item_zipf.sample(rng, size)]

    def distinct_items(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """`count` distinct item ids, each next one Zipf among those not yet taken (in draw order)."""
        taken = np.zeros(0, dtype=np.int64)
        while taken.shape[0] < count:
            drawn = np.concatenate([taken, self.sample_items(rng, 2 * count)])
            _, first = np.unique(drawn, return_index=True)
            taken = drawn[np.sort(first)]
        return taken[:count]

    def click_probability(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The known click probability of each (user, item) pair (arrays broadcast)."""
        users, items = np.asarray(users), np.asarray(items)
        liked = (self.genre_mask[items] >> self.favourite[users].astype(np.int32)) & 1
        logit = (self.shape.base_logit + self.taste[users].astype(np.float64) + self.quality[items]
                 + self.shape.affinity * liked)  # fmt: skip
        return 1.0 / (1.0 + np.exp(-logit))

    def request(self, index: int) -> Request:
        """Request `index`: a user, 20..100 distinct candidates, and the clicks drawn on them."""
        if index < 0:
            raise ValueError(f"a request index is >= 0, got {index}")
        rng = np.random.default_rng([self.seed, 1, index])
        user = int(self.sample_users(rng, 1)[0])
        count = int(rng.integers(self.shape.min_candidates, self.shape.max_candidates + 1))
        items = self.distinct_items(rng, count)
        probabilities = self.click_probability(np.full(count, user), items)
        clicks = rng.random(count) < probabilities
        return Request(index, user, items, probabilities, clicks)

    # ------------------------------------------------------- raw and hashed

    def user_features(self, user: int) -> dict[str, Any]:
        """The raw features of one user, as a product backend sends them."""
        return {
            "user_id": int(user),
            "age": AGES[self.age[user]],
            "gender": GENDERS[self.gender[user]],
            "occupation": OCCUPATIONS[self.occupation[user]],
            "zip": ZIPS[self.zip[user]],
        }

    def item_genres(self, item: int) -> list[str]:
        mask = int(self.genre_mask[item])
        return [genre for g, genre in enumerate(ITEM_GENRES) if mask >> g & 1]

    def candidate_features(self, items: np.ndarray) -> dict[str, list[Any]]:
        """The raw features of candidate items: movie_id and genres (a list per item)."""
        return {"movie_id": [int(i) for i in items], "genres": [self.item_genres(int(i)) for i in items]}

    def history(self, start_time: float, span: float, seed: int = 2) -> Batch:
        """One example per user (every user once, in random order): hashed, ready to train.

        Each example's item is Zipf-drawn and its label drawn from the click probability.

        Args:
            start_time: the first example's event time (seconds since the epoch).
            span: seconds the examples' times spread over, in order.
            seed: the draw (added to the world's seed).
        """
        rng = np.random.default_rng([self.seed, 2, seed])
        n = self.shape.users
        users = rng.permutation(n).astype(np.int64) + 1
        items = self.sample_items(rng, n)
        labels = (rng.random(n) < self.click_probability(users, items)).astype(np.float32)
        timestamps = (start_time + np.arange(n) * (span / max(n, 1))).astype(np.int64)
        ids = {
            "user_id": feature_ids("user_id", users),
            "age": self._hashed("age", AGES)[self.age[users]],
            "gender": self._hashed("gender", GENDERS)[self.gender[users]],
            "occupation": self._hashed("occupation", OCCUPATIONS)[self.occupation[users]],
            "zip": self._hashed("zip", ZIPS)[self.zip[users]],
            "movie_id": self._hashed_items[items],
        }
        splits = {name: np.arange(n + 1, dtype=np.int64) for name in ids}
        bits = (self.genre_mask[items][:, None] >> np.arange(len(ITEM_GENRES))) & 1  # [n, 18]
        example, genre = np.nonzero(bits)  # row-major: grouped by example, genres in order
        ids["genres"] = self._hashed("genres", ITEM_GENRES)[genre]
        splits["genres"] = np.concatenate([[0], np.cumsum(np.bincount(example, minlength=n))]).astype(np.int64)
        return Batch(ids, splits, labels, timestamps)

    def _hashed(self, feature: str, vocabulary: tuple[str, ...]) -> np.ndarray:
        """The ids of a small vocabulary, hashed once per world."""
        if feature not in self._vocabularies:
            self._vocabularies[feature] = feature_ids(feature, np.array(vocabulary))
        return self._vocabularies[feature]

    @functools.cached_property
    def _hashed_items(self) -> np.ndarray:
        """The hashed movie_id of every item id (index = id)."""
        return feature_ids("movie_id", np.arange(self.shape.items + 1, dtype=np.int64))
