"""The metric sink of a Serve replica, written to by cluster/observability/recorders.py.

Ray Serve's metrics (`ray.serve.metrics`: they add the deployment, replica and application
labels), exported in Prometheus format by Ray's metrics agent on each node (`ray start
--metrics-export-port`, scraped as `ray_<name>`), where Ray's Grafana dashboards, any Prometheus
and `specdec status` find them. Each metric is made on first use from its catalogue entry, with
`model` as a default label.
"""

from __future__ import annotations

from typing import Any

from cluster.observability.catalog import BY_NAME

Tags = dict[str, str]


class RaySink:
    def __init__(self, model: str) -> None:
        self.model = model
        self._metrics: dict[str, Any] = {}

    def _metric(self, name: str) -> Any:
        m = self._metrics.get(name)
        if m is None:
            from ray.serve import metrics

            spec = BY_NAME[name]
            tag_keys = ("model", *spec.tags)
            if spec.kind == "counter":
                m = metrics.Counter(name, description=spec.description, tag_keys=tag_keys)
            elif spec.kind == "gauge":
                m = metrics.Gauge(name, description=spec.description, tag_keys=tag_keys)
            else:
                m = metrics.Histogram(
                    name,
                    description=spec.description,
                    boundaries=list(spec.buckets),
                    tag_keys=tag_keys,
                )
            m.set_default_tags({"model": self.model})
            self._metrics[name] = m
        return m

    def add(self, name: str, value: float, tags: Tags | None = None) -> None:
        if value:
            self._metric(name).inc(value, tags=tags)

    def set(self, name: str, value: float, tags: Tags | None = None) -> None:
        self._metric(name).set(value, tags=tags)

    def observe(self, name: str, value: float, tags: Tags | None = None) -> None:
        self._metric(name).observe(value, tags=tags)
