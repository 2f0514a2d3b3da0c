"""Quality and speed report for a draft/target pair (by default the shipped one).

python -m pairs.evaluate [--pair DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from pairs import corpus
from pairs.data import encode_docs, fixed_windows
from pairs.speculative import SpecStats, plain_greedy, speculative_greedy
from pairs.train import eval_loss
from workers.checkpoints import SHIPPED_PAIR_DIR


def load_pair(pair_dir: Path) -> tuple[PreTrainedModel, PreTrainedModel, object]:
    """Target, draft (fp32, eval mode) and the shared tokenizer; refuses a tokenizer mismatch."""
    tok = AutoTokenizer.from_pretrained(pair_dir / "target")
    if AutoTokenizer.from_pretrained(pair_dir / "draft").get_vocab() != tok.get_vocab():
        raise ValueError("draft and target tokenizers differ")
    target = AutoModelForCausalLM.from_pretrained(pair_dir / "target", dtype=torch.float32)
    draft = AutoModelForCausalLM.from_pretrained(pair_dir / "draft", dtype=torch.float32)
    return target.eval(), draft.eval(), tok


def heldout_texts(pair_dir: Path) -> list[str]:
    split = corpus.Split.load(pair_dir / "split.json")
    root = Path(split.root)
    return [t for f in split.heldout if (t := corpus.read_text(root, f))]


def heldout_prompts(
    tok, texts: list[str], n: int, seed: int = 0, max_tokens: int = 128
) -> list[list[int]]:
    """n seeded function-start prompts from held-out files, left-truncated to max_tokens."""
    prompts = [p for t in texts for p in corpus.function_prompts(t, 1500)]
    random.Random(seed).shuffle(prompts)
    ids = tok(prompts[:n], add_special_tokens=False)["input_ids"]
    return [x[-max_tokens:] for x in ids]


@torch.inference_mode()
def step_ms(
    models: dict[str, PreTrainedModel], context: int = 128, steps: int = 60, block: int = 10
) -> dict:
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


def measure_acceptance(
    target, draft, prompts: list[list[int]], new_tokens: int, k: int, verify: int = 0
) -> tuple[SpecStats, int, list[list[int]]]:
    """Pooled greedy acceptance over prompts; checks the first `verify` against plain greedy."""
    total, mismatches, outs = SpecStats(), 0, []
    for i, p in enumerate(prompts):
        out, st = speculative_greedy(target, draft, p, new_tokens, k)
        total.add(st)
        outs.append(out)
        if i < verify and out != plain_greedy(target, p, new_tokens):
            mismatches += 1
    return total, mismatches, outs


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
    torch.set_num_threads(threads)
    pair = Path(pair_dir) if pair_dir else SHIPPED_PAIR_DIR
    target, draft, tok = load_pair(pair)
    texts = heldout_texts(pair)
    report: dict = {"pair": str(pair), "vocab": len(tok)}
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

    prompts = heldout_prompts(tok, texts, n_prompts, seed)
    t0 = time.perf_counter()
    stats, mismatches, outs = measure_acceptance(target, draft, prompts, new_tokens, k, verify)
    report.update(
        prompts=len(prompts),
        new_tokens=new_tokens,
        k=k,
        alpha=stats.alpha,
        tau=stats.tau,
        rounds=len(stats.accepted_per_round),
        accepted_hist=[stats.accepted_per_round.count(i) for i in range(k + 1)],
        verified_equal_to_target_greedy=f"{verify - mismatches}/{verify}",
        spec_seconds=round(time.perf_counter() - t0, 1),
    )
    report["step_ms"] = step_ms({"target": target, "draft": draft})
    report["step_ratio"] = report["step_ms"]["draft"] / report["step_ms"]["target"]

    out(f"pair: {pair}  vocab={len(tok)}")
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
        f"greedy speculation k={k} on {len(prompts)} held-out prompts x {new_tokens} tokens: "
        f"alpha={stats.alpha:.3f}  tau={stats.tau:.3f}  accepted/round histogram "
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
        out("--- completion:\n" + tok.decode(outs[i]))
    return report


def main(argv: list[str] | None = None) -> int:
    import sys

    from workers.checkpoints.registry import PAIRS

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--pair" in argv and argv.index("--pair") + 1 < len(argv):
        name = argv[argv.index("--pair") + 1]
        if name in PAIRS and PAIRS[name].chat:  # an instruct pair: chat + code report
            from pairs.evaluate_instruct import main as instruct_main

            return instruct_main(argv)
        if name in PAIRS:
            argv[argv.index("--pair") + 1] = str(PAIRS[name].target().parent)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", type=Path, default=None, help="dir with target/, draft/, split.json")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)
    rep = eval_pair(
        args.pair,
        n_prompts=args.prompts,
        new_tokens=args.new_tokens,
        k=args.k,
        threads=args.threads,
    )
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
