"""A pair's acceptance, measured through the in-process engine (cluster.engine's SpecEngine).

Evaluation runs the serving scheduler, not a loop of its own: each prompt is one greedy request
at a fixed k (mode ON, pipelining off), so every target pass after the prefill is a round of
min(k, tokens left - 1) drafts, or a plain step when only one token is left. The rounds' records
(GenerationStats) give every figure: alpha = accepted / proposed drafts, tau = committed tokens
per target verify pass (the prefill commits nothing and is not one), the accepted-per-round
histogram, and the per-position acceptance.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, fields

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cluster.engine import SpecEngine
from cluster.scheduling.policy import Drafter, SpecMode
from cluster.scheduling.rounds import GenerationStats, add_rounds
from pairs.target_greedy import plain_greedy
from workers.draft import DraftWorker
from workers.target import TargetWorker


@dataclass(slots=True)
class LoadedPair:
    """An engine over a pair, and its own models for what the engine does not measure (loss,
    decode-step time, the greedy oracle). Use them only while the engine is idle."""

    engine: SpecEngine
    target: PreTrainedModel
    draft: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    stop: frozenset[int]  # the target's EOS ids: where the engine ends a sequence

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LoadedPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_pair(target_path: str | os.PathLike, draft_path: str | os.PathLike) -> LoadedPair:
    """Target and draft in float32; refuses a tokenizer mismatch (SpecEngine checks it)."""
    target = TargetWorker.from_path(target_path)
    draft = DraftWorker.from_path(draft_path)
    engine = SpecEngine(target, draft)
    return LoadedPair(
        engine,
        target.runner.model,
        draft.runner.model,
        target.runner.tokenizer,
        frozenset(target.runner.eos_token_ids),
    )


@dataclass(slots=True)
class Measured:
    stats: GenerationStats  # pooled over the prompts
    outputs: list[list[int]]
    verified: int  # outputs checked against the target's own greedy decoding
    mismatches: int  # of those, the ones that differ from it


def measure_acceptance(
    pair: LoadedPair, prompts: list[list[int]], new_tokens: int, k: int, verify: int = 0
) -> Measured:
    """Greedy speculation at a fixed k over prompts, one at a time (a row's figures do not
    depend on a neighbour's); the first `verify` outputs are checked against plain greedy."""
    per_prompt, outputs, mismatches = [], [], 0
    for i, ids in enumerate(prompts):
        res = pair.engine.generate(
            ids,
            max_new_tokens=new_tokens,
            mode=SpecMode.ON,
            k=k,
            pipelined=False,
            drafter=Drafter.MODEL,  # the draft model's acceptance, not lookup's
        )
        per_prompt.append(res.stats)
        outputs.append(res.token_ids)
        if i < verify and res.token_ids != plain_greedy(pair.target, ids, new_tokens, pair.stop):
            mismatches += 1
    return Measured(pooled(per_prompt), outputs, min(verify, len(prompts)), mismatches)


def pooled(stats: Iterable[GenerationStats]) -> GenerationStats:
    """One GenerationStats over many sequences: every counter summed, the records joined."""
    total = GenerationStats()
    for s in stats:
        for f in fields(GenerationStats):  # ints add, record lists concatenate
            if f.name == "by_drafter":
                for name, counts in s.by_drafter.items():
                    add_rounds(total.by_drafter, name, *counts)
                continue
            setattr(total, f.name, getattr(total, f.name) + getattr(s, f.name))
    return total


def accepted_histogram(stats: GenerationStats, k: int) -> list[int]:
    """[j] = rounds that accepted exactly j drafts, j = 0..k."""
    hist = stats.acceptance_histogram
    return hist + [0] * (k + 1 - len(hist))


def per_position_acceptance(stats: GenerationStats) -> float:
    """The chance that a checked draft token is accepted: what (1 - a^(k+1)) / (1 - a) assumes.

    alpha counts the drafts after a round's first rejection as rejected too; here only the
    checked ones count: accepted / (accepted + rounds that rejected one)."""
    rejections = sum(1 for r in stats.records if r.accepted < r.proposed)
    return stats.accepted_tokens / max(stats.accepted_tokens + rejections, 1)
