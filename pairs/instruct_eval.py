"""Quality and speed report of an instruct pair (the SmolLM2 recipe's): held-out chat requests
and code prompts (pairs.heldout), answers ending at EOS.

For each k: greedy alpha (all, chat, code), per-position acceptance, tau and the
accepted-per-round histogram; then the check against the target's own greedy output, the
KV-cached decode step of draft and target and a few sample answers.
"""

from __future__ import annotations

import time

import torch

from pairs.acceptance import (
    accepted_histogram,
    load_pair,
    measure_acceptance,
    per_position_acceptance,
    pooled,
)
from pairs.heldout import heldout_instruct_prompts
from pairs.step_timing import step_ms
from pairs.target_greedy import plain_greedy
from workers.checkpoints import registry


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
    """The report of the named pair, printed and returned."""
    torch.set_num_threads(threads)
    spec = registry.get_pair(name)
    tpath, dpath = spec.target(), spec.draft()
    with load_pair(tpath, dpath) as pair:
        target, draft, tok = pair.target, pair.draft, pair.tokenizer
        rows = heldout_instruct_prompts(tok, n_prompts, dpath / "split.json")
        report: dict = {"pair": name, "target": str(tpath), "draft": str(dpath)}
        report["prompts"] = len(rows)
        report["params"] = {
            "target": sum(p.numel() for p in target.parameters()),
            "draft_own": sum(
                p.numel() for n, p in draft.named_parameters() if "embed_tokens" not in n
            ),
            "draft_head_size": int(draft.config.head_size),
            "draft_layers": int(draft.config.num_hidden_layers),
        }
        out(f"pair: {name}\n  target {tpath}\n  draft  {dpath}")
        out(
            f"params: target={report['params']['target']:,}  draft (without the borrowed "
            f"embeddings)={report['params']['draft_own']:,}  draft layers="
            f"{report['params']['draft_layers']}  head={report['params']['draft_head_size']} "
            "tokens"
        )
        n_chat = sum(kind == "chat" for kind, _ in rows)
        outputs: list[list[int]] = []
        for k in ks:
            t0 = time.perf_counter()
            by_kind = {
                kind: measure_acceptance(pair, [ids for r, ids in rows if r == kind], new_tokens, k)
                for kind in ("chat", "code")
            }
            total = pooled(m.stats for m in by_kind.values())
            outputs = by_kind["chat"].outputs + by_kind["code"].outputs  # the order of rows
            hist = accepted_histogram(total, k)
            per_position = per_position_acceptance(total)
            alpha_chat = by_kind["chat"].stats.acceptance_rate
            alpha_code = by_kind["code"].stats.acceptance_rate
            report[f"k{k}"] = {
                "alpha": total.acceptance_rate,
                "per_position_acceptance": per_position,
                "tau": total.tokens_per_target_pass,
                "alpha_chat": alpha_chat,
                "alpha_code": alpha_code,
                "rounds": total.rounds,
                "accepted_hist": hist,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            out(
                f"greedy k={k} on {len(rows)} held-out prompts ({n_chat} chat, "
                f"{len(rows) - n_chat} code) x <={new_tokens} tokens: "
                f"alpha={total.acceptance_rate:.3f} (chat {alpha_chat:.3f}, code "
                f"{alpha_code:.3f})  tau={total.tokens_per_target_pass:.3f}  per-position "
                f"acceptance={per_position:.3f}  accepted/round histogram {hist}"
            )
        verified = min(verify, len(rows))
        mismatches = sum(
            outputs[i] != plain_greedy(target, rows[i][1], new_tokens, pair.stop)
            for i in range(verified)
        )
        report["verified_equal_to_target_greedy"] = f"{verified - mismatches}/{verified}"
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
        out(f"--- answer: {tok.decode(outputs[i])!r}")
    return report
