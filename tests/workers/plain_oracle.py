"""What a plain step at committed length n gives, computed without the worker: the oracle of the
target's prefill token.

The model's logits at the last of the n committed tokens, from one full forward with no cache, and
the token sampled from them as a plain step samples it (the target's stream of the row's
PositionalRng, at position n). Only for greedy or seeded params: an unseeded row draws its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.sampling import PositionalRng, next_token
from workers.target import TARGET_STREAM
from workers.types import SamplingParams


@torch.inference_mode()
def plain_step_token(model, token_ids: Sequence[int], params: SamplingParams) -> int:
    """The token a plain step at committed length len(token_ids) decodes, by `model` (an HF
    causal LM, e.g. a worker's `runner.model`)."""
    if not params.greedy and params.seed is None:
        raise ValueError("an unseeded row has no oracle: its randomness is its own")
    ids = torch.tensor([list(token_ids)], device=model.device)
    logits = model(input_ids=ids).logits[0, -1].float().cpu()
    n = len(token_ids)
    return next_token(logits, params, PositionalRng(params.seed, TARGET_STREAM).at(n))
