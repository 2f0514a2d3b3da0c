"""The target's own greedy decoding: the oracle that speculative output must reproduce exactly.

Deliberately not the serving path: one sequence, a transformers DynamicCache, one token per
forward, so that a bug in the engine's batched KV or verification cannot hide in the reference.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel


@torch.inference_mode()
def plain_greedy(
    model: PreTrainedModel, prompt: list[int], new_tokens: int, stop: frozenset[int] = frozenset()
) -> list[int]:
    """Up to new_tokens argmax tokens after prompt, ending after the first one in `stop`."""
    cache = DynamicCache()
    out: list[int] = []
    feed = list(prompt)
    for _ in range(new_tokens):
        ids = torch.tensor([feed], dtype=torch.long)
        logits = model(ids, past_key_values=cache, use_cache=True).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        if token in stop:
            break
        feed = [token]
    return out
