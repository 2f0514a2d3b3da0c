"""Pipelining at batch level: whether a step drafts ahead, and whether a guess held. Pure.

While the target verifies block i, the draft drafts the guessed bonus token plus block i+1 for the
rows expected to accept theirs whole. When the guess holds (all of block i accepted and the
target's bonus equals the draft's own next token) the next block is ready the moment the verify
returns (a pipeline hit); otherwise the row's next propose rolls the draft back (a miss), and the
batch is not held back by it. Drafting ahead pays where the draft has compute of its own (a GPU
pool); where draft and target share cores it slows the target, so "auto" measures both.
"""

from __future__ import annotations

from workers.batch import Proposal
from workers.types import SparseQ, Verdict


def ahead_hit(block: Proposal, verdict: Verdict, ahead: Proposal) -> Proposal | None:
    """The next block, ready, when the guess behind `ahead` held; None on a miss."""
    whole = verdict.accepted == len(block.tokens)
    at_bonus = ahead.start == block.start + len(block.tokens)
    if whole and at_bonus and len(ahead.tokens) > 1 and ahead.tokens[0] == verdict.token:
        q = None if ahead.q is None else SparseQ(ahead.q.indices[1:], ahead.q.probs[1:])
        return Proposal(ahead.start + 1, ahead.tokens[1:], q, ahead.unsure_last)
    return None


class PipeliningChoice:
    """Draft ahead or not, for the steps of one scheduler. True / False: fixed. "auto": the mode
    with more committed tokens per second of speculative steps (EWMA), running a few steps of the
    other mode when its figure is missing or stale."""

    def __init__(
        self,
        setting: bool | str,
        *,
        explore_steps: int = 4,
        reexplore_after: int = 200,
        weight: float = 0.2,
    ) -> None:
        self.adaptive = setting == "auto"
        self.now = setting is not False
        self.explore_steps = explore_steps
        self.reexplore_after = reexplore_after
        self.weight = weight
        self.rate: dict[bool, float] = {}
        self.seen_at: dict[bool, int] = {}
        self.spec_steps = 0
        self._explore_left = 0
        self._skip = True  # the first step after a switch is neither mode

    @property
    def overlap_pays(self) -> bool:
        """Whether draft work beside a target pass is known to pay here: pipelining set on, or
        measured faster than not. Until measured, no (on shared cores overlap slows the target
        pass by more than it saves; on pools of their own the measurement says so soon)."""
        if not self.adaptive:
            return self.now
        on, off = self.rate.get(True), self.rate.get(False)
        return on is not None and off is not None and on > off

    def observe(self, speculative: bool, tokens: int, seconds: float) -> None:
        if not speculative or seconds <= 0:
            return
        self.spec_steps += 1
        if self._skip:
            self._skip = False
        else:
            r = tokens / seconds
            old = self.rate.get(self.now)
            self.rate[self.now] = r if old is None else old + self.weight * (r - old)
            self.seen_at[self.now] = self.spec_steps
        if self.adaptive:
            self._decide()

    def _decide(self) -> None:
        if self._explore_left > 0:
            self._explore_left -= 1
            return
        other = not self.now
        stale = self.spec_steps - self.seen_at.get(other, -(10**9)) > self.reexplore_after
        if self.now in self.rate and stale:
            self._switch(other)
            self._explore_left = self.explore_steps
            return
        if other in self.rate and self.rate[other] > self.rate.get(self.now, 0.0):
            self._switch(other)

    def _switch(self, mode: bool) -> None:
        self.now = mode
        self._skip = True
