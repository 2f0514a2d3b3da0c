"""The stdlib target's own greedy continuations of corpus prompts: its draft's distillation data."""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache, LlamaForCausalLM, PreTrainedTokenizerFast


def prompt_windows(tok: PreTrainedTokenizerFast, prompts: list[str], length: int) -> torch.Tensor:
    """The last `length` tokens of each prompt; shorter prompts are dropped (no padding needed)."""
    rows = []
    for ids in tok(prompts, add_special_tokens=False)["input_ids"]:
        if len(ids) >= length:
            rows.append(ids[-length:])
    return torch.tensor(rows, dtype=torch.long).reshape(-1, length)


@torch.inference_mode()
def greedy_batch(model: LlamaForCausalLM, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of equal-length prompts with a KV cache; returns prompt + new tokens."""
    cache = DynamicCache()
    logits = model(prompts, past_key_values=cache, use_cache=True).logits[:, -1]
    out = [prompts]
    for i in range(new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        if i + 1 < new_tokens:
            logits = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    return torch.cat(out, dim=1)


def generate_trajectories(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    prompts: list[str],
    *,
    prompt_len: int,
    new_tokens: int,
    batch: int,
    minutes: float,
    log=print,
) -> torch.Tensor:
    """Greedy trajectories for as many prompts as the wall-clock budget allows."""
    t0 = time.monotonic()
    done: list[torch.Tensor] = []
    for i in range(0, len(prompts), batch * 4):
        windows = prompt_windows(tok, prompts[i : i + batch * 4], prompt_len)
        for j in range(0, len(windows), batch):
            if time.monotonic() - t0 >= minutes * 60:
                break
            done.append(greedy_batch(model, windows[j : j + batch], new_tokens).to(torch.int32))
        n = sum(len(d) for d in done)
        log({"phase": "trajectories", "n": n, "min": round((time.monotonic() - t0) / 60, 2)})
        if time.monotonic() - t0 >= minutes * 60:
            break
    if not done:
        return torch.zeros(0, prompt_len + new_tokens, dtype=torch.int32)
    return torch.cat(done)
