"""How well the feature head drafts, beside the model draft, on the same held-out positions.

    specdec eval-feature-head --head DIR/head --data DIR/work/gen_heldout [--k 4] [--anchors 300]

The data is the recipe's held-out generation (pairs.feature_recipe): the target's greedy answers
to prompts from held-out files, with its last-layer features. At anchors in each answer both
drafts propose k tokens greedily from the same committed prefix, as they would online:
* the feature head reads the target's features of the committed positions and its own for the
  tokens it drafts (the target has not seen them yet);
* the model draft reads the committed tokens.
A proposal is accepted up to its first token that differs from the target's greedy token.
Printed per kind (chat, code): per-position acceptance (P(position j accepted | j-1 were)), the
mean accepted length, the teacher-forced agreement of the head's first token, and ms per draft
token of each drafter (2 torch threads, bfloat16).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from workers.checkpoints import smollm2
from workers.checkpoints.feature_head import FeatureHead, load_feature_head
from workers.checkpoints.registry import SMOLLM2_DRAFT_DIR


@torch.inference_mode()
def head_chain(head: FeatureHead, ids: torch.Tensor, feats: torch.Tensor, t: int, k: int):
    """k greedy draft tokens after position t+1 (ids[: t + 2] committed, features f[0..t])."""
    cache = DynamicCache()
    tok = ids[1 : t + 2][None]
    f = feats[: t + 1][None]
    pos = torch.arange(1, t + 2)[None]
    out: list[int] = []
    for _ in range(k):
        fp = head(tok, f, pos, past=cache)[:, -1:]
        d = int(head.head_ids[head.logits(fp)[0, -1].argmax()])
        out.append(d)
        tok, f, pos = torch.tensor([[d]]), fp, pos[:, -1:] + 1
    return out


@torch.inference_mode()
def model_chain(draft, ids: torch.Tensor, t: int, k: int) -> list[int]:
    cache = DynamicCache()
    x = ids[: t + 2][None]
    out: list[int] = []
    for _ in range(k):
        logits = draft(input_ids=x, past_key_values=cache, use_cache=True).logits[0, -1]
        d = int(logits.argmax())
        out.append(d)
        x = torch.tensor([[d]])
    return out


def _accepted(draft: list[int], truth: list[int]) -> int:
    n = 0
    for d, t in zip(draft, truth, strict=False):
        if d != t:
            break
        n += 1
    return n


def per_position(accepted: list[int], k: int) -> list[float]:
    """P(position j accepted | positions < j accepted), j = 1..k."""
    out = []
    for j in range(1, k + 1):
        reached = sum(a >= j - 1 for a in accepted)
        out.append(round(sum(a >= j for a in accepted) / reached, 4) if reached else 0.0)
    return out


def evaluate(head: FeatureHead, draft, records: list[dict], k: int, anchors: int) -> dict:
    report: dict = {}
    for kind in sorted({r.get("kind", "chat") for r in records}):
        recs = [r for r in records if r.get("kind", "chat") == kind]
        spots = [
            (ri, t)
            for ri, r in enumerate(recs)
            for t in range(r["prompt_len"] - 1, len(r["ids"]) - k - 2, 3)
        ]
        step = max(1, len(spots) // anchors)
        spots = spots[::step][:anchors]
        acc = {"feature": [], "model": []}
        first_ok = 0
        spent = {"feature": 0.0, "model": 0.0}
        for ri, t in spots:
            ids, feats = recs[ri]["ids"].long(), recs[ri]["feats"]
            truth = ids[t + 2 : t + 2 + k].tolist()
            t0 = time.perf_counter()
            fd = head_chain(head, ids, feats, t, k)
            t1 = time.perf_counter()
            md = model_chain(draft, ids, t, k)
            t2 = time.perf_counter()
            spent["feature"] += t1 - t0
            spent["model"] += t2 - t1
            acc["feature"].append(_accepted(fd, truth))
            acc["model"].append(_accepted(md, truth))
            first_ok += fd[0] == truth[0]
        n = max(len(spots), 1)
        report[kind] = {
            "anchors": len(spots),
            "k": k,
            **{
                name: {
                    "per_position": per_position(a, k),
                    "mean_accepted": round(sum(a) / n, 3),
                    "ms_per_token": round(spent[name] / (n * k) * 1e3, 2),
                }
                for name, a in acc.items()
            },
            "feature_first_token_agreement": round(first_ok / n, 4),
        }
    return report


def load_featured(data: Path) -> list[dict]:
    recs: list[dict] = []
    for path in sorted(data.glob("shard_*.pt")):
        shard = torch.load(path, weights_only=False)
        feats = torch.load(path.with_name(path.name.replace("shard_", "feat_")), weights_only=False)
        for r, f in zip(shard, feats, strict=True):
            r["feats"] = f
        recs += shard
    return recs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path, help="the recipe's work/gen_heldout")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--anchors", type=int, default=300, help="per kind")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    target = smollm2.ensure_target()
    head = load_feature_head(args.head, target, dtype=torch.bfloat16)
    draft = AutoModelForCausalLM.from_pretrained(SMOLLM2_DRAFT_DIR, dtype=torch.bfloat16).eval()
    report = evaluate(head, draft, load_featured(args.data), args.k, args.anchors)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
