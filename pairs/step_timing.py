"""What one KV-cached decode step of each model of a pair costs (the draft/target step ratio)."""

from __future__ import annotations

import statistics
import time

import torch
from transformers import DynamicCache, PreTrainedModel


@torch.inference_mode()
def step_ms(
    models: dict[str, PreTrainedModel], context: int = 128, steps: int = 60, block: int = 10
) -> dict[str, float]:
    """Median ms of one KV-cached single-token decode step at the given context length.

    The models take turns in blocks of `block` steps: load from other processes on a shared
    box then hits them alike, and each block runs warm, as a draft's k steps in a row do.
    """
    caches = {}
    for name, m in models.items():
        caches[name] = DynamicCache()
        m(torch.zeros(1, context, dtype=torch.long), past_key_values=caches[name], use_cache=True)
    one = torch.tensor([[1]])
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps // block):
        for name, m in models.items():
            for i in range(block + 2):
                t0 = time.perf_counter()
                m(one, past_key_values=caches[name], use_cache=True)
                dt = time.perf_counter() - t0
                caches[name].crop(-1)
                if i >= 2:  # the first steps of a block warm the caches back up
                    times[name].append(dt * 1000)
    return {name: statistics.median(ts) for name, ts in times.items()}
