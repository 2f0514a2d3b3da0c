"""The step scheduler of one target replica and everything pure under it.

rows (a sequence as the scheduler holds it), rounds (what a round commits), drafting (the draft
side of a step), pipelining, policy and batch_policy (k per row, priced), admission (which
waiting rows a step takes), worker_api (what the scheduler needs from its workers).

May import: workers' value types (workers.batch, workers.types, workers.errors). Never: ray, grpc,
torch, or any other room of cluster/: the transports implement worker_api, not the reverse.
"""
