"""The lookup side of a step: which rows take a lookup block, and how long. Pure: no I/O.

Every step, after the batch policy chose the model draft's k per row, each row that may draft by
lookup (its drafter is `auto` or `lookup`, its mode not OFF) looks for its text's end earlier in
its own prompt and output and in the scheduler's recent outputs (lookup.py). The target pass is
one padded width for all rows, so the plan is priced per width: at width w every row with a match
takes its longest block that fits (w - 1 tokens at most) where that is expected to commit more
than its model block would (`expected_tokens` at the row's acceptance for that match length), and
the step's committed tokens are divided by the pass's cost at that width (the measured step-cost
fit; its prior shape while nothing is measured). The best width is taken when it beats the step
as the batch policy planned it by `keep_gain`. So one stream takes blocks as long as the match
and the verify's cost allow (up to `lookup.max_tokens`, beyond the model's `max_draft_tokens`),
many rows that all copy widen together, and one row's long match does not widen a big batch. A
row that takes a lookup block drafts nothing on the model this step.

A seeded row decides alone (its output must repeat whatever shares its batch): its own text only,
priced by the cost priors for its own width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cluster.scheduling.lookup import (
    LookupAcceptance,
    Match,
    RecentOutputs,
    RowLookup,
    best_length,
    expected_tokens,
)
from cluster.scheduling.policy import PolicyConfig, SpecMode
from cluster.scheduling.rows import Row
from cluster.scheduling.step_costs import StepCosts
from workers.batch import Proposal

LOOKUP = "lookup"
GRAMMAR = "grammar"  # a structured output's forced tokens (workers/grammar.py)


def forced_blocks(rows: Sequence[Row]) -> dict[str, Proposal]:
    """seq_id -> a block of the tokens the row's grammar forces next, proposed with certainty
    (a one-hot q, as a lookup block). The target's masked distribution is (nearly always) all
    on them, so the block commits whole in one pass, and nothing else drafts for the row."""
    out: dict[str, Proposal] = {}
    for row in rows:
        if not row.forced or row.mode is SpecMode.OFF:  # OFF: plain steps, as asked
            continue
        n = row.rounds.block_size(len(row.forced))
        if n:
            start = row.rounds.committed_len
            out[row.seq_id] = Proposal(start, list(row.forced[:n]), None, drafter=GRAMMAR)
    return out


@dataclass(frozen=True, slots=True)
class LookupBlock:
    proposal: Proposal
    match_length: int


class LookupDrafting:
    def __init__(self, config: PolicyConfig, costs: StepCosts) -> None:
        self.config = config
        self.lookup = config.lookup
        self.costs = costs
        self.recent = RecentOutputs(self.lookup)
        # What this scheduler's lookup blocks accept per match length: every new row's start.
        self.acceptance = LookupAcceptance(self.lookup)

    @property
    def cap(self) -> int:
        """The longest block a step may verify (admission reserves KV for it)."""
        return max(self.config.max_draft_tokens, self.lookup.max_tokens)

    # -- a row's life -------------------------------------------------------------------------

    def admit(self, row: Row) -> None:
        if row.mode is SpecMode.OFF or not row.drafter.uses_lookup:
            row.lookup = None
            return
        if row.lookup is None:  # a row moved here from another scheduler keeps its own
            row.lookup = RowLookup(self.lookup, row.rounds.tokens)
            if not row.deterministic:
                row.lookup.acceptance = self.acceptance.copy()

    def committed(self, row: Row, tokens: Sequence[int]) -> None:
        if row.lookup is not None and tokens:
            row.lookup.extend(tokens)

    def finished(self, row: Row) -> None:
        """A row that ended: its output joins the recent outputs (a seeded one's too: what it
        wrote may serve others, it just never reads theirs)."""
        if row.rounds.generated:
            self.recent.add(row.rounds.generated)

    def observe(self, row: Row, block: LookupBlock, accepted: int) -> None:
        n = len(block.proposal.tokens)
        if row.lookup is not None:
            row.lookup.acceptance.observe(block.match_length, n, accepted)
        if not row.deterministic:
            self.acceptance.observe(block.match_length, n, accepted)

    # -- a step -------------------------------------------------------------------------------

    def plan(self, rows: Sequence[Row], ks: list[int]) -> dict[str, LookupBlock]:
        """Lookup blocks for this step by sequence, given each row's model k (0: a plain step);
        the rows that take one get k = 0 in `ks`."""
        found: list[tuple[int, Match, float]] = []  # (row index, match, acceptance rate)
        out: dict[str, LookupBlock] = {}
        for i, row in enumerate(rows):
            if row.lookup is None:  # OFF, or a drafter that does not look up (admit)
                continue
            longest = row.rounds.block_size(self.lookup.max_tokens)
            if longest < 1:
                continue
            match = row.lookup.match(longest, None if row.deterministic else self.recent)
            if match is None:
                continue
            rate = row.lookup.acceptance.rate(match.length)
            if row.deterministic:
                block = self._alone(row, ks[i], match, rate)
                if block is not None:
                    out[row.seq_id] = block
                    ks[i] = 0
                continue
            found.append((i, match, rate))
        if not found:
            return out
        # What each row's model block (or plain step) is expected to commit.
        model_tokens = [
            r.policy.acceptance.expected_tokens(k) for r, k in zip(rows, ks, strict=True)
        ]
        n = len(rows)
        width = 1 + max(ks, default=0)
        tokens = sum(model_tokens)
        # One width for the whole pass (rows are padded to the widest): at each width every row
        # with a match takes its longest block that fits, where that beats its model block.
        best_value = self.config.keep_gain * tokens / self._pass_cost(n, width)
        best: dict[int, int] = {}  # row index -> block length
        longest = max(len(match.continuation) for _, match, _ in found)
        for w in range(width, longest + 2):
            total, picks = tokens, {}
            for i, match, rate in found:
                length = min(len(match.continuation), w - 1)
                if not length:
                    continue
                gain = expected_tokens(rate, length, match.support) - model_tokens[i]
                if gain > 0:
                    total += gain
                    picks[i] = length
            value = total / self._pass_cost(n, w)
            if picks and value > best_value:
                best_value, best = value, picks
        matches = {i: match for i, match, _ in found}
        for i, length in best.items():
            ks[i] = 0
            out[rows[i].seq_id] = _block(rows[i], matches[i], length)
        return out

    def _alone(self, row: Row, k: int, match: Match, rate: float) -> LookupBlock | None:
        """A seeded row: priced by the cost priors for its own width, against its model plan."""
        cfg = self.config
        length, value = best_length(rate, len(match.continuation), _prior_cost(cfg), match.support)
        if length == 0:
            return None
        model = row.policy.acceptance.expected_tokens(k) / (
            1.0 + k * (cfg.verify_cost_per_token_prior + cfg.draft_cost_prior)
        )
        if value <= max(1.0, model) * cfg.keep_gain:
            return None
        return _block(row, match, length)

    def _pass_cost(self, rows: int, width: int) -> float:
        """A target pass over `rows` rows of `width` positions: measured seconds, or the prior
        (in units of a one-row plain step) while nothing is measured."""
        t = self.costs.target.predict(rows * width)
        if t is not None and t > 0:
            return t
        return _prior_cost(self.config)(rows * width)  # the fit's own prior shape


def _prior_cost(cfg: PolicyConfig):
    return lambda width: 1.0 + (width - 1) * cfg.verify_cost_per_token_prior


def _block(row: Row, match: Match, length: int) -> LookupBlock:
    tokens = match.continuation[:length]
    proposal = Proposal(row.rounds.committed_len, tokens, None, drafter=LOOKUP)
    return LookupBlock(proposal, match.length)
