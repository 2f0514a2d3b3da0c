"""The step scheduler of one target replica and everything pure under it.

scheduler (one step: admit, choose k, draft, verify, commit) on step_loop (its thread and inbox);
rows (a sequence as the scheduler holds it), rounds (what a round commits), drafting (the draft
side of a step), lookup and lookup_drafting (drafting without a model: continuations of text
already seen, and which rows take such a block in a step), pipelining (drafting ahead, and
whether the guess held), admission (which
waiting rows a step takes), worker_api (what the scheduler needs from its workers). Choosing k:
policy (the policies' config), batch_policy (k per row for the whole batch, priced by measured
step costs: step_costs), row_policy (a row that decides alone, by cost priors: seeded sampling),
acceptance (how far a row's blocks reach), switching (hysteresis and probes, for both policies).

May import: workers' torch-free parts (batch, types, errors, token_range). Never: ray, grpc,
torch, or any other room of cluster/: the transports implement worker_api, not the reverse.
"""
