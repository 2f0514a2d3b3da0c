"""HF `generate`, greedy, on one prompt: the one-process reference every bench compares with."""

from __future__ import annotations

from typing import Any

import torch


def hf_greedy(model: Any, ids: list[int], max_new_tokens: int, **kw: Any) -> list[int]:
    """The new token ids of a greedy `generate` (pad id 0 unless `kw` says otherwise)."""
    kw.setdefault("pad_token_id", 0)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **kw,
        )
    return out[0, len(ids) :].tolist()
