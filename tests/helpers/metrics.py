"""Reading metrics in tests, through the one /metrics parser the services use (`monolith.common.scrape`).

A process's page: `read_metrics(url)` (fails naming the URL if it does not answer) and
`poll_metrics(url)` (an empty page meanwhile, for conditions polled while a process starts
or restarts). This process's default registry, for servers a unit test runs in-process:
`registry()` (the same `Scrape`, so `.sum` matches labels partially) and `registry_value`
(one exact series).
"""

from __future__ import annotations

import prometheus_client

from monolith.common.scrape import Scrape, scrape, try_scrape

EMPTY = Scrape(())  # what `poll_metrics` answers while a page cannot be fetched: every sum is 0


def metrics_url(port: int, host: str = "127.0.0.1") -> str:
    """The /metrics URL of a process listening on `port`."""
    return f"http://{host}:{port}/metrics"


def read_metrics(url: str, timeout: float = 5.0) -> Scrape:
    """The page at `url`.

    Raises:
        AssertionError: it could not be fetched (the process is down, or did not answer in time).
    """
    try:
        return scrape(url, timeout)
    except OSError as exc:
        raise AssertionError(f"no metrics at {url}: {exc}") from exc


def poll_metrics(url: str, timeout: float = 2.0) -> Scrape:
    """The page at `url`, or `EMPTY` while it cannot be fetched (for conditions passed to `wait_for`)."""
    return try_scrape(url, timeout) or EMPTY


def registry() -> Scrape:
    """This process's default Prometheus registry, parsed like a scraped page."""
    return Scrape.parse(prometheus_client.generate_latest(prometheus_client.REGISTRY).decode("utf-8"))


def registry_value(name: str, **labels: str) -> float:
    """One series of this process's default registry, by its full sample name and all its labels (0 if absent)."""
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0
