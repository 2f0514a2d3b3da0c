"""The target's logits processed by the text so far: penalties, logit bias, min_tokens.

Speculation stays lossless under these because every position is processed with its own prefix:
row i of a verify pass (the distribution after the committed tokens and the first i draft
tokens) counts those draft tokens as if they had been committed, which they are exactly when row
i is used (verification stops at the first rejection). A plain step and a prefill process their
one row the same way, so a speculative run and a plain run see the same distributions. The draft
is not processed: the acceptance rule is exact for any q whose support holds the drafted token.

Order (HF's and vLLM's): logit bias, min_tokens, repetition penalty, presence and frequency
penalties; temperature, top-k, top-p and min_p follow in `workers.sampling.warp_probs`.
Pure torch: no ray, no grpc.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

import torch

from workers.types import SamplingParams


def with_held_ids(params: SamplingParams, ends: Iterable[int]) -> SamplingParams:
    """The params with the ids that would end the sequence (EOS unless ignored, stop token ids)
    held back until min_tokens, when it is set: the callers that know the model's EOS add them."""
    if not params.min_tokens:
        return params
    return replace(params, held_ids=tuple(sorted(ends)))


def process_logits(
    logits: torch.Tensor,
    history: Sequence[int],
    prompt_len: int,
    block: Sequence[int],
    params: SamplingParams,
) -> torch.Tensor:
    """logits: [n, V] float, row i the target's after `history` (prompt and output, committed)
    and block[:i]; n <= len(block) + 1. Returns processed float32 logits (a new tensor), or
    `logits` itself when the params process nothing."""
    if not params.processed:
        return logits
    n, vocab = logits.shape
    out = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long)
        bias = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32)
        out[:, ids] += bias
    generated = len(history) - prompt_len  # output tokens before row 0
    if params.min_tokens and params.held_ids:
        early = torch.arange(n) + generated < params.min_tokens
        if early.any():
            held = torch.tensor(params.held_ids, dtype=torch.long)
            out[early.nonzero().view(-1).unsqueeze(1), held] = float("-inf")
    penalize = params.presence_penalty or params.frequency_penalty
    if params.repetition_penalty == 1.0 and not penalize:
        return out
    # Row i's counts: the committed output's, plus block[:i] (cumulative one-hots).
    extra = torch.zeros(n, vocab)
    if n > 1:
        steps = torch.nn.functional.one_hot(
            torch.tensor(list(block[: n - 1]), dtype=torch.long), vocab
        ).float()
        extra[1:] = steps.cumsum(0)
    if params.repetition_penalty != 1.0:  # over prompt and output: HF's and vLLM's
        seen = torch.bincount(torch.tensor(list(history), dtype=torch.long), minlength=vocab) > 0
        seen = seen.unsqueeze(0) | (extra > 0)
        p = params.repetition_penalty
        out = torch.where(seen, torch.where(out > 0, out / p, out * p), out)
    if penalize:  # over the output only: OpenAI's and vLLM's
        output = torch.tensor(list(history[prompt_len:]), dtype=torch.long)
        counts = torch.bincount(output, minlength=vocab).float().unsqueeze(0) + extra
        out -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return out
