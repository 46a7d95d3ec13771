"""Real embedding-PS servers on free ports, for the integration tests (see helpers.cluster).

`ps_cluster` is two training shards shared by one test module (tests that mutate it use
their own id ranges); `make_cluster` starts fresh ones a test owns; `serving_shard` is a
single read-only shard. `online_model` is the small model the online-loop tests train, and
`controlled_stack` the online stack with a controller (see helpers.online).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers.cluster import Cluster, start_cluster
from helpers.online import ControlledStack, small_model
from monolith.model.config import ModelConfig


@pytest.fixture(scope="module")
def ps_cluster() -> Iterator[Cluster]:
    """Two training shards shared by a module; tests that mutate use distinct ids."""
    cluster = start_cluster(metrics=True)
    yield cluster
    cluster.stop()


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., Cluster]]:
    """Starts fresh clusters (see `start_cluster`) that the test owns; stops them after."""
    started: list[Cluster] = []

    def make(**kwargs: object) -> Cluster:
        started.append(start_cluster(**kwargs))  # type: ignore[arg-type]
        return started[-1]

    yield make
    for cluster in started:
        cluster.stop()


@pytest.fixture
def serving_shard(make_cluster: Callable[..., Cluster]) -> Cluster:
    """One read-only serving shard (shard 0 of 1), empty until something is imported."""
    return make_cluster(num_shards=1, role="serving")


@pytest.fixture(scope="module")
def online_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelConfig, str]:
    """The small model config the online-loop tests train, and its YAML path (one per module)."""
    return small_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def controlled_stack(tmp_path: Path, online_model: tuple[ModelConfig, str]) -> Iterator[ControlledStack]:
    """An online stack with a controller, owned by the test."""
    made = ControlledStack(tmp_path, online_model)
    yield made
    made.close()
