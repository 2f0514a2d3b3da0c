"""Draft-length and fallback policy for one sequence. Pure: no I/O, no clocks of its own.

With i.i.d. acceptance at rate α, a round of k draft tokens commits on average
    E(k) = (1 - α^(k+1)) / (1 - α)
tokens for one target pass. It costs the verify pass c_v(k) plus the draft steps that did not
overlap with verification: k·c_d without pipelining; with pipelining the next block is drafted while
this one is verified, which pays off when the block is accepted whole (probability ≈ α^k), so the
exposed draft time is ≈ (1 - α^k)·k·c_d. Plain decoding makes 1 token per c_p. The policy picks the
k with the best E(k) / cost(k) and falls back to plain decoding when that does not beat 1/c_p by a
margin; in plain mode it probes one speculative round now and then (backing off while probes fail),
so a sequence goes back to speculation when it pays again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SpecMode(enum.Enum):
    AUTO = "auto"  # adaptive: speculate while it pays, plain otherwise
    ON = "on"  # always speculate (unless the draft is unavailable)
    OFF = "off"  # plain decoding on the target only


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    num_draft_tokens: int = 0  # 0 = adaptive k; otherwise a fixed k
    max_draft_tokens: int = 8
    min_gain: float = 1.05  # speculation must beat plain throughput by this factor
    probe_interval: int = 16  # plain steps before the first probe of spec mode
    max_probe_interval: int = 256
    ewma: float = 0.25  # weight of the newest observation
    prior_acceptance: float = 0.6
    # Costs relative to one plain target step, used instead of measured seconds when a request
    # must be reproducible (seeded sampling): then no decision may depend on timing.
    draft_cost_prior: float = 0.25  # one draft step
    verify_cost_per_token_prior: float = 0.1  # a verify of k costs 1 + k * this
    pipelined: bool = True

    def __post_init__(self) -> None:
        if self.max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1, got {self.max_draft_tokens}")
        if not 0 <= self.num_draft_tokens <= self.max_draft_tokens:
            raise ValueError(
                f"num_draft_tokens must be in [0, {self.max_draft_tokens}], "
                f"got {self.num_draft_tokens}"
            )
        if self.min_gain <= 0:
            raise ValueError(f"min_gain must be > 0, got {self.min_gain}")
        if not 1 <= self.probe_interval <= self.max_probe_interval:
            raise ValueError("probe_interval must be in [1, max_probe_interval]")
        if not 0 < self.ewma <= 1:
            raise ValueError(f"ewma must be in (0, 1], got {self.ewma}")
        if not 0 <= self.prior_acceptance < 1:
            raise ValueError(f"prior_acceptance must be in [0, 1), got {self.prior_acceptance}")
        if self.draft_cost_prior <= 0 or self.verify_cost_per_token_prior < 0:
            raise ValueError("draft_cost_prior must be > 0 and verify_cost_per_token_prior >= 0")


def expected_tokens(alpha: float, k: int) -> float:
    """E(k) = (1 - α^(k+1)) / (1 - α): committed tokens per round with i.i.d. acceptance α."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class _Ewma:
    __slots__ = ("value", "weight")

    def __init__(self, weight: float, value: float | None = None) -> None:
        self.weight = weight
        self.value = value

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.weight * (x - self.value)


class CostModel:
    """Measured seconds of a deployment's draft step, plain target step and verify passes.

    Costs belong to the workers, not to a sequence: the engine and the router share one model
    among the policies of all their sequences, so a new request starts from what earlier ones
    measured instead of from nothing, and one noisy round weighs less.
    """

    __slots__ = ("draft_step", "plain_step", "verify")

    def __init__(self, ewma: float) -> None:
        self.draft_step = _Ewma(ewma)  # seconds per drafted token
        self.plain_step = _Ewma(ewma)  # seconds per plain target step
        self.verify: dict[int, _Ewma] = {}  # k -> seconds per verify pass of k draft tokens

    @classmethod
    def priors(cls, config: PolicyConfig) -> CostModel:
        """Fixed costs in units of a plain step (for policies that must ignore timing)."""
        costs = cls(config.ewma)
        costs.draft_step.value = config.draft_cost_prior
        costs.plain_step.value = 1.0
        for k in range(1, config.max_draft_tokens + 1):
            cost = 1.0 + k * config.verify_cost_per_token_prior
            costs.verify[k] = _Ewma(config.ewma, cost)
        return costs


class SpeculationPolicy:
    """Before every target pass of one sequence: a spec round of k, or a plain step.

    Costs are seconds measured by the driver (whatever its transport: in-process or gRPC), so the
    decision reflects the real price of a draft step and a verify on this deployment. A
    `deterministic` policy (for seeded sampling) uses the configured cost priors instead and
    ignores timings, so its choices depend only on acceptance, which a seed fixes: a seeded
    request then repeats exactly, in AUTO mode too (draft failures aside).
    """

    def __init__(
        self,
        config: PolicyConfig,
        mode: SpecMode = SpecMode.AUTO,
        deterministic: bool = False,
        costs: CostModel | None = None,
    ) -> None:
        self.config = config
        self.deterministic = deterministic
        self.mode = mode
        self.alpha = _Ewma(config.ewma, config.prior_acceptance)
        if deterministic:
            costs = CostModel.priors(config)
        elif costs is None:
            costs = CostModel(config.ewma)
        # The same objects as `costs`: observations update the shared model.
        self.draft_step, self.plain_step, self.verify = (
            costs.draft_step,
            costs.plain_step,
            costs.verify,
        )
        self.draft_available = True
        self.speculating = mode is not SpecMode.OFF
        self._plain_since_probe = 0
        self._probe_interval = config.probe_interval
        self.switches = 0  # spec -> plain and back, for stats

    # -- decisions ----------------------------------------------------------------------------

    def next_k(self) -> int:
        """k for the next target pass; 0 means a plain step."""
        if self.mode is SpecMode.OFF or not self.draft_available:
            return 0
        if self.mode is SpecMode.ON:
            return self._fixed_or(max(1, self._best_k()[0]))
        if self.speculating:
            if self._pays():
                return self._fixed_or(max(1, self._best_k()[0]))
            return self._to_plain()
        if self._plain_since_probe >= self._probe_interval:
            self._plain_since_probe = 0
            return self._fixed_or(max(1, self._best_k()[0]))  # probe one round
        return 0

    def _fixed_or(self, k: int) -> int:
        return self.config.num_draft_tokens or k

    def _to_plain(self) -> int:
        self.speculating = False
        self.switches += 1
        self._plain_since_probe = 0
        return 0

    def _pays(self) -> bool:
        k, rate = self._best_k()
        plain = self._plain_cost()
        if k == 0 or plain is None:
            return True  # nothing measured yet: speculate and learn
        return rate >= self.config.min_gain / plain

    def _plain_cost(self) -> float | None:
        """Seconds per plain step. Spec mode takes no plain steps to measure, so until one is
        measured use the cheapest verify pass seen: a plain step is a target pass over one
        position, a verify one over k+1, so this overestimates the plain cost (errs toward
        speculating) yet lets a draft that never agrees fall back to plain decoding."""
        if self.plain_step.value is not None:
            return self.plain_step.value
        measured = [v.value for v in self.verify.values() if v.value is not None]
        return min(measured) if measured else None

    def _best_k(self) -> tuple[int, float]:
        """(k, tokens per second) of the best block size under the current estimates."""
        alpha = min(max(self.alpha.value, 0.0), 0.999)
        ks = (
            [self.config.num_draft_tokens]
            if self.config.num_draft_tokens
            else range(1, self.config.max_draft_tokens + 1)
        )
        best = (0, 0.0)
        for k in ks:
            cost = self._round_cost(k, alpha)
            if cost is None:  # not measured yet: speculate and learn, from a middling block
                return (k if self.config.num_draft_tokens else min(4, ks[-1]), float("inf"))
            rate = expected_tokens(alpha, k) / cost
            if rate > best[1]:
                best = (k, rate)
        return best

    def _round_cost(self, k: int, alpha: float) -> float | None:
        if self.draft_step.value is None:
            return None
        verify = self._verify_cost(k)
        if verify is None:
            return None
        drafting = k * self.draft_step.value
        if self.config.pipelined:
            drafting *= 1.0 - alpha**k
        return verify + drafting

    def _verify_cost(self, k: int) -> float | None:
        if k in self.verify:
            return self.verify[k].value
        if not self.verify:
            return None
        # Unmeasured k: a verify pass is affine in its positions, cost(k) = base + slope * k. Fit
        # it through the nearest measured k and a plain step (a pass over one position: k = 0);
        # without a plain step, take the slope from the configured prior. Scaling linearly in
        # k + 1 instead would price per-call overhead per token, and the policy would never try
        # a longer block than the first one it measured.
        near = min(self.verify, key=lambda m: abs(m - k))
        measured = self.verify[near].value
        plain = self.plain_step.value
        if plain is not None and not self.deterministic:
            slope = max(0.0, (measured - plain) / near)
        else:
            prior = self.config.verify_cost_per_token_prior
            slope = measured * prior / (1.0 + near * prior)
        return max(measured + slope * (k - near), 1e-9)

    # -- observations -------------------------------------------------------------------------

    def observe_round(
        self, k: int, accepted: int, draft_seconds: float, verify_seconds: float
    ) -> None:
        self.alpha.add(accepted / k)
        if not self.deterministic:
            if draft_seconds > 0:
                self.draft_step.add(draft_seconds / k)
            self.verify.setdefault(k, _Ewma(self.config.ewma)).add(verify_seconds)
        if not self.speculating and self.mode is SpecMode.AUTO:
            if self._pays():
                self.speculating = True
                self.switches += 1
                self._probe_interval = self.config.probe_interval
            else:
                self._probe_interval = min(self._probe_interval * 2, self.config.max_probe_interval)

    def observe_plain(self, seconds: float) -> None:
        if not self.deterministic:
            self.plain_step.add(seconds)
        self._plain_since_probe += 1

    def draft_failed(self) -> None:
        """The draft is gone or too slow: plain decoding at once; a re-prefill is tried later."""
        if self.draft_available:
            self.switches += 1
        self.draft_available = False
        self._plain_since_probe = 0

    def draft_retry_due(self) -> bool:
        """While the draft is unavailable: time to try re-prefilling one (every probe interval)."""
        return (
            not self.draft_available
            and self.mode is not SpecMode.OFF
            and self._plain_since_probe >= self.config.probe_interval
        )

    def draft_restored(self) -> None:
        self.draft_available = True
        self._plain_since_probe = 0
