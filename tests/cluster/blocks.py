"""Oracles of the pricing tests: blocks drawn as a draft with a confidence stop makes them, and
the tokens a round commits under i.i.d. acceptance."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class StoppingDraft:
    """A draft sure of each token with chance `c` that ends a block after a token it is unsure
    of; the target accepts a token it was sure of with chance `p_sure`, else `p_unsure` (a
    draft's confidence tells: sure tokens are accepted more often)."""

    c: float
    p_sure: float
    p_unsure: float

    def block(self, rng: random.Random, cap: int) -> tuple[int, int, bool]:
        """(drafted, accepted, unsure of the last) of one block of cap `cap`."""
        accepts = []
        while True:
            sure = rng.random() < self.c
            accepts.append(rng.random() < (self.p_sure if sure else self.p_unsure))
            if not sure or len(accepts) == cap:
                break
        accepted = accepts.index(False) if False in accepts else len(accepts)
        return len(accepts), accepted, not sure


def feed(model, draft: StoppingDraft, cap: int, n: int, seed: int) -> tuple[float, float]:
    """n blocks of cap `cap` into `model` (an AcceptanceModel, or None to just draw them);
    returns (mean committed tokens, mean drafted tokens) per round."""
    rng = random.Random(seed)
    committed = drafted = 0
    for _ in range(n):
        length, accepted, unsure = draft.block(rng, cap)
        if model is not None:
            model.observe(length, accepted)
            model.observe_stop(length, unsure, accepted)
        committed += accepted + 1
        drafted += length
    return committed / n, drafted / n


def geometric_tokens(alpha: float, k: int) -> float:
    """E(k) = 1 + α + ... + α^k: committed tokens per round of k with i.i.d. acceptance α."""
    return sum(alpha**i for i in range(k + 1))
