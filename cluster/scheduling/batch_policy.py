"""k per row for one batched step, priced by measured step times. Pure: no I/O, no clock.

A step of uniform k commits sum_r E_r(k) tokens, E_r from each row's own per-position acceptance
(row_policy); its seconds come from the step-cost fits of this scheduler (step_costs). The policy
picks the k with the most committed tokens per second for the whole batch. At low load a verify of
k + 1 positions costs barely more than a plain step and speculation wins; when the batch is large
the target is compute-bound, k + 1 positions cost about k + 1 times one, and k = 0 (plain steps
for every row) wins: speculation never costs throughput. The rates whole steps realised veto
speculation where the fits overrate it.

Switching between speculation and plain steps has the hysteresis and probes of `switching`: a
probe here is one speculative step, skipped (and counted as failed) where not even a draft that
is always right could pay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.scheduling.policy import PolicyConfig, SpecMode
from cluster.scheduling.step_costs import RealizedRates, StepCosts
from cluster.scheduling.switching import SpecSwitch

if TYPE_CHECKING:
    from cluster.scheduling.rows import Row


@dataclass(frozen=True, slots=True)
class RowChoice:
    """What the batch policy needs to know of one row.

    kind "own": the row decides alone (`own_k`: OFF, no draft, seeded sampling, whose choices must
    not depend on its neighbours); "auto": the batch decides whether it speculates; "on": it
    always speculates. `pin` fixes its k when it speculates (None: the batch's k)."""

    cap: int  # the largest block this row may take now (rounds.block_size): 0 = plain only
    kind: str  # "own", "auto" or "on"
    expected: Sequence[float]  # expected[k] = committed tokens of a round of k (expected[0] = 1)
    own_k: int = 0
    pin: int | None = None
    # reach[j] = the chance that a block drafts token j+1 (a draft with a confidence stop ends
    # blocks early); empty: every block is as long as asked.
    reach: Sequence[float] = ()


class BatchPolicy:
    """Chooses one k for the rows the batch decides (0 = a plain step for the "auto" ones)."""

    def __init__(self, config: PolicyConfig, costs: StepCosts) -> None:
        self.config = config
        self.costs = costs
        self.switch = SpecSwitch(config)
        self._interval_before_probe = config.probe_interval  # restored if a probe cannot run
        self.probing = False
        self.realized = RealizedRates()

    @property
    def speculating(self) -> bool:
        """Whether the batch is in speculative mode (probes aside)."""
        return self.switch.speculating

    def choose(self, rows: Sequence[RowChoice]) -> list[int]:
        """k per row for the next step."""
        if not any(r.kind != "own" and r.cap > 0 for r in rows):
            return [self._own(r, 0) for r in rows]
        k = self._batch_k(rows)
        return [self._own(r, k) for r in rows]

    @staticmethod
    def _own(r: RowChoice, k: int) -> int:
        if r.kind == "own":
            return min(r.own_k, r.cap)
        on = r.kind == "on"
        if r.pin is not None and (k > 0 or on):
            k = r.pin
        if on:
            k = max(k, 1)
        return min(k, r.cap)

    def _batch_k(self, rows: Sequence[RowChoice]) -> int:
        cfg = self.config
        self.probing = False
        if self.costs.target.known and self.costs.steps - self.costs.last_plain_step > 64:
            # Keep the price of a plain step measured: one plain step now and then.
            return 0
        rates = self._rates(rows)
        if rates is None:
            return min(4, cfg.max_draft_tokens)  # nothing measured yet: speculate and learn
        best = max(range(1, cfg.max_draft_tokens + 1), key=lambda k: rates[k])
        plain = rates[0]
        vetoed = self.realized.veto(len(rows))
        switch = self.switch
        if switch.speculating:
            if not switch.pays(rates[best], plain) or vetoed:
                switch.to_plain()
                return 0
            return best
        if switch.pays(rates[best], plain) and not vetoed:
            switch.to_spec()
            return best
        switch.plain_steps += 1
        if switch.probe_due():
            # A probe: acceptance and draft costs are stale after a plain stretch.
            self._interval_before_probe = switch.probe_interval
            switch.back_off()
            ceiling = max(self._rate(rows, k, perfect=True) or 0.0 for k in range(1, best + 1))
            if not switch.pays(ceiling, plain):
                # Not even a draft that is always right would pay at this load (the target is
                # compute-bound): a probe would only cost a padded step. Back off as if it failed.
                return 0
            self.probing = True
            return best
        return 0

    def would_speculate(self, rows: Sequence[RowChoice]) -> bool:
        """Whether a batch of these rows would speculate now (no state changes): for admission,
        which starts the draft prefill of new rows only when their batch would use it."""
        if not any(r.kind != "own" and r.cap > 0 for r in rows):
            return False
        rates = self._rates(rows)
        if rates is None:
            return True
        best = max(rates[k] for k in range(1, self.config.max_draft_tokens + 1))
        return self.switch.pays(best, rates[0]) and not self.realized.veto(len(rows))

    def _rates(self, rows: Sequence[RowChoice]) -> dict[int, float] | None:
        rates = {k: self._rate(rows, k) for k in range(0, self.config.max_draft_tokens + 1)}
        if any(v is None for v in rates.values()):
            return None
        return rates  # type: ignore[return-value]

    def retry_probe(self) -> None:
        """The probe chosen could not run (no row had its draft yet): probe at the next step,
        and do not count it as a failed probe."""
        self.probing = False
        self.switch.probe_interval = self._interval_before_probe
        self.switch.plain_steps = self.switch.probe_interval

    def _rate(self, rows: Sequence[RowChoice], k: int, perfect: bool = False) -> float | None:
        """Expected committed tokens per second of a step where flexible rows take k (with
        `perfect`, as if every drafted token were accepted: the most speculation can give)."""
        ks = [self._own(r, k) for r in rows]
        tokens = sum(
            (kr + 1.0 if perfect else r.expected[kr]) if 0 < kr < len(r.expected) else 1.0
            for r, kr in zip(rows, ks, strict=True)
        )
        passes = max(ks) if perfect else expected_passes(rows, ks)
        drafting = sum(1 for kr in ks if kr > 0)
        seconds = self.costs.step_seconds(len(rows), passes + 1, drafting, passes)
        if seconds is None or seconds <= 0:
            return None
        return tokens / seconds


def expected_passes(rows: Sequence[RowChoice], ks: Sequence[int]) -> float:
    """Expected draft passes of a step, which is also its verify's padded width less one: the
    longest block of the step. Blocks end early independently per row (a confidence stop), so
    P(some row drafts token j+1) = 1 - prod_r (1 - reach_r[j]); without stops, max(ks)."""
    top = max(ks, default=0)
    if all(not r.reach for r, kr in zip(rows, ks, strict=True) if kr > 0):
        return float(top)
    total = 0.0
    for j in range(top):
        none = 1.0
        for r, kr in zip(rows, ks, strict=True):
            if kr > j:
                none *= 1.0 - (r.reach[j] if j < len(r.reach) else 1.0)
        total += 1.0 - none
    return total


def row_choices(
    rows: Sequence[Row], max_draft_tokens: int, decide_own: bool = True
) -> list[RowChoice]:
    """What the batch policy needs of each row. `decide_own`: ask the rows that decide alone for
    their k, which moves their own policy on (off: just looking, as admission does)."""
    choices = []
    for row in rows:
        cap = row.rounds.block_size(max_draft_tokens)
        pol = row.policy
        acc = pol.acceptance
        expected = [acc.expected_tokens(k) for k in range(max_draft_tokens + 1)]
        reach = acc.reach()
        reach = reach if reach[-1] < 1.0 else ()  # no block has ended early: all as asked
        if row.deterministic or not pol.draft_available or pol.mode is SpecMode.OFF:
            # Decided by the row alone: a seeded row's choices must not depend on its
            # neighbours (it repeats exactly, whatever shares its batch).
            own = pol.next_k() if decide_own else 0
            choices.append(RowChoice(cap, "own", expected, own_k=own, reach=reach))
            continue
        kind = "on" if row.mode is SpecMode.ON else "auto"
        choices.append(RowChoice(cap, kind, expected, pin=row.request.k, reach=reach))
    return choices
