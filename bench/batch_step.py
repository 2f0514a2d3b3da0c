"""Step times of the batched runner against the per-sequence path it replaced (not a test).

    python -m bench.batch_step [--model DIR] [--context 128] [--steps 40] [--threads 2]

The per-sequence baseline is what ModelRunner did before the batched KV: one DynamicCache per
sequence, one forward per sequence (cat-growing cache, crop to roll back). Printed: the median
wall time of a decode step (1 new token per sequence) and of a verify step (k + 1 = 5 new tokens,
then 2 rolled back) for B = 1 and B = 16 sequences of `context` tokens each.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from workers.checkpoints import shipped_target_path
from workers.model_runner import ModelRunner


class PerSequence:
    """The old path: a DynamicCache per sequence."""

    def __init__(self, model) -> None:
        self.model = model
        self.caches: dict[str, DynamicCache] = {}
        params = inspect.signature(model.forward).parameters
        self.kw = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def extend(self, sid: str, tokens: list[int]) -> torch.Tensor:
        cache = self.caches.setdefault(sid, DynamicCache())
        ids = torch.tensor([tokens])
        return self.model(input_ids=ids, use_cache=True, **{self.kw: cache}).logits[0]

    def rollback(self, sid: str, n_drop: int) -> None:
        self.caches[sid].crop(-n_drop)


def compare_ms(new, base, steps: int) -> tuple[float, float]:
    """Median wall times of new and base, alternating (a shared, noisy machine drifts)."""
    new(), base()  # warm
    t_new, t_base = [], []
    for _ in range(steps):
        for fn, out in ((new, t_new), (base, t_base)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(t_new), 1e3 * statistics.median(t_base)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.batch_step")
    ap.add_argument("--model", default=str(shipped_target_path()))
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    runner = ModelRunner(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    old = PerSequence(model)
    vocab = runner.vocab_size
    print(
        f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, "
        f"context {args.context}, {torch.get_num_threads()} threads"
    )

    def toks(n: int) -> list[int]:
        return torch.randint(2, vocab, (n,), generator=gen).tolist()

    for b in (1, 16):
        sids = [f"b{b}-{i}" for i in range(b)]
        runner.extend_batch([(s, toks(args.context)) for s in sids])
        for s in sids:
            old.extend(s, toks(args.context))

        def new_decode(sids=sids):
            runner.extend_batch([(s, toks(1)) for s in sids])

        def old_decode(sids=sids):
            for s in sids:
                old.extend(s, toks(1))

        def new_verify(sids=sids):
            runner.extend_batch([(s, toks(5)) for s in sids])
            for s in sids:
                runner.rollback(s, runner.length(s) - 2)

        def old_verify(sids=sids):
            for s in sids:
                old.extend(s, toks(5))
                old.rollback(s, 2)

        for name, new, base in (
            ("decode", new_decode, old_decode),
            ("verify k=4", new_verify, old_verify),
        ):
            t_new, t_old = compare_ms(new, base, args.steps)
            print(
                f"B={b:2d} {name:10s}: batched {t_new:7.2f} ms   per-sequence {t_old:7.2f} ms"
                f"   ({t_old / t_new:4.2f}x)"
            )
        for s in sids:
            runner.release(s)


if __name__ == "__main__":
    main()
