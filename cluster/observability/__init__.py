"""Operating the cluster: what it measures and how an operator reads it.

catalog (every metric: name, kind, labels, buckets; the one list the exporters, the Grafana
dashboard and the docs are checked against), recorders (turn a request's stream and a scheduler's
steps into metric updates, through a `MetricSink`; pure), prometheus (read Ray's /metrics text
back, for tests and `specdec status`). The sink over Ray Serve's metrics is the Serve room's
(cluster/serve/metrics_sink.py).

May import: cluster.scheduling (the observer's record). Never: ray, grpc, torch, or the rooms
that wire things (serve, routing, transport, cli).
"""
