"""The benchmarks run end to end (small sizes) and print one JSON line last.

Speed figures are machine-dependent and are never asserted here; what is asserted are
the invariants that hold on any machine: the figures exist and are sane, distributed
training learns exactly what the in-process run learns, serving sees trained rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Minutes each: `make test-fast` (pytest -m "not slow") leaves them out, `make test` runs them.
pytestmark = pytest.mark.slow

MONOLITH = os.path.join(os.path.dirname(sys.executable), "monolith")


def _bench(name: str, timeout: float) -> dict:
    done = subprocess.run(
        [MONOLITH, "bench", name, "--quick", "--json"], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_missed_bars_are_explained(result: dict) -> None:
    """Every missed bar, and only those, comes with what limits it (a non-empty profile)."""
    missed = {bar for bar, met in result["bars_met"].items() if not met}
    assert set(result["limits"]) == missed
    assert all(result["limits"][bar] for bar in missed)


def test_table_benchmark() -> None:
    result = _bench("table", 300)

    for key in ("lookup_ids_per_s", "dict_lookup_ids_per_s", "insert_ids_per_s", "grpc_lookup_ids_per_s",
                "grpc_echo_ids_per_s", "incremental_export_small_ms", "incremental_export_large_ms",
                "lookup_p99_ms_idle", "lookup_p99_ms_during_sweep", "sweep_ms"):  # fmt: skip
        assert result[key] > 0, key
    assert result["payload_bytes_per_row"] == 8 + 4 * 16 + 4 * 16  # key + embedding + adagrad state
    assert result["payload_bytes_per_row"] <= result["bytes_per_row"] < 2 * result["payload_bytes_per_row"]
    # Both exports carried exactly the changed rows (the benchmark checks each export).
    assert result["incremental_export_rows"] == 10_000 and result["large_table_rows"] == 100_000
    assert result["sweeps"] > 0 and 0 < result["evictions"] <= 50_000  # the newer half is never due
    assert set(result["bars_met"]) == {
        "lookup_vs_dict>=10", "memory_vs_payload<=1.3", "incremental_export_large<=3*small",
        "lookup_p99_during_sweep<=3*idle", "grpc_lookup_vs_echo>=0.5",
    }  # fmt: skip
    _assert_missed_bars_are_explained(result)


def test_train_benchmark() -> None:
    result = _bench("train", 600)

    assert result["train_examples"] == 16_000 and result["eval_examples"] == 4_000
    for key in ("progressive_auc", "frozen_auc", "running_mean_baseline_auc", "reference_progressive_auc"):
        assert 0.5 < result[key] < 1.0, key
    # The distributed run and the in-process reference apply the same updates in the same
    # order, so they learn the same model.
    assert result["progressive_auc"] == pytest.approx(result["reference_progressive_auc"], abs=0.005)
    assert result["frozen_auc"] == pytest.approx(result["reference_frozen_auc"], abs=0.005)
    assert result["examples_per_s"] > 0 and result["reference_examples_per_s"] > 0
    assert set(result["bars_met"]) == {
        "examples_per_s>=0.3*reference", "progressive_auc>running_mean_baseline", "progressive_auc>frozen_auc",
    }  # fmt: skip
    _assert_missed_bars_are_explained(result)


def test_serving_benchmark() -> None:
    result = _bench("serving", 600)

    assert result["predict_qps"] > 0 and result["inprocess_qps"] > 0
    assert result["predict_vs_inprocess"] == pytest.approx(result["predict_qps"] / result["inprocess_qps"], rel=1e-3)
    assert result["concurrency"] == 2 and result["rounds"] >= 5  # both sides, the same number of callers
    assert 0 < result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert 0 < result["inprocess_p50_ms"] <= result["inprocess_p99_ms"]
    # Every probe's update reached the serving shard (the probe times out otherwise), while
    # a trainer was training.
    assert result["freshness_probes"] == 10
    assert 0 < result["freshness_p50_s"] <= result["freshness_p99_s"]
    assert result["trainer_training_during_probes"] is True
    assert set(result["bars_met"]) == {"predict_vs_inprocess>=0.5", "freshness_p50<=2s", "freshness_p99<=5s"}
    _assert_missed_bars_are_explained(result)


def test_online_benchmark() -> None:
    result = _bench("online", 900)

    # The closed loop on a slice: 1,000 replayed events through `monolith up`.
    for key in ("served_progressive_auc", "frozen_auc", "running_mean_baseline_auc"):
        assert 0.0 < result[key] < 1.0, key
    assert result["events_per_s"] > 0 and result["actions"] > 0
    assert result["impressions"] == result["events"] + result["probe_impressions"] >= 1_000
    # Exactly once holds on any machine: every impression became one sample.
    assert result["samples_joined"] == result["samples_expected"] == result["impressions"]
    assert result["samples_lost"] == 0 and result["samples_duplicated"] == 0
    assert result["freshness_probes"] >= 1 and 0 < result["freshness_p50_s"] <= result["freshness_p99_s"]
    assert set(result["bars_met"]) == {
        "served_progressive_auc>frozen_auc", "served_progressive_auc>=running_mean_baseline_auc",
        "freshness_p50_s<=2", "freshness_p99_s<=5", "samples_lost==0", "samples_duplicated==0",
    }  # fmt: skip
    _assert_missed_bars_are_explained(result)
