"""k per row for one batched step, priced by measured step times. Pure: no I/O, no clock.

A step of the scheduler drafts (k sequential draft passes over the rows that speculate) and then
runs one target pass over every row, padded to the widest row (k + 1 positions). Its wall time is
modelled from measurements of this deployment's steps, not of single sequences:

    target(x) = a + b * x        x = rows * (max k + 1), the positions of the padded pass
    draft(B, k) = k * (c + d * B)  B = rows that draft

each line fitted by least squares with exponential forgetting over the steps seen (so it follows
a changing load). A step of uniform k commits sum_r E_r(k) tokens, E_r from each row's own
per-position acceptance; the policy picks the k with the most committed tokens per second for the
whole batch. At low load a verify of k + 1 positions costs barely more than a plain step and
speculation wins; when the batch is large the target is compute-bound, k + 1 positions cost about
k + 1 times one, and k = 0 (plain steps for every row) wins: speculation never costs throughput.

Hysteresis as in the per-sequence policy: back from plain only when speculation beats it by
`min_gain`, with probes (one speculative step now and then, backing off while they fail) so that
acceptance and draft costs are measured again after a plain stretch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.scheduling.policy import PolicyConfig, SpecMode

if TYPE_CHECKING:
    from cluster.scheduling.rows import Row


class LineFit:
    """y = a + b x by weighted least squares; each new point weighs 1, older ones fade by `keep`.

    With too little spread in x to tell slope from offset, the slope comes from the prior ratio
    (the cost of one more position relative to a one-position pass)."""

    __slots__ = ("keep", "prior_ratio", "s0", "s1", "s2", "sy", "sxy")

    def __init__(self, keep: float = 0.95, prior_ratio: float = 0.1) -> None:
        self.keep = keep
        self.prior_ratio = prior_ratio
        self.s0 = self.s1 = self.s2 = self.sy = self.sxy = 0.0

    def add(self, x: float, y: float) -> None:
        k = self.keep
        self.s0 = self.s0 * k + 1.0
        self.s1 = self.s1 * k + x
        self.s2 = self.s2 * k + x * x
        self.sy = self.sy * k + y
        self.sxy = self.sxy * k + x * y

    @property
    def known(self) -> bool:
        return self.s0 > 0

    def coefficients(self) -> tuple[float, float] | None:
        if not self.known:
            return None
        mx, my = self.s1 / self.s0, self.sy / self.s0
        var = self.s2 / self.s0 - mx * mx
        if var > 0.25 * max(1.0, mx) ** 2 * 0.01:  # enough spread in x (relative)
            b = (self.sxy / self.s0 - mx * my) / var
            a = my - b * mx
            if b >= 0 and a >= 0:
                return a, b
            if b < 0:  # noise: a flat line through the mean
                return my, 0.0
            return 0.0, my / mx if mx > 0 else 0.0  # through the origin
        # One x seen (or nearly): y(x) = a (1 + r (x - 1)) through the mean point.
        r = self.prior_ratio
        a = my / (1.0 + r * max(0.0, mx - 1.0))
        return max(0.0, a * (1.0 - r)), a * r

    def predict(self, x: float) -> float | None:
        ab = self.coefficients()
        return None if ab is None else ab[0] + ab[1] * x


class StepCosts:
    """Measured step times of one target replica and its drafts (owned by one scheduler)."""

    def __init__(self, config: PolicyConfig, keep: float = 0.95) -> None:
        ratio = config.verify_cost_per_token_prior
        self.target = LineFit(keep, ratio)  # seconds of a target pass vs padded positions
        self.draft = LineFit(keep, 0.5)  # seconds of one draft pass vs rows drafting
        self.steps = 0
        self.last_plain_step = -(10**9)  # step index of the latest all-plain step

    def observe_target(self, rows: int, width: int, seconds: float) -> None:
        self.target.add(rows * width, seconds)

    def observe_draft(self, rows: int, k: int, seconds: float) -> None:
        if k > 0 and rows > 0:
            self.draft.add(rows, seconds / k)

    def step_seconds(self, rows: int, width: int, draft_rows: int, k: int) -> float | None:
        t = self.target.predict(rows * width)
        if t is None:
            return None
        if k == 0 or draft_rows == 0:
            return t
        d = self.draft.predict(draft_rows)
        if d is None:
            return None
        return t + k * d


class RealizedRates:
    """Committed tokens per second of whole steps as they ran (draft, verify, commit), per mode
    and batch size (rows in powers of two): the check on the step model, whose predictions miss
    the cost of things it does not model (per-row work, masks, the draft's lag, core sharing).
    Speculation is vetoed at a batch size where its measured steps do worse than plain ones;
    a veto lapses when its spec figure is `stale_after` steps old, so the model gets to try
    again once the traffic may have changed.

    A rate is a ratio of decayed sums (tokens over seconds), not a mean of per-step rates: those
    weigh a step that committed one token (a rejected block, a request's capped last block) as
    much as one that committed nine, and a mean of them undercounted speculation by ~25% on
    SmolLM2 (13.7 tok/s where its steps ran at 18.2)."""

    def __init__(self, weight: float = 0.1, min_samples: int = 3, stale_after: int = 500):
        self.keep = 1.0 - weight
        self.min_samples = min_samples
        self.stale_after = stale_after
        self.steps = 0
        self._tokens: dict[tuple[int, bool], float] = {}
        self._seconds: dict[tuple[int, bool], float] = {}
        self._count: dict[tuple[int, bool], int] = {}
        self._seen: dict[tuple[int, bool], int] = {}

    @staticmethod
    def bucket(rows: int) -> int:
        return max(1, rows).bit_length()

    def observe(self, rows: int, speculative: bool, tokens: int, seconds: float) -> None:
        self.steps += 1
        if seconds <= 0:
            return
        key = (self.bucket(rows), speculative)
        self._tokens[key] = self._tokens.get(key, 0.0) * self.keep + tokens
        self._seconds[key] = self._seconds.get(key, 0.0) * self.keep + seconds
        self._count[key] = self._count.get(key, 0) + 1
        self._seen[key] = self.steps

    def rate(self, rows: int, speculative: bool) -> float | None:
        key = (self.bucket(rows), speculative)
        if key not in self._seconds:
            return None
        return self._tokens[key] / self._seconds[key]

    def veto(self, rows: int) -> bool:
        b = self.bucket(rows)
        spec, plain = (b, True), (b, False)
        if min(self._count.get(spec, 0), self._count.get(plain, 0)) < self.min_samples:
            return False
        if self.steps - self._seen[spec] > self.stale_after:
            return False
        return self.rate(rows, True) < self.rate(rows, False)


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
        self.speculating = True
        self._plain_since_probe = 0
        self._probe_interval = config.probe_interval
        self._interval_before_probe = config.probe_interval
        self.probing = False
        self.switches = 0
        self.realized = RealizedRates()

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
        if self.speculating:
            if rates[best] < cfg.keep_gain * plain or vetoed:
                self.speculating = False
                self.switches += 1
                self._plain_since_probe = 0
                return 0
            return best
        if rates[best] >= cfg.min_gain * plain and not vetoed:
            self.speculating = True
            self.switches += 1
            self._probe_interval = cfg.probe_interval
            return best
        self._plain_since_probe += 1
        if self._plain_since_probe >= self._probe_interval:
            # A probe: acceptance and draft costs are stale after a plain stretch.
            self._plain_since_probe = 0
            self._interval_before_probe = self._probe_interval
            self._probe_interval = min(self._probe_interval * 2, cfg.max_probe_interval)
            ceiling = max(self._rate(rows, k, perfect=True) or 0.0 for k in range(1, best + 1))
            if ceiling < cfg.min_gain * plain:
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
        cfg = self.config
        gain = cfg.keep_gain if self.speculating else cfg.min_gain
        return best >= rates[0] * gain and not self.realized.veto(len(rows))

    def _rates(self, rows: Sequence[RowChoice]) -> dict[int, float] | None:
        rates = {k: self._rate(rows, k) for k in range(0, self.config.max_draft_tokens + 1)}
        if any(v is None for v in rates.values()):
            return None
        return rates  # type: ignore[return-value]

    def retry_probe(self) -> None:
        """The probe chosen could not run (no row had its draft yet): probe at the next step,
        and do not count it as a failed probe."""
        self.probing = False
        self._probe_interval = self._interval_before_probe
        self._plain_since_probe = self._probe_interval

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
        if row.deterministic or not pol.draft_available or row.mode is SpecMode.OFF:
            # Decided by the row alone: a seeded row's choices must not depend on its
            # neighbours (it repeats exactly, whatever shares its batch).
            own = pol.next_k() if decide_own else 0
            choices.append(RowChoice(cap, "own", expected, own_k=own, reach=reach))
            continue
        kind = "on" if row.mode is SpecMode.ON else "auto"
        choices.append(RowChoice(cap, kind, expected, pin=row.request.k, reach=reach))
    return choices
