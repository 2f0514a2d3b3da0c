"""How the scheduler reaches its workers over the network: gRPC clients of the worker API
(grpc_workers) and pools of worker addresses with health and least-loaded choice (pools).

May import: cluster.scheduling (the protocols it implements), workers, protos. Never: cluster.api,
cluster.routing, cluster.serve, ray.
"""
