"""The target's log-probabilities of the tokens it commits (OpenAI's `logprobs`).

Raw, as vLLM's default: log_softmax of the logits at each position, before temperature, top-k
and top-p. A verify pass's logits at a committed position are the target's distribution given
exactly the committed prefix (the draft tokens before it were accepted), so speculation hands
out what a plain run would, to the dtype's rounding. Pure torch: no ray, no grpc.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.types import TokenLogprob


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], top: int
) -> tuple[TokenLogprob, ...]:
    """logits: [>= n, V], one row per token of `tokens` (n of them), in order; `top` alternatives
    per token (0: the token's own log-probability only)."""
    n = len(tokens)
    if n == 0:
        return ()
    logp = torch.log_softmax(logits[:n].float(), dim=-1)
    ids = torch.tensor(list(tokens), dtype=torch.long)
    own = logp.gather(1, ids.view(n, 1)).view(n).tolist()
    if top:
        values, indices = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)
        alts = [
            tuple(zip(i, v, strict=True))
            for i, v in zip(indices.tolist(), values.tolist(), strict=True)
        ]
    else:
        alts = [()] * n
    return tuple(
        TokenLogprob(int(t), float(lp), a) for t, lp, a in zip(tokens, own, alts, strict=True)
    )
