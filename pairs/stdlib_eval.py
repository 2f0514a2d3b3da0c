"""Quality and speed report of a code pair (the stdlib recipe's; by default the shipped one):
held-out loss of both models, greedy acceptance at one k, the decode-step ratio, samples."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from pairs.acceptance import accepted_histogram, load_pair, measure_acceptance
from pairs.heldout import heldout_code_prompts, heldout_texts
from pairs.step_timing import step_ms
from pairs.token_stream import encode_docs, fixed_windows
from pairs.train import eval_loss
from workers.checkpoints import SHIPPED_PAIR_DIR


def eval_pair(
    pair_dir: str | Path | None = None,
    *,
    n_prompts: int = 64,
    new_tokens: int = 64,
    k: int = 4,
    loss_windows: int = 16,
    seq_len: int = 256,
    verify: int = 8,
    threads: int = 2,
    seed: int = 0,
    samples: int = 3,
    out=print,
) -> dict:
    """The report of the pair in pair_dir (target/, draft/, split.json), printed and returned."""
    torch.set_num_threads(threads)
    pair_dir = Path(pair_dir) if pair_dir else SHIPPED_PAIR_DIR
    with load_pair(pair_dir / "target", pair_dir / "draft") as pair:
        target, draft, tok = pair.target, pair.draft, pair.tokenizer
        texts = heldout_texts(pair_dir)
        report: dict = {"pair": str(pair_dir), "vocab": len(tok)}
        report["params"] = {
            "target": sum(p.numel() for p in target.parameters()),
            "draft": sum(p.numel() for p in draft.parameters()),
        }

        stream = encode_docs(tok, texts)
        windows = fixed_windows(stream, seq_len, loss_windows, seed + 1)
        report["heldout_loss_tokens"] = windows[:, 1:].numel()
        for name, m in (("target", target), ("draft", draft)):
            loss = eval_loss(m, windows)
            report[f"{name}_loss"], report[f"{name}_ppl"] = loss, math.exp(loss)

        prompts = heldout_code_prompts(tok, texts, n_prompts, seed)
        t0 = time.perf_counter()
        measured = measure_acceptance(pair, prompts, new_tokens, k, verify)
        stats = measured.stats
        report.update(
            prompts=len(prompts),
            new_tokens=new_tokens,
            k=k,
            alpha=stats.acceptance_rate,
            tau=stats.tokens_per_target_pass,
            rounds=stats.rounds,
            accepted_hist=accepted_histogram(stats, k),
            verified_equal_to_target_greedy=(
                f"{measured.verified - measured.mismatches}/{measured.verified}"
            ),
            spec_seconds=round(time.perf_counter() - t0, 1),
        )
        report["step_ms"] = step_ms({"target": target, "draft": draft})
    report["step_ratio"] = report["step_ms"]["draft"] / report["step_ms"]["target"]

    _print(report, prompts, measured.outputs, tok, threads, samples, out)
    return report


def _print(report: dict, prompts, outputs, tok, threads: int, samples: int, out) -> None:
    out(f"pair: {report['pair']}  vocab={report['vocab']}")
    out(
        f"params: target={report['params']['target']:,}  draft={report['params']['draft']:,}"
        f"  (draft/target={report['params']['draft'] / report['params']['target']:.3f})"
    )
    out(
        f"held-out loss over {report['heldout_loss_tokens']} tokens: "
        f"target {report['target_loss']:.3f} (ppl {report['target_ppl']:.2f}), "
        f"draft {report['draft_loss']:.3f} (ppl {report['draft_ppl']:.2f})"
    )
    out(
        f"greedy speculation k={report['k']} on {len(prompts)} held-out prompts x "
        f"{report['new_tokens']} tokens: "
        f"alpha={report['alpha']:.3f}  tau={report['tau']:.3f}  accepted/round histogram "
        f"{report['accepted_hist']}  (spec == target greedy on "
        f"{report['verified_equal_to_target_greedy']} checked)"
    )
    out(
        f"decode step (KV cache, 1 token, ctx 128, {threads} threads): target "
        f"{report['step_ms']['target']:.2f} ms, draft {report['step_ms']['draft']:.2f} ms "
        f"(ratio {report['step_ratio']:.3f})"
    )
    for i in range(min(samples, len(prompts))):
        head = tok.decode(prompts[i]).splitlines()[-2:]
        out(f"--- sample {i + 1}: prompt ends with:\n" + "\n".join(head))
        out("--- completion:\n" + tok.decode(outputs[i]))
