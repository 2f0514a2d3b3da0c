"""Public front ends: the gRPC SpecDecode service, the OpenAI-compatible HTTP API, the one request
validation both share, the response messages and incremental text.

May import: cluster.scheduling (rows, rounds, policy names), workers' plain value types, protos.
Never: cluster.transport, cluster.routing, cluster.serve, ray.
"""
