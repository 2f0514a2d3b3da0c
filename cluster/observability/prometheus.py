"""Read a Prometheus text exposition (Ray's metrics endpoint) back into numbers: for the tests
that check the metrics moved by exactly what a request did, and for `specdec status`."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True, slots=True)
class Sample:
    name: str  # the series' name as exported (ray_specdec_..._total, ..._bucket, ...)
    labels: dict[str, str]
    value: float


class Samples:
    """One scrape."""

    def __init__(self, samples: Iterable[Sample]) -> None:
        self.samples = list(samples)

    @classmethod
    def parse(cls, text: str) -> Samples:
        out = []
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.append(Sample(s.name, dict(s.labels), float(s.value)))
        return cls(out)

    def select(self, name: str, **labels: str) -> list[Sample]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def total(self, name: str, **labels: str) -> float:
        """The sum over every series of `name` whose labels include `labels`."""
        return sum(s.value for s in self.select(name, **labels))

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """Sums of `name` grouped by one label's value."""
        out: dict[str, float] = {}
        for s in self.select(name, **labels):
            key = s.labels.get(label, "")
            out[key] = out.get(key, 0.0) + s.value
        return out


def scrape(url: str, timeout_s: float = 5.0) -> Samples:
    """GET a metrics endpoint (http://host:port/metrics) and parse it."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - an operator's URL
        return Samples.parse(resp.read().decode())
