"""Building draft/target pairs: corpus, distillation data, training, evaluation, recipes.

Nothing here runs in a worker or the router: serving loads what these recipes produced through
workers.checkpoints (the registry of named pairs, the shipped checkpoints, the subset-head draft).
May import: workers, cluster (evaluation runs pairs through the in-process engine).
"""
