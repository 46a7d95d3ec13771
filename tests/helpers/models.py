"""The model the tests use: the shipped MovieLens config with one small hidden layer (quicker
to trace), and a serving model trained on a few MovieLens examples in process."""

from __future__ import annotations

from typing import Any

import yaml

from monolith.data.movielens import load_movielens
from monolith.model.config import ModelConfig, default_config_path, model_config_from_dict
from monolith.serving.model import ServingModel
from monolith.trainer.backends import LocalDense, LocalEmbeddings
from monolith.trainer.worker import TrainerWorker


def small_raw_config() -> dict[str, Any]:
    """The shipped config as parsed YAML, with one hidden layer of 16 units (a test may edit it)."""
    with open(default_config_path(), encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    raw["model"]["hidden_units"] = [16]
    return raw


def small_config() -> ModelConfig:
    """The shipped config with one hidden layer of 16 units."""
    return model_config_from_dict(small_raw_config())


def trained_serving_model(config: ModelConfig, examples: int) -> ServingModel:
    """A serving model over in-process tables, trained on the first `examples` MovieLens examples in steps of 256."""
    sparse, dense = LocalEmbeddings(config.tables()), LocalDense(config.model.optimizer)
    worker = TrainerWorker(config, sparse, dense)
    for batch in load_movielens(limit=examples).batches(256):
        worker.train(batch)
    served = ServingModel(config, sparse, dense)
    assert served.refresh_dense()
    return served
