"""The instruct target's own greedy answers, with its top-K next-token distributions, for
distilling its draft (the SmolLM2 recipe).

Batched, left-padded HF `generate` (greedy) over chat and code prompts; a logits processor
records the target's top-K log-probabilities at every generated position, so the draft's KL
term needs no teacher forward pass during training. Written in shards, one per batch, so a run
that is cut short resumes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList


class TopKRecorder(LogitsProcessor):
    """Records top-K log-probs of the raw logits at each step; changes nothing."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.idx: list[torch.Tensor] = []
        self.logp: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        top = torch.topk(torch.log_softmax(scores.float(), dim=-1), self.k, dim=-1)
        self.idx.append(top.indices.to(torch.int32))
        self.logp.append(top.values.to(torch.float16))
        return scores


@torch.inference_mode()
def relabel(labeler, ids: torch.Tensor, mask: torch.Tensor, start: int, top_k: int):
    """Top-K log-probs of `labeler` at every position from `start` on, one teacher-forced pass.

    Why: decoding in bfloat16 is ~2.5x faster on this CPU (AMX) but its argmax differs from the
    float32 target's now and then; one float32 pass over the finished batch gives the exact
    labels at prefill speed (~4x a float32 decode step's tokens per second).
    """
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: positions start at each row's text
    hidden = labeler.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    logits = labeler.lm_head(hidden[:, start - 1 : -1]).float()
    top = torch.topk(torch.log_softmax(logits, dim=-1), top_k, dim=-1)
    return top.indices.to(torch.int32), top.values.to(torch.float16)


@torch.inference_mode()
def generate_batch(
    model, rows: list[list[int]], max_new: int, eos: int, top_k: int, labeler=None
) -> list[dict]:
    """Greedy answers of a batch of prompts; one record per prompt (cut after EOS).

    With a labeler (the float32 target), `model` (its bfloat16 copy) only writes the answers
    and the labeler gives the distributions; hard labels are always the labels' argmax."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), eos, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    rec = TopKRecorder(top_k)
    cfg = GenerationConfig(
        max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos
    )
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        generation_config=cfg,
        logits_processor=LogitsProcessorList([rec]),
    )
    gen = out[:, width:]
    if labeler is None:
        idx, logp = torch.stack(rec.idx, 1), torch.stack(rec.logp, 1)
    else:
        full_mask = torch.cat([mask, torch.ones_like(gen)], dim=1)
        idx, logp = relabel(labeler, out, full_mask, width, top_k)
    records = []
    for i, r in enumerate(rows):
        g = gen[i].tolist()
        n = g.index(eos) + 1 if eos in g else len(g)
        records.append(
            {
                "ids": torch.tensor(r + g[:n], dtype=torch.int32),
                "prompt_len": len(r),
                "top_idx": idx[i, :n].clone(),
                "top_logp": logp[i, :n].clone(),
            }
        )
    return records


def generate_shards(
    model,
    prompts: list[tuple[str, list[int]]],
    out_dir: Path,
    *,
    batch: int,
    max_new: dict[str, int],
    eos: int,
    top_k: int,
    minutes: float,
    log: Callable[[dict], None],
    labeler=None,
    skip: int = 0,
) -> int:
    """Shards of records under out_dir (shard i = prompts of batch i); returns the batches done.

    prompts: (kind, ids) in a fixed order; each batch holds one kind, sorted by length, so
    padding stays small. Existing shards are kept (resume). The first `skip` batches of the
    order are left out: a run that warm-starts a draft gets answers its data never had.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    batches: list[tuple[str, list[list[int]]]] = []
    for kind in sorted({k for k, _ in prompts}):
        rows = [ids for k, ids in prompts if k == kind]
        for i in range(0, len(rows), batch * 8):
            chunk = sorted(rows[i : i + batch * 8], key=len)
            batches += [(kind, chunk[j : j + batch]) for j in range(0, len(chunk), batch)]
    # Interleave kinds so a run cut by the clock still has both.
    order = sorted(range(len(batches)), key=lambda b: _interleave_key(batches, b))
    t0 = time.monotonic()
    done = tokens = 0
    for n, b in enumerate(order[skip:], start=skip):
        path = out_dir / f"shard_{b:05d}.pt"
        if path.is_file():
            done += 1
            continue
        if time.monotonic() - t0 >= minutes * 60:
            break
        kind, rows = batches[b]
        recs = generate_batch(model, rows, max_new[kind], eos, top_k, labeler)
        for r in recs:
            r["kind"] = kind
        torch.save(recs, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        done += 1
        tokens += sum(len(r["top_idx"]) for r in recs)
        el = time.monotonic() - t0
        log(
            {
                "phase": "generate",
                "batch": n,
                "of": len(order),
                "kind": kind,
                "gen_tokens": tokens,
                "tok_per_s": round(tokens / max(el, 1e-6), 1),
                "min": round(el / 60, 2),
            }
        )
    return done


def _interleave_key(batches: list[tuple[str, list[list[int]]]], b: int) -> tuple[int, int]:
    kind = batches[b][0]
    rank = sum(1 for i in range(b) if batches[i][0] == kind)
    return rank, 0 if kind == "chat" else 1


def load_shards(out_dir: Path) -> list[dict]:
    recs: list[dict] = []
    for path in sorted(out_dir.glob("shard_*.pt")):
        recs += torch.load(path, weights_only=False)
    return recs
