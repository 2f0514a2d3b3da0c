"""Operating the cluster: what it measures and how an operator reads it.

catalog (every metric: name, kind, labels, buckets; the one list the exporters, the Grafana
dashboard and the docs are checked against), recorders (turn a request's stream and a scheduler's
steps into metric updates, through a `MetricSink`; pure), ray_sink (the sink over Ray Serve's
metrics, which leave through Ray's Prometheus export), prometheus (read Ray's /metrics text back,
for tests and `specdec status`).

May import: cluster.scheduling (the step record), protos. Never: cluster.serve, cluster.routing,
cluster.cli; ray only in ray_sink.
"""
