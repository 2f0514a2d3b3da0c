"""One row's own policy: its acceptance, its draft's availability, and k for a row that decides
alone. Pure: no I/O, no clock.

Every row keeps its per-position acceptance (what the batch policy prices the row's rounds by),
starting from its deployment's (`deployment_acceptance`, shared by the rows of one scheduler, so a
new request starts from what earlier ones saw) and then following its own text. A row whose draft
is gone takes plain steps, and a re-prefill of its draft is tried every probe interval.

Most rows take the k their batch chooses (batch_policy). A row decides alone when its choices must
depend on nothing but its own tokens: seeded sampling, so that a seeded request repeats exactly
whatever shares its batch (OFF rows and rows without a draft decide alone too: k = 0). Such a row
prices a round of cap k by the configured cost priors, in units of one plain step,

    cost(k) = 1 + L(k) * verify_cost_per_token_prior + L(k) * draft_cost_prior

with L(k) the tokens a block of cap k drafts on average, picks the k with the most committed tokens
per unit, and in AUTO mode falls back to plain steps while that does not beat plain (one token per
unit), with the hysteresis and probes of `switching`. A seeded row neither learns from nor teaches
its deployment's acceptance.
"""

from __future__ import annotations

from dataclasses import replace

from cluster.scheduling.acceptance import AcceptanceModel
from cluster.scheduling.policy import PolicyConfig, SpecMode
from cluster.scheduling.switching import SpecSwitch

PLAIN_RATE = 1.0  # a plain step commits one token per unit of cost (one plain step)


def deployment_acceptance(config: PolicyConfig) -> AcceptanceModel:
    """The acceptance of a deployment's draft, the prior of every new row. It moves five times
    slower than a row's own: one odd request must not set every next request's start."""
    prior = [config.prior_acceptance] + [None] * (config.max_draft_tokens - 1)
    return AcceptanceModel(prior, config.prior_strength, 5 * config.acceptance_window)


class RowPolicy:
    """Before every target pass of one row: what it has learnt, and its k where it decides alone."""

    def __init__(
        self,
        config: PolicyConfig,
        mode: SpecMode = SpecMode.AUTO,
        deterministic: bool = False,
        deployment: AcceptanceModel | None = None,
    ) -> None:
        """deployment: the acceptance this row starts from and teaches (None, and for a
        `deterministic` row always: it starts from the configured prior and learns alone)."""
        self.config = config
        self.mode = mode
        self.deployment = None if deterministic else deployment
        n = config.max_draft_tokens
        if self.deployment is None:
            prior: list[float | None] = [config.prior_acceptance] + [None] * (n - 1)
            continuation = None
        else:
            prior = self.deployment.known_rates()[:n]
            prior += [None] * (n - len(prior))
            continuation = self.deployment.continuation()
        self.acceptance = AcceptanceModel(
            prior, config.prior_strength, config.acceptance_window, continuation=continuation
        )
        self.draft_available = True
        self.switch = SpecSwitch(config, speculating=mode is not SpecMode.OFF)

    @classmethod
    def for_request(
        cls,
        base: PolicyConfig,
        mode: SpecMode,
        k: int | None,
        deterministic: bool = False,
        deployment: AcceptanceModel | None = None,
    ) -> RowPolicy:
        """The policy of one request: `k` fixes the block size (None = adaptive)."""
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ValueError(f"k (num_draft_tokens) must be >= 1, got {k!r}")
        if k is not None and k > base.max_draft_tokens:
            raise ValueError(f"k (num_draft_tokens) must be <= {base.max_draft_tokens}, got {k}")
        return cls(replace(base, num_draft_tokens=k or 0), mode, deterministic, deployment)

    # -- k, for a row that decides alone -------------------------------------------------------

    def next_k(self) -> int:
        """k for the next target pass; 0 means a plain step."""
        if self.mode is SpecMode.OFF or not self.draft_available:
            return 0
        auto, switch = self.mode is SpecMode.AUTO, self.switch
        if auto and not switch.speculating and not switch.probe_due():
            return 0
        k, rate = self._best_k()
        if auto and switch.speculating and not switch.pays(rate, PLAIN_RATE):
            switch.to_plain()
            return 0
        return self.config.num_draft_tokens or max(1, k)

    def _best_k(self) -> tuple[int, float]:
        """(k, committed tokens per unit of cost) of the best block size under the priors."""
        cfg = self.config
        ks = [cfg.num_draft_tokens] if cfg.num_draft_tokens else range(1, cfg.max_draft_tokens + 1)
        best = (0, 0.0)
        for k in ks:
            rate = self.acceptance.expected_tokens(k) / self._round_cost(k)
            if rate > best[1]:
                best = (k, rate)
        return best

    def _round_cost(self, k: int) -> float:
        length = self.acceptance.expected_length(k)  # k, unless blocks end early
        cfg = self.config
        return (1.0 + length * cfg.verify_cost_per_token_prior) + length * cfg.draft_cost_prior

    # -- observations -------------------------------------------------------------------------

    def observe_round(self, k: int, accepted: int, unsure_last: bool | None = None) -> None:
        """A round of k committed `accepted` draft tokens. `unsure_last`: whether the draft was
        unsure of the block's last token (its confidence stop ends blocks there); None: not
        known."""
        self.acceptance.observe(k, accepted)
        if unsure_last is not None:
            self.acceptance.observe_stop(k, unsure_last, accepted)
            if self.deployment is not None:
                self.deployment.observe_stop(k, unsure_last, accepted)
        if self.deployment is not None:
            self.deployment.observe(k, accepted)
        if self.mode is SpecMode.AUTO and not self.switch.speculating:  # a probe's round
            if self.switch.pays(self._best_k()[1], PLAIN_RATE):
                self.switch.to_spec()
            else:
                self.switch.back_off()

    def observe_plain(self) -> None:
        self.acceptance.age(1)
        self.switch.plain_steps += 1

    # -- the draft ----------------------------------------------------------------------------

    def draft_failed(self) -> None:
        """The draft is gone or too slow: plain decoding at once; a re-prefill is tried later."""
        if self.draft_available:
            self.switch.switches += 1
        self.draft_available = False
        self.switch.plain_steps = 0

    def draft_retry_due(self) -> bool:
        """While the draft is unavailable: time to try re-prefilling one (every probe interval)."""
        return (
            not self.draft_available
            and self.mode is not SpecMode.OFF
            and self.switch.plain_steps >= self.config.probe_interval
        )

    def draft_restored(self) -> None:
        self.draft_available = True
        self.switch.plain_steps = 0
