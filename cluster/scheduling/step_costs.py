"""What one scheduler's steps cost, as measured: the fits the batch policy prices steps by, and the
rates whole steps realised, its check. Pure: no I/O, no clock.

A step drafts (k sequential draft passes over the rows that speculate) and then runs one target
pass over every row, padded to the widest row (k + 1 positions). Its wall time is modelled from
measurements of this scheduler's steps, not of single sequences:

    target(x) = a + b * x        x = rows * (max k + 1), the positions of the padded pass
    draft(B, k) = k * (c + d * B)  B = rows that draft

each line fitted by least squares with exponential forgetting over the steps seen (so it follows
a changing load).
"""

from __future__ import annotations

from cluster.scheduling.policy import PolicyConfig


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
