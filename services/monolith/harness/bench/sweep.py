"""`monolith bench sweep`: hyper-parameters compared on the validation stream only.

Each grid point is the model config with some fields overridden, trained in one process
with the validation protocol (`trainer/evaluation.py: validation_protocol`): batch
training on the first 60% of MovieLens-100k, progressive validation over 60-80%. The last
20%, which `monolith bench train` reports on, never reaches a sweep.

    monolith bench sweep --set training.online_batch_size=4,8 --set 'features.*.bias.optimizer.learning_rate=0.3,0.5'

A `--set` path walks the YAML (`features.*` is every feature, `features.user_id` the one
named so); its values are YAML scalars. The grid is the product of every `--set`. The
JSON line holds each point's validation AUC and the best point.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from typing import Any

import yaml

from monolith.data.movielens import load_movielens
from monolith.model.config import ModelConfig, default_config_path, model_config_from_dict
from monolith.trainer.backends import LocalDense, LocalEmbeddings
from monolith.trainer.evaluation import validation_protocol
from monolith.trainer.scoring_copy import ScoringCopy
from monolith.trainer.worker import TrainerWorker


def parse_setting(text: str) -> tuple[str, list[Any]]:
    """`path=v1,v2` -> (path, [v1, v2]), each value read as YAML."""
    path, sep, values = text.partition("=")
    if not sep or not path or not values:
        raise ValueError(f"--set {text!r}: expected path=value[,value...]")
    return path, [yaml.safe_load(v) for v in values.split(",")]


def override(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of the raw config with `path` set to `value`.

    In a list (`features`) the next key picks items by name, `*` all of them.
    """
    # A JSON round trip, not deepcopy: YAML anchors make features share nested dicts,
    # which deepcopy would keep shared, so setting one feature's field would set them all.
    out = json.loads(json.dumps(raw))
    keys = path.split(".")
    nodes: list[Any] = [out]
    for key in keys[:-1]:
        picked: list[Any] = []
        for node in nodes:
            if isinstance(node, list):
                picked.extend(item for item in node if key in ("*", item.get("name")))
            else:
                picked.append(node.setdefault(key, {}))
        if not picked:
            raise ValueError(f"--set {path}: no item named {key!r}")
        nodes = picked
    for node in nodes:
        if not isinstance(node, dict):
            raise ValueError(f"--set {path}: {keys[-1]!r} is not a field of a mapping")
        node[keys[-1]] = value
    return out


def grid_points(raw: dict[str, Any], settings: list[tuple[str, list[Any]]]) -> list[tuple[str, ModelConfig]]:
    """(label, config) for each point of the product of the settings."""
    points = []
    for values in itertools.product(*(v for _, v in settings)):
        point = raw
        for (path, _), value in zip(settings, values):
            point = override(point, path, value)
        label = ", ".join(f"{path}={value}" for (path, _), value in zip(settings, values)) or "config as is"
        points.append((label, model_config_from_dict(point)))
    return points


def run(args: argparse.Namespace) -> dict[str, Any]:
    config_path = getattr(args, "config", None) or default_config_path()
    with open(config_path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    points = grid_points(raw, [parse_setting(s) for s in getattr(args, "set", None) or []])
    late = getattr(args, "served_late", 0) or 0
    if late < 0:
        raise ValueError(f"--served-late: expected a number of events >= 0, got {late}")
    data = load_movielens(limit=20_000 if getattr(args, "quick", False) else None)
    figures: dict[str, float] = {}
    late_figures: dict[str, float] = {}
    for label, config in points:
        sparse, dense = LocalEmbeddings(config.tables()), LocalDense(config.model.optimizer)
        worker = TrainerWorker(config, sparse, dense)
        copies = [ScoringCopy(config, worker.model, sparse, dense, late)] if late else []
        result = validation_protocol(worker, data, label=label, show_progress=False, copies=copies)
        worker.close()
        figures[label] = round(result.progressive_auc, 4)
        line = f"{figures[label]:.4f}"
        if late:
            late_figures[label] = round(result.refresh_auc[late], 4)
            line += f" (served {late} events late: {late_figures[label]:.4f})"
        print(f"[bench sweep] {line}  {label}", file=sys.stderr, flush=True)
    best = max(figures, key=lambda label: figures[label])
    out: dict[str, Any] = {"validation_progressive_auc": figures, "best": best,
                           "best_validation_progressive_auc": figures[best], "config": config_path}  # fmt: skip
    if late:
        # Chosen on what serving would show: the copy a sync behind, not the trainer's own scores.
        out["served_late_events"] = late
        out["validation_served_late_auc"] = late_figures
        out["best_served_late"] = max(late_figures, key=lambda label: late_figures[label])
    return out
