"""Reading a role's Prometheus /metrics page: the one parser the harness, the tools and tests share."""

from __future__ import annotations

import dataclasses
import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families


@dataclasses.dataclass(frozen=True)
class Sample:
    """One line of the page: a series' name (with its `_total`, `_bucket`... suffix), labels and value."""

    name: str
    labels: Mapping[str, str]
    value: float


@dataclasses.dataclass(frozen=True)
class Scrape:
    """A parsed /metrics page."""

    samples: tuple[Sample, ...]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        """Parses Prometheus' text format."""
        return cls(tuple(
            Sample(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ))  # fmt: skip

    def matching(self, name: str, **labels: str) -> list[Sample]:
        """The samples of metric `name` whose labels include `labels`.

        `name` matches a sample named `name`, or `name_total` (a counter, whichever way it is
        named), never its `_created` timestamp or a histogram's buckets.
        """
        names = (name, f"{name}_total")
        return [
            s for s in self.samples
            if s.name in names and all(s.labels.get(k) == v for k, v in labels.items())
        ]  # fmt: skip

    def has(self, name: str, **labels: str) -> bool:
        """Whether the page has a series of `name` with those labels."""
        return bool(self.matching(name, **labels))

    def sum(self, name: str, **labels: str) -> float:
        """The sum over the series of `name` whose labels include `labels` (0 if there are none)."""
        return sum(s.value for s in self.matching(name, **labels))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """`name`'s values summed per value of one label, e.g. events per `outcome`."""
        out: dict[str, float] = {}
        for s in self.matching(name):
            key = s.labels.get(label, "")
            out[key] = out.get(key, 0.0) + s.value
        return out


def scrape(url: str, timeout: float = 5.0) -> Scrape:
    """Fetches and parses a /metrics page.

    Raises:
        OSError: the page could not be fetched (the process is down, or slow).
    """
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return Scrape.parse(response.read().decode("utf-8"))


def try_scrape(url: str, timeout: float = 5.0) -> Scrape | None:
    """`scrape`, or None when the page cannot be fetched."""
    try:
        return scrape(url, timeout)
    except OSError:
        return None
