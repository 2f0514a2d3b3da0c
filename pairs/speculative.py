"""A self-contained greedy speculative loop, used to measure acceptance of the pair.

Each model keeps a DynamicCache that holds a prefix of the committed sequence; before a
forward we drop cache entries past the part that is still valid (transformers 5.x:
`crop(-n)` removes n tokens) and feed the tokens the cache lacks. Greedy output equals the
target's own greedy decoding by construction: every committed token is a target argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel


class _Cached:
    """A model plus a KV cache over a prefix of the sequence."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.cache = DynamicCache()
        self.valid = 0  # cache covers seq[:valid]

    def forward(self, seq: list[int], upto: int, extra: list[int] = ()) -> torch.Tensor:
        """Logits for every position after the cached prefix, over seq[:upto] + extra."""
        have = self.cache.get_seq_length()
        if have > self.valid:
            self.cache.crop(-(have - self.valid))
        new = seq[self.valid : upto] + list(extra)
        ids = torch.tensor([new], dtype=torch.long)
        logits = self.model(ids, past_key_values=self.cache, use_cache=True).logits[0]
        self.valid = upto + len(extra)
        return logits


@dataclass(slots=True)
class SpecStats:
    proposed: int = 0
    accepted: int = 0
    target_passes: int = 0
    committed: int = 0
    accepted_per_round: list[int] = field(default_factory=list)

    def add(self, other: SpecStats) -> None:
        self.proposed += other.proposed
        self.accepted += other.accepted
        self.target_passes += other.target_passes
        self.committed += other.committed
        self.accepted_per_round += other.accepted_per_round

    @property
    def alpha(self) -> float:
        return self.accepted / max(self.proposed, 1)

    @property
    def tau(self) -> float:
        return self.committed / max(self.target_passes, 1)


@torch.inference_mode()
def speculative_greedy(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    prompt: list[int],
    new_tokens: int,
    k: int = 4,
    stop: frozenset[int] = frozenset(),
) -> tuple[list[int], SpecStats]:
    """Greedy speculative decoding; returns (new tokens, stats).

    The first token comes from the target's prefill pass; every later target pass (a round)
    verifies k draft tokens and commits the accepted prefix plus one target token (recovered
    or bonus). alpha = accepted / proposed; tau = committed tokens per round.
    """
    t, d = _Cached(target), _Cached(draft)
    stats = SpecStats()
    seq = list(prompt)
    # The prefill pass is not counted in tau: it costs the same with or without a draft.
    seq.append(int(t.forward(seq, len(seq))[-1].argmax()))
    while len(seq) - len(prompt) < new_tokens and seq[-1] not in stop:
        kk = min(k, new_tokens - (len(seq) - len(prompt)) - 1)
        proposal: list[int] = []
        if kk > 0:
            d.valid = min(d.valid, len(seq) - 1)
            logits = d.forward(seq, len(seq))
            for _ in range(kk):
                proposal.append(int(logits[-1].argmax()))
                if len(proposal) < kk:
                    logits = d.forward(seq + proposal, len(seq) + len(proposal))
        # Target: one pass over the last committed token and the proposal.
        t.valid = min(t.valid, len(seq) - 1)
        logits = t.forward(seq, len(seq), proposal)
        best = logits[-(kk + 1) :].argmax(-1).tolist()
        n = 0
        while n < kk and proposal[n] == best[n]:
            n += 1
        # Keep cache rows for seq + accepted drafts only.
        t.valid = len(seq) + n
        d.valid = min(d.valid, len(seq) + n)
        got = proposal[:n] + [best[n]]
        for i, tok in enumerate(got):  # an instruct model's answer ends at its EOS
            if tok in stop:
                got = got[: i + 1]
                break
        seq += got
        stats.proposed += kk
        stats.accepted += n
        stats.target_passes += 1
        stats.committed += len(got)
        stats.accepted_per_round.append(n)
    return seq[len(prompt) : len(prompt) + new_tokens], stats


@torch.inference_mode()
def plain_greedy(
    model: PreTrainedModel, prompt: list[int], new_tokens: int, stop: frozenset[int] = frozenset()
) -> list[int]:
    """The oracle: the model's own greedy decoding with a KV cache."""
    m = _Cached(model)
    seq = list(prompt)
    for _ in range(new_tokens):
        seq.append(int(m.forward(seq, len(seq))[-1].argmax()))
        if seq[-1] in stop:
            break
    return seq[len(prompt) :]
