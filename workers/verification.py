"""Lossless verification of a draft block (Leviathan et al. 2023; Chen et al. 2023).

Given the target's distributions p_1..p_{k+1} at the k+1 positions of a block and the draft's tokens
d_1..d_k drawn from q_1..q_k:

* accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), stopping at the first rejection;
* at the first rejection i, emit the *recovered* token ~ norm(max(0, p_i - q_i));
* if all k are accepted, emit the *bonus* token ~ p_{k+1}.

Every emitted token is then distributed exactly as p: P(accept and d) + P(reject) * residual(d)
= min(p, q)(d) + (1 - sum min(p, q)) * (p - q)+(d) / sum (p - q)+ = p(d), because
sum (p - q)+ = 1 - sum min(p, q). The rule holds for *any* q with q(d_i) > 0, so a sparse q (the
draft's renormalized top-m) is exact too; only its support must contain the drafted token.

Greedy is the temperature -> 0 limit: accept while the target's argmax equals the draft token, then
emit the target's argmax. Pure torch: no ray, no grpc.
"""

from __future__ import annotations

import torch

from workers.sampling import PositionalRng
from workers.types import SparseQ, Verdict


def one_hot_q(draft_tokens: torch.Tensor) -> SparseQ:
    """q of a block proposed with certainty (a lookup drafter): all mass on each draft token. The
    rule above then accepts d_i with probability p_i(d_i) and recovers from p_i without d_i."""
    k = draft_tokens.shape[0]
    return SparseQ(draft_tokens.long().view(k, 1), torch.ones(k, 1, dtype=torch.float32))


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor) -> Verdict:
    """target_logits: [k+1, V]; draft_tokens: [k]. Accept while argmax matches."""
    k = draft_tokens.shape[0]
    argmax = target_logits[: k + 1].argmax(-1)
    mismatch = (argmax[:k] != draft_tokens).nonzero()
    accepted = int(mismatch[0, 0]) if mismatch.numel() else k
    return Verdict(accepted, int(argmax[accepted]), bonus=accepted == k)


def verify_sampled(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_q: SparseQ,
    rng: PositionalRng,
    start: int,
) -> Verdict:
    """Vectorized rejection sampling. target_probs: [k+1, V] (already warped); draft_tokens: [k]
    sit at absolute positions start..start+k-1.

    Position i's generator yields its acceptance uniform first, then (if i is where the block
    ends) the recovered or bonus draw, so a seeded request repeats exactly.
    """
    k = draft_tokens.shape[0]
    vocab = target_probs.shape[-1]
    p_tok = target_probs[torch.arange(k), draft_tokens]
    q_tok = draft_q.prob_of(draft_tokens)
    gens = [rng.at(start + i) for i in range(k + 1)]
    u = torch.cat([torch.rand(1, generator=g) for g in gens[:k]])
    # u < p/q written as u*q < p so that q == 0 (impossible for a proper draft) never divides.
    accept = u * q_tok < p_tok
    rejected = (~accept).nonzero()
    accepted = int(rejected[0, 0]) if rejected.numel() else k
    if accepted == k:
        dist = target_probs[k]
    else:
        q_row = draft_q.dense_row(accepted, vocab)
        dist = (target_probs[accepted] - q_row).clamp_min(0.0)
        total = dist.sum()
        # Mass 0 means p == q exactly on this row, so rejection had probability 0; fall back to p.
        dist = dist / total if total > 0 else target_probs[accepted]
    token = int(torch.multinomial(dist, 1, generator=gens[accepted]))
    return Verdict(accepted, token, bonus=accepted == k)
