"""Time to first token: HF `generate` against the in-process engine, with and without the
prefill's logits (the engine's prefill computes none: the cache is all it needs).

A first token is a prefill plus one target step, so each system is timed on a generation of one
token. Systems alternate prompt by prompt (a shared, noisy machine drifts); medians are printed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class _Timed:
    """A system's one-token generation, timed per call."""

    def __init__(self, fn: Callable[[list[int]], object]) -> None:
        self.fn = fn
        self.times: list[float] = []

    def __call__(self, ids: list[int]) -> None:
        t0 = time.perf_counter()
        self.fn(ids)
        self.times.append(time.perf_counter() - t0)


def bench_ttft(target_path: str, draft_path: str, prompts: list[list[int]]) -> dict[str, float]:
    """System name -> median milliseconds to the first token over `prompts`."""
    from transformers import AutoModelForCausalLM

    from cluster.engine import SpecEngine
    from cluster.scheduling.policy import SpecMode

    hf = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    engine = SpecEngine.from_paths(target_path, draft_path)
    runners = [engine.target.worker.runner, engine.draft.worker.runner]
    keep = [r._keep_kw for r in runners]

    def hf_first(ids: list[int]) -> None:
        with torch.inference_mode():
            hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=1,
                do_sample=False,
                pad_token_id=0,
            )

    def engine_first(all_logits: bool) -> Callable[[list[int]], None]:
        def run(ids: list[int]) -> None:
            for r, kw in zip(runners, keep, strict=True):
                r._keep_kw = {} if all_logits else kw  # {}: the head over every position
            engine.generate(ids, max_new_tokens=1, mode=SpecMode.AUTO)

        return run

    systems = {
        "ttft hf generate": _Timed(hf_first),
        "ttft engine (prefill without logits)": _Timed(engine_first(False)),
        "ttft engine, prefill with every position's logits": _Timed(engine_first(True)),
    }
    try:
        for fn in systems.values():
            fn(prompts[0])  # warm-up
            fn.times.clear()
        for ids in prompts:
            for fn in systems.values():
                fn(ids)
    finally:
        for r, kw in zip(runners, keep, strict=True):
            r._keep_kw = kw
        engine.close()
    return {name: 1e3 * statistics.median(fn.times) for name, fn in systems.items()}
