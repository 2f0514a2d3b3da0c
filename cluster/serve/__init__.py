"""The Ray Serve application: draft, target and ingress deployments on their own pools.

app (`build_app`, the builder `serve deploy` imports, and each deployment's Serve options),
worker_deployments (draft and target worker replicas; each target replica runs its batch's
scheduler), registry (worker addresses by heartbeat, and the poll loop), ingress (the public gRPC
and OpenAI HTTP APIs, stateless), grpc_errors (a failure as a gRPC code and one line), ports. It
wires every other room together, and is the only room that imports ray.
"""
