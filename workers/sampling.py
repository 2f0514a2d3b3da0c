"""The logits -> probabilities transform of every decoding path (workers.types.SamplingParams).

Plain decoding and speculative verification must apply temperature, top-k and top-p in exactly the
same way, otherwise speculation would not be lossless; this module is the single place that does it.
Pure torch: no ray, no grpc.
"""

from __future__ import annotations

import torch

from workers.types import SamplingParams


class PositionalRng:
    """A request's randomness, keyed by (seed, stream, absolute token position).

    Every position gets its own generator, so what is drawn for position i does not depend on how
    many draws earlier positions took: a seeded request repeats exactly across pipelining and
    retries, for the same sequence of block sizes. It does not repeat across different block
    sizes (fixed k vs another k, or AUTO mode, whose k and plain fallback follow measured
    timings): a position inside a block spends its generator on an acceptance test first, while
    a position that ends a block or takes a plain step draws its token first, so the outputs
    differ while having the same distribution. Reusing a position's stream in a later round is
    sound because verification stops at the first rejection: draws for later positions never
    influenced anything that was committed. `stream` separates the draft's randomness from the
    target's.
    """

    __slots__ = ("base", "stream")

    def __init__(self, seed: int | None, stream: int) -> None:
        self.base = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        self.stream = stream

    def at(self, position: int) -> torch.Generator:
        gen = torch.Generator(device="cpu")
        # A simple injective-enough mix; torch seeds must fit in 64 bits.
        gen.manual_seed((self.base * 0x9E3779B1 + self.stream * 0x85EBCA77 + position) % (2**63))
        return gen


def child_seed(seed: int | None, index: int) -> int | None:
    """The seed of the index-th of n samples of one seeded request (0 keeps the request's own,
    so n = 1 samples as before): each sample repeats on its own, and differs from the others."""
    if seed is None or index == 0:
        return seed
    return (seed * 0x2545F491 + index * 0x9E3779B97F4A7C15) % (2**62)


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p, then min_p (the order HF `generate`
    applies them).

    Works on [..., V] float logits; returns float32 probabilities of the same shape, with masked
    tokens at exactly 0. For greedy params it returns a one-hot of the argmax.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop the low tail whose total mass is <= 1 - top_p; always keep the most likely token.
        drop_sorted = cum <= (1.0 - params.top_p)
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    if params.min_p > 0.0:  # below min_p times the most likely token's probability: dropped
        keep = probs >= params.min_p * probs.max(-1, keepdim=True).values
        probs = (probs * keep) / (probs * keep).sum(-1, keepdim=True)
    return probs


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The plain-decoding step: one token from one row of logits."""
    if params.greedy:
        return int(logits.argmax(-1))
    return int(torch.multinomial(warp_probs(logits, params), 1, generator=generator))
