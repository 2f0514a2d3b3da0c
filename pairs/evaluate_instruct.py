"""Quality and speed report for the SmolLM2 pair: held-out chat requests and code prompts.

    specdec eval-pair --pair smollm2-135m-instruct [--prompts 24] [--ks 2,4,6]

The held-out prompts come from the standard-library files the recipe held out (its split),
past the ones it used to pick checkpoints; chat requests go through the chat template and
answers stop at EOS. For each k: greedy alpha, tau and the accepted-per-round histogram;
then the KV-cached decode step of draft and target and a few sample answers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import workers.checkpoints.subset_draft  # noqa: F401 - registers the draft type
from pairs import corpus, prompts
from pairs.evaluate import step_ms
from pairs.speculative import SpecStats, plain_greedy, speculative_greedy
from workers.checkpoints import registry

# The recipe's held-out generations (its checkpoint choice) use the first prompts of the
# held-out list: the evaluation starts after them.
SKIP_HELDOUT = 128
SEED = 0


def heldout_prompts(
    tok, n: int, split_path: Path, max_tokens: int = 256
) -> list[tuple[str, list[int]]]:
    """n held-out prompts, two chat requests for every code prompt, in a fixed order."""
    split = corpus.Split.load(split_path)
    rows = []
    for p in prompts.build_prompts(split.heldout, SEED + 1):
        ids = prompts.encode(tok, p, 10**9)
        if p.kind == "chat" and len(ids) > max_tokens:
            continue
        rows.append((p.kind, ids[-max_tokens:]))
    rows = rows[SKIP_HELDOUT:]
    chat = [r for r in rows if r[0] == "chat"][: n - n // 3]
    code = [r for r in rows if r[0] == "code"][: n // 3]
    return chat + code


def eval_instruct(
    name: str = registry.SMOLLM2,
    *,
    n_prompts: int = 24,
    new_tokens: int = 64,
    ks: tuple[int, ...] = (2, 4, 6),
    verify: int = 4,
    threads: int = 2,
    samples: int = 2,
    out=print,
) -> dict:
    torch.set_num_threads(threads)
    pair = registry.get_pair(name)
    tpath, dpath = pair.target(), pair.draft()
    tok = AutoTokenizer.from_pretrained(tpath)
    target = AutoModelForCausalLM.from_pretrained(tpath, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(dpath, dtype=torch.float32).eval()
    stop = frozenset({int(tok.eos_token_id)})
    rows = heldout_prompts(tok, n_prompts, dpath / "split.json")
    report: dict = {"pair": name, "target": str(tpath), "draft": str(dpath), "prompts": len(rows)}
    report["params"] = {
        "target": sum(p.numel() for p in target.parameters()),
        "draft_own": sum(p.numel() for n, p in draft.named_parameters() if "embed_tokens" not in n),
        "draft_head_size": int(draft.config.head_size),
        "draft_layers": int(draft.config.num_hidden_layers),
    }
    out(f"pair: {name}\n  target {tpath}\n  draft  {dpath}")
    out(
        f"params: target={report['params']['target']:,}  draft (without the borrowed "
        f"embeddings)={report['params']['draft_own']:,}  draft layers="
        f"{report['params']['draft_layers']}  head={report['params']['draft_head_size']} tokens"
    )
    n_chat = sum(k == "chat" for k, _ in rows)
    outs: list[list[int]] = []
    for k in ks:
        total, t0 = SpecStats(), time.perf_counter()
        outs = []
        by_kind: dict[str, SpecStats] = {"chat": SpecStats(), "code": SpecStats()}
        for kind, ids in rows:
            o, st = speculative_greedy(target, draft, ids, new_tokens, k, stop)
            total.add(st)
            by_kind[kind].add(st)
            outs.append(o)
        hist = [total.accepted_per_round.count(i) for i in range(k + 1)]
        # alpha counts the drafts after a round's first rejection as rejected too; the chance
        # that a checked draft token is accepted (what (1 - a^(k+1)) / (1 - a) assumes) is
        # accepted / (accepted + rejections), a round with fewer than k accepted rejecting one.
        per_position = total.accepted / max(total.accepted + sum(hist[:k]), 1)
        report[f"k{k}"] = {
            "alpha": total.alpha,
            "per_position_acceptance": per_position,
            "tau": total.tau,
            "alpha_chat": by_kind["chat"].alpha,
            "alpha_code": by_kind["code"].alpha,
            "rounds": len(total.accepted_per_round),
            "accepted_hist": hist,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        out(
            f"greedy k={k} on {len(rows)} held-out prompts ({n_chat} chat, {len(rows) - n_chat} "
            f"code) x <={new_tokens} tokens: alpha={total.alpha:.3f} (chat "
            f"{by_kind['chat'].alpha:.3f}, code {by_kind['code'].alpha:.3f})  tau={total.tau:.3f}"
            f"  per-position acceptance={per_position:.3f}  accepted/round histogram {hist}"
        )
    mismatches = sum(
        outs[i] != plain_greedy(target, rows[i][1], new_tokens, stop) for i in range(verify)
    )
    report["verified_equal_to_target_greedy"] = f"{verify - mismatches}/{verify}"
    out(f"spec == target greedy on {report['verified_equal_to_target_greedy']} checked")
    report["step_ms"] = step_ms({"target": target, "draft": draft})
    report["step_ratio"] = report["step_ms"]["draft"] / report["step_ms"]["target"]
    out(
        f"decode step (KV cache, 1 token, ctx 128, {threads} threads): target "
        f"{report['step_ms']['target']:.2f} ms, draft {report['step_ms']['draft']:.2f} ms "
        f"(ratio {report['step_ratio']:.3f})"
    )
    for i in range(min(samples, len(rows))):
        out(f"--- sample {i + 1} ({rows[i][0]}): {tok.decode(rows[i][1])[-300:]!r}")
        out(f"--- answer: {tok.decode(outs[i])!r}")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default=registry.SMOLLM2)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ks", default="2,4,6")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rep = eval_instruct(
        args.pair,
        n_prompts=args.prompts,
        new_tokens=args.new_tokens,
        ks=tuple(int(k) for k in args.ks.split(",")),
        threads=args.threads,
    )
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
