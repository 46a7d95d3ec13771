"""`monolith bench load`'s parts that need no stack: RSS from a real /metrics, the bars, the locustfile.

The benchmark itself (the stack under Locust for minutes) is run by hand; the load test it
drives runs in tests/e2e/test_load_and_metrics.py.
"""

from __future__ import annotations

import os

import prometheus_client
import pytest

from monolith.harness.bench import load


def test_resident_bytes_reads_the_process_collector_of_a_real_metrics_endpoint() -> None:
    server, thread = prometheus_client.start_http_server(0, addr="127.0.0.1")
    try:
        rss = load.resident_bytes(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        thread.join()
    with open(f"/proc/{os.getpid()}/statm") as f:
        ours = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert 0.5 * ours < rss < 2 * ours, "it is this process's RSS"


def test_bars_are_exactly_the_issue_bars() -> None:
    good = {"error_ratio": 0.0, "rss_growth_ratio": 1.05, "p50_ms": 50.0, "p99_ms": 200.0, "impressions_dropped": 0.0,
            "freshness_p99_s": 5.0}  # fmt: skip
    assert {bar: check(good) for bar, check in load.BARS.items()} == {
        "error_ratio==0": True, "rss_growth_ratio<=1.1": True, "p99_ms<=4*p50_ms": True,
        "impressions_dropped==0": True, "freshness_p99_s<=5": True}  # fmt: skip
    bad = {"error_ratio": 0.001, "rss_growth_ratio": 1.2, "p50_ms": 50.0, "p99_ms": 201.0, "impressions_dropped": 1.0,
           "freshness_p99_s": 5.01}  # fmt: skip
    assert not any(check(bad) for check in load.BARS.values())


def test_locustfile_is_found_beside_the_sources_and_can_be_overridden(tmp_path, monkeypatch) -> None:
    assert load.locustfile().name == "locustfile.py" and load.locustfile().is_file()
    other = tmp_path / "mine.py"
    other.write_text("")
    monkeypatch.setenv("MONOLITH_LOCUSTFILE", str(other))
    assert load.locustfile() == other
    monkeypatch.setenv("MONOLITH_LOCUSTFILE", str(tmp_path / "missing.py"))
    monkeypatch.setattr(load, "__file__", str(tmp_path / "a" / "b" / "c" / "load.py"))
    if not os.path.isfile("/opt/monolith/locust/locustfile.py"):
        with pytest.raises(FileNotFoundError, match="MONOLITH_LOCUSTFILE"):
            load.locustfile()
