"""What one training step of the SmolLM2 draft sees: a batch of the target's labelled records
and the two losses on the head's vocabulary, plus the held-out agreement that picks checkpoints.

Records (pairs.answer_labels, pairs.corpus_labels): ids, prompt_len, and the target's top-K
(top_idx, top_logp) at every position past the prompt. Labels outside the head's vocabulary map
to -1 (full_to_sub) and are left out of the hard loss and renormalized out of the soft one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_rows(
    n_gen: int, n_corpus: int, batch: int, corpus_frac: float, gen: torch.Generator
) -> list[int]:
    """A training batch's record indices into gen + corpus: corpus_frac of them from corpus."""
    n_c = round(batch * corpus_frac) if n_corpus else 0
    rows = torch.randint(0, n_gen, (batch - n_c,), generator=gen).tolist()
    if n_c:
        rows += (n_gen + torch.randint(0, n_corpus, (n_c,), generator=gen)).tolist()
    return rows


def loss_batch(records: list[dict], rows: list[int], full_to_sub: torch.Tensor):
    """Right-padded ids, and per loss position: (row, pos, hard label, soft ids, soft probs)."""
    recs = [records[i] for i in rows]
    width = max(len(r["ids"]) for r in recs)
    ids = torch.zeros(len(recs), width, dtype=torch.long)
    b_idx, p_idx, hard, soft_i, soft_p = [], [], [], [], []
    for i, r in enumerate(recs):
        n, p = len(r["ids"]), r["prompt_len"]
        ids[i, :n] = r["ids"].long()
        t = n - p
        b_idx.append(torch.full((t,), i))
        p_idx.append(torch.arange(p - 1, n - 1))
        hard.append(full_to_sub[r["top_idx"][:, 0].long()])  # the float32 target's argmax
        soft_i.append(full_to_sub[r["top_idx"].long()])
        soft_p.append(r["top_logp"].float().exp())
    return (
        ids,
        torch.cat(b_idx),
        torch.cat(p_idx),
        torch.cat(hard),
        torch.cat(soft_i),
        torch.cat(soft_p),
    )


def losses(draft, batch, bf16: bool = True):
    """(hard cross-entropy on the target's argmax, soft cross-entropy to its top-K, agreement)."""
    ids, b, p, hard, soft_i, soft_p = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = draft.model(input_ids=ids).last_hidden_state[b, p]
        logits = draft.subset_logits(hidden)
    logp = F.log_softmax(logits.float(), dim=-1)
    ok = hard >= 0
    ce = F.nll_loss(logp[ok], hard[ok]) if ok.any() else logp.sum() * 0
    inside = soft_i >= 0
    q = torch.where(inside, soft_p, torch.zeros_like(soft_p))
    q = q / q.sum(-1, keepdim=True).clamp_min(1e-9)  # the teacher, restricted to the head
    soft = -(q * logp.gather(-1, soft_i.clamp_min(0))).sum(-1).mean()
    agree = (logits.argmax(-1) == hard).float().mean()
    return ce, soft, agree


@torch.no_grad()
def evaluate(draft, records: list[dict], full_to_sub: torch.Tensor) -> dict:
    """Mean hard cross-entropy and argmax agreement with the target over records."""
    draft.eval()
    tot_ce = tot_agree = n = 0.0
    for i in range(0, len(records), 8):
        rows = list(range(i, min(i + 8, len(records))))
        ce, _, agree = losses(draft, loss_batch(records, rows, full_to_sub))
        tot_ce += ce.item() * len(rows)
        tot_agree += agree.item() * len(rows)
        n += len(rows)
    draft.train()
    return {"ce": round(tot_ce / n, 4), "agree": round(tot_agree / n, 4)}
