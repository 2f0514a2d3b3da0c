"""The SmolLM2 draft as the recipe builds it: a reduced-vocabulary head (FR-Spec) over a few of
the target's layers, and its checkpoint on disk.

The model class itself (SubsetDraftForCausalLM) lives in workers.checkpoints.subset_draft, since
serving loads it; this module only makes a fresh one from the target and saves a trained one.
"""

from __future__ import annotations

import copy
import shutil
from collections import Counter
from pathlib import Path

import torch

from workers.checkpoints import smollm2
from workers.checkpoints.subset_draft import (
    SubsetDraftConfig,
    SubsetDraftForCausalLM,
    write_remote_code,
)


def head_vocab(records: list[dict], size: int, eos: int) -> torch.Tensor:
    """The `size` token ids the target picks (its argmax) most often (EOS always in)."""
    counts: Counter[int] = Counter()
    for r in records:
        counts.update(r["top_idx"][:, 0].tolist())
    for r in records:  # ties and the tail: prompt tokens, so the head is always full
        if len(counts) >= size:
            break
        counts.update({t: 0 for t in r["ids"][: r["prompt_len"]].tolist() if t not in counts})
    ids = [eos] + [t for t, _ in counts.most_common() if t != eos]
    return torch.tensor(sorted(ids[:size]), dtype=torch.long)


def new_draft(target, head_ids: torch.Tensor, picks: tuple[int, ...]) -> SubsetDraftForCausalLM:
    """A draft of the target's layers `picks`, its embeddings (frozen: borrowed at load time)
    and norm, and a head over head_ids started from the target's (tied) embedding rows."""
    tc = target.config.to_dict()
    for key in ("architectures", "model_type", "tie_word_embeddings", "transformers_version"):
        tc.pop(key, None)
    tc.update(num_hidden_layers=len(picks), head_size=len(head_ids))
    tc["embeddings_from"] = smollm2.NAME
    draft = SubsetDraftForCausalLM(SubsetDraftConfig(**tc))
    t, d = target.model, draft.model
    with torch.no_grad():
        d.embed_tokens.weight.copy_(t.embed_tokens.weight)
        d.norm.load_state_dict(t.norm.state_dict())
        for i, j in enumerate(picks):
            d.layers[i].load_state_dict(t.layers[j].state_dict())
        # The target's head is its (tied) embedding matrix: start from its rows.
        draft.lm_head.weight.copy_(target.lm_head.weight[head_ids])
        draft.head_ids.copy_(head_ids)
    d.embed_tokens.weight.requires_grad_(False)  # borrowed from the target, never trained
    return draft


def save_draft(draft: SubsetDraftForCausalLM, tok, out: Path) -> None:
    """fp16 on disk (half the bytes), without the borrowed embeddings; atomic replace."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    half = copy.deepcopy(draft).to(torch.float16)
    state = {k: v for k, v in half.state_dict().items() if k != "model.embed_tokens.weight"}
    half.save_pretrained(tmp, state_dict=state, max_shard_size="20MB")
    tok.save_pretrained(tmp)
    write_remote_code(tmp)  # loadable by plain transformers (trust_remote_code)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
