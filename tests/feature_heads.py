"""A feature head for a tiny test target, trained in seconds on the target's own greedy text, so
that tests see both accepted and rejected draft tokens (an untrained head is almost never
right). Uses the recipe's losses (pairs/feature_recipe.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pairs.feature_recipe import add_features, head_losses, new_head, training_batch


def trained_head(target: Path, out: Path, *, steps: int = 150, head_ids=None) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, vocab, (24, 6), generator=gen)
    with torch.inference_mode():
        seqs = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=40,
            min_new_tokens=40,
            do_sample=False,
            pad_token_id=0,
        )
    records = [{"ids": s.to(torch.int32), "prompt_len": 6} for s in seqs]
    add_features(model, records, batch=24)
    ids = torch.arange(vocab) if head_ids is None else head_ids
    head = new_head(model, ids)
    scale = float(torch.cat([r["feats"].float() for r in records]).pow(2).mean().sqrt())
    opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        rows = torch.randint(0, len(records), (8,), generator=gen).tolist()
        reg, cls, _ = head_losses(head, training_batch(records, rows, 64, gen), scale, 0.0)
        (reg + 0.5 * cls).backward()
        opt.step()
        opt.zero_grad()
    head.save(out, target=str(target))
    return out
