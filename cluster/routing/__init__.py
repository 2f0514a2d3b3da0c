"""The router: the public generation API over gRPC worker pools, one step scheduler per target.

router (validate, tokenize, admit, hand rows to a scheduler, stream out), config (its settings,
defaults from cluster.config), target_model (the target's tokenizer, vocabulary, context and EOS
ids, read once, and the request validation against them: both routers use it), mailbox (rows'
output into asyncio loops), forwarding (the Serve ingress's stateless router that forwards to the
schedulers in target replicas), grpc_server (the router as a standalone gRPC process),
worker_processes (local worker server processes for tests and benches).

May import: cluster.api, cluster.scheduling, cluster.transport, cluster.config.
Never: cluster.serve, ray.
"""
