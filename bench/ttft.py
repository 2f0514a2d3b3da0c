"""Time to first token: HF `generate` against the in-process engine, whose target prefill runs
the head at each row's last position only, and against the same engine with the head over every
prompt position.

Each system is timed on a generation of one token (the engine's prefill pass decodes it). Systems
alternate prompt by prompt (a shared, noisy machine drifts); medians are printed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from bench.hf import hf_greedy


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
        hf_greedy(hf, ids, 1)

    def engine_first(all_logits: bool) -> Callable[[list[int]], None]:
        def run(ids: list[int]) -> None:
            for r, kw in zip(runners, keep, strict=True):
                r._keep_kw = {} if all_logits else kw  # {}: the head over every position
            engine.generate(ids, max_new_tokens=1, mode=SpecMode.AUTO)

        return run

    systems = {
        "ttft hf generate": _Timed(hf_first),
        "ttft engine (head at the last position)": _Timed(engine_first(False)),
        "ttft engine, head over every prompt position": _Timed(engine_first(True)),
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
