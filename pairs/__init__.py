"""Building draft/target pairs: corpus, distillation data, training, evaluation, recipes.

Nothing here runs in a worker or the router: serving loads what these recipes produced through
workers.checkpoints (the registry of named pairs, the shipped checkpoints, the subset-head draft).
May import: workers, cluster (evaluation runs pairs through the in-process engine).

- shared: corpus (the stdlib sources and their split by file), run_log (the recipes' log);
- the stdlib pair: stdlib_recipe (`specdec train-pair`), tokenizer, stdlib_models, token_stream,
  trajectories, train;
- the SmolLM2 draft: smollm2_recipe (`specdec train-smollm2-draft`), instruct_prompts,
  answer_labels, corpus_labels, smollm2_draft, smollm2_training;
- evaluation: evaluate (`specdec eval-pair`), stdlib_eval and instruct_eval (the two reports),
  heldout (their prompts), acceptance (measured through cluster.engine), step_timing,
  target_greedy (the oracle speculation must reproduce).
"""
