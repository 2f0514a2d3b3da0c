"""Draft-length and fallback policy for one sequence. Pure: no I/O, no clocks of its own.

A round of k draft tokens commits on average E(k) = 1 + sum_{j<=k} prod_{i<=j} p_i tokens for one
target pass, where p_i is the chance that draft token i is accepted given that the ones before it
were. Acceptance is not i.i.d. (blocks are mostly accepted whole or rejected early), so p_i is
estimated per position: on the shipped pair the per-token rate is 0.78, whose geometric sum
predicts 3.2 tokens per round at k = 4 where 4.0 are measured.

The price of a round is its measured wall time per k (round start to the next round ready), which
includes what no component model captures: draft and target contending for cores, RTTs, the part
of a drafted-ahead block not hidden behind the verify. Unmeasured k are priced from the nearest
measured one scaled by a component model (draft step x k, an affine verify). Plain
decoding makes one token per measured plain step. The policy picks the k with the best E(k) / cost
and falls back to plain decoding when that does not beat plain (with hysteresis: it returns only
when speculation beats plain by `min_gain`); in plain mode it probes one speculative round now and
then, backing off while probes fail.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace


class SpecMode(enum.Enum):
    AUTO = "auto"  # adaptive: speculate while it pays, plain otherwise
    ON = "on"  # always speculate (unless the draft is unavailable)
    OFF = "off"  # plain decoding on the target only


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    num_draft_tokens: int = 0  # 0 = adaptive k; otherwise a fixed k
    max_draft_tokens: int = 8
    # Back from plain mode only when speculation is predicted to beat plain by `min_gain`, and
    # stay only while it beats it by `keep_gain`: the step-cost model errs by ~10% (measured on
    # the 4-stream sweep), and a mispredicted gain must not turn into a loss.
    min_gain: float = 1.15
    keep_gain: float = 1.05
    probe_interval: int = 16  # plain steps before the first probe of spec mode
    max_probe_interval: int = 256
    ewma: float = 0.25  # weight of the newest cost observation
    prior_acceptance: float = 0.6  # per drafted token, before anything is measured
    acceptance_window: float = 10.0  # rounds: older acceptance observations fade over this many
    prior_strength: float = 4.0  # a new sequence's prior (the deployment's rates) counts this much
    # Costs relative to one plain target step, used instead of measured seconds when a request
    # must be reproducible (seeded sampling): then no decision may depend on timing.
    draft_cost_prior: float = 0.25  # one draft step
    verify_cost_per_token_prior: float = 0.1  # a verify of k costs 1 + k * this
    pipelined: bool = True  # draft the next block while the target verifies this one
    # Measure rounds with and without pipelining and use the faster (pipelining pays only where
    # the draft has compute of its own); `pipelined` is then where it starts.
    adaptive_pipelining: bool = False
    explore_rounds: int = 4  # rounds in a row in the other pipelining mode when measuring it
    reexplore_after: int = 200  # rounds (deployment-wide) after which a mode's times are stale

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
        if not 0 < self.keep_gain <= self.min_gain:
            raise ValueError(
                f"keep_gain must be in (0, min_gain={self.min_gain}], got {self.keep_gain}"
            )
        if not 1 <= self.probe_interval <= self.max_probe_interval:
            raise ValueError("probe_interval must be in [1, max_probe_interval]")
        if not 0 < self.ewma <= 1:
            raise ValueError(f"ewma must be in (0, 1], got {self.ewma}")
        if not 0 <= self.prior_acceptance < 1:
            raise ValueError(f"prior_acceptance must be in [0, 1), got {self.prior_acceptance}")
        if self.acceptance_window < 1:
            raise ValueError(f"acceptance_window must be >= 1, got {self.acceptance_window}")
        if self.prior_strength <= 0:
            raise ValueError(f"prior_strength must be > 0, got {self.prior_strength}")
        if self.explore_rounds < 2 or self.reexplore_after < 1:
            raise ValueError("explore_rounds must be >= 2 and reexplore_after >= 1")
        if self.draft_cost_prior <= 0 or self.verify_cost_per_token_prior < 0:
            raise ValueError("draft_cost_prior must be > 0 and verify_cost_per_token_prior >= 0")


def with_pipelining(config: PolicyConfig, pipelined: bool | str) -> PolicyConfig:
    """`pipelined` as configured (True, False or "auto") applied to a policy config."""
    if pipelined not in (True, False, "auto"):
        raise ValueError(f'pipelined must be true, false or "auto", got {pipelined!r}')
    return replace(
        config, pipelined=pipelined is not False, adaptive_pipelining=pipelined == "auto"
    )


def expected_tokens(alpha: float, k: int) -> float:
    """E(k) = (1 - α^(k+1)) / (1 - α): committed tokens per round with i.i.d. acceptance α."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class GoOnRates:
    """c[i] = P(the draft goes on after drafting token i+1), from decayed counts with a prior of
    `strength` pseudo-observations (as AcceptanceModel's rates); prior 1: it always goes on."""

    __slots__ = ("hits", "seen", "weight", "prior", "keep", "strength", "_reach")

    def __init__(self, prior: Sequence[float], n: int, strength: float, keep: float) -> None:
        self.prior = (list(prior) + [1.0] * n)[:n]
        self.keep = keep
        self.strength = strength
        self.weight = [strength] * n
        self.seen = [0.0] * n
        self.hits = [0.0] * n
        self._reach: list[float] | None = None

    def observe(self, i: int, went_on: bool) -> None:
        self._reach = None
        self.weight[i] *= self.keep
        self.seen[i] = self.seen[i] * self.keep + 1.0
        self.hits[i] = self.hits[i] * self.keep + (1.0 if went_on else 0.0)

    def fade(self, fade: float) -> None:
        self._reach = None
        _fade(self.hits, self.seen, self.weight, fade, self.strength)

    def rates(self) -> list[float]:
        return [
            (h + w * p) / (n + w)
            for h, n, w, p in zip(self.hits, self.seen, self.weight, self.prior, strict=True)
        ]

    def reach(self) -> list[float]:
        """reach[j] = prod c[0..j-1]: the chance of getting to token j+1 (reach[0] = 1)."""
        if self._reach is None:
            out, r = [], 1.0
            for c in self.rates():
                out.append(r)
                r *= c
            self._reach = out
        return self._reach


def _fade(hits: list, seen: list, weight: list, fade: float, strength: float) -> None:
    """Older evidence weighs less, down to `strength` observations per position."""
    for i in range(len(seen)):
        total = seen[i] + weight[i]
        if total <= strength:
            continue
        f = max(fade, strength / total)
        hits[i] *= f
        seen[i] *= f
        weight[i] *= f


class AcceptanceModel:
    """Per-position acceptance: p[i] = P(draft token i+1 accepted | the i before it were).

    Estimated from decayed counts: a round that accepted a of k tokens tried positions
    1..min(a+1, k) and accepted 1..a. Each position's counts fade by 1/window per observation so
    the estimate follows a changing text. A prior enters as `strength` pseudo-observations that
    fade with the real ones, so a single rejected block moves the estimate a little, not to zero.
    A position's prior is given (a sequence starts from its deployment's rates) or, where it is
    None, the estimate of the position before it: a position no round has reached yet is assumed
    as good as the last one measured, so longer blocks get tried when they would pay.

    Blocks may also end before k: a draft with a confidence stop ends a block after a token it
    was unsure of, so k is a cap. How far blocks get is learnt twice (`observe_stop`): over all
    blocks (`go_on`: how many tokens are drafted, what a round costs) and over the blocks whose
    tokens so far were all accepted (`go_on_ok`: what a round commits). The draft is sure of
    the tokens the target accepts more often than of the others, so the product of the two
    unconditional rates would undercount: a round of cap k commits
    1 + sum_j prod_{i<=j} p[i] * prod_{i<j} c_ok[i] tokens.
    """

    __slots__ = (
        "accepted",
        "tried",
        "prior_weight",
        "prior",
        "keep",
        "strength",
        "_rates",
        "go_on",
        "go_on_ok",
    )

    def __init__(
        self,
        prior: Sequence[float | None],
        strength: float,
        window: float,
        continuation: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        """continuation: the priors of (go_on, go_on_ok), e.g. a deployment's `continuation()`."""
        if not prior or prior[0] is None:
            raise ValueError("the first position needs a prior")
        self.keep = 1.0 - 1.0 / window
        self.strength = strength
        self.prior = list(prior)
        self.prior_weight = [strength] * len(prior)
        self.tried = [0.0] * len(prior)
        self.accepted = [0.0] * len(prior)
        self._rates: list[float] | None = None  # the policy reads them ~20 times a decision
        n = len(prior)
        go_on, go_on_ok = continuation or ((), ())
        self.go_on = GoOnRates(go_on, n, strength, self.keep)
        self.go_on_ok = GoOnRates(go_on_ok, n, strength, self.keep)

    def observe(self, k: int, accepted: int) -> None:
        self._rates = None
        for i in range(min(k, accepted + 1, len(self.tried))):
            self.prior_weight[i] *= self.keep
            self.tried[i] = self.tried[i] * self.keep + 1.0
            self.accepted[i] = self.accepted[i] * self.keep + (1.0 if i < accepted else 0.0)

    def age(self, passes: int) -> None:
        """Target passes that told nothing about acceptance (plain steps): older evidence weighs
        less against the next round (rates stay), down to `strength` observations per position,
        so a probe after a long plain stretch counts, without one probe deciding alone."""
        self._rates = None
        fade = self.keep**passes
        _fade(self.accepted, self.tried, self.prior_weight, fade, self.strength)
        self.go_on.fade(fade)
        self.go_on_ok.fade(fade)

    def observe_stop(self, drafted: int, unsure_last: bool, accepted: int) -> None:
        """A block of `drafted` tokens, `accepted` of them: the draft went on after tokens
        1..drafted-1, and after the last one it would have gone on unless it was unsure of it
        (the draft says so even when the block ended at k, so this is learnt at every k)."""
        for i in range(min(drafted, len(self.tried))):
            went = i < drafted - 1 or not unsure_last
            self.go_on.observe(i, went)
            if i < accepted:  # tokens 1..i+1 were all accepted
                self.go_on_ok.observe(i, went)

    def continuation(self) -> tuple[list[float], list[float]]:
        """(c, c_ok): the chance that the draft goes on after token i+1, over all blocks and
        over those accepted so far."""
        return self.go_on.rates(), self.go_on_ok.rates()

    def reach(self) -> list[float]:
        """reach[j]: the chance that a block drafts token j+1 (reach[0] = 1)."""
        return self.go_on.reach()

    def expected_length(self, k: int) -> float:
        """Draft tokens a block of cap k drafts on average (k without a confidence stop)."""
        return sum(self.reach()[:k])

    def rates(self) -> list[float]:
        if self._rates is not None:
            return self._rates
        out: list[float] = []
        for i, (a, t, w) in enumerate(
            zip(self.accepted, self.tried, self.prior_weight, strict=True)
        ):
            prior = self.prior[i]
            if prior is None:
                prior = out[-1]
            out.append((a + w * prior) / (t + w))
        self._rates = out
        return out

    def expected_tokens(self, k: int) -> float:
        """Committed tokens per round of cap k: accepted ones plus the recovered or bonus one."""
        total, whole = 1.0, 1.0
        for p, reach in zip(self.rates()[:k], self.go_on_ok.reach(), strict=False):
            whole *= p
            total += whole * reach
        return total

    def whole_block(self, k: int) -> float:
        """Probability that all k tokens are accepted."""
        whole = 1.0
        for p in self.rates()[:k]:
            whole *= p
        return whole

    def known_rates(self, min_observations: float = 1.0) -> list[float | None]:
        """Rates of the positions with evidence, None elsewhere (a prior that chains there)."""
        rates = self.rates()
        return [
            r if i == 0 or t >= min_observations else None
            for i, (r, t) in enumerate(zip(rates, self.tried, strict=True))
        ]


class _Ewma:
    __slots__ = ("value", "weight")

    def __init__(self, weight: float, value: float | None = None) -> None:
        self.weight = weight
        self.value = value

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.weight * (x - self.value)


class DeploymentEstimates:
    """What a deployment's workers have shown: seconds of a draft step, a plain target step, a
    verify pass and a whole round of each k, and the acceptance of its draft.

    These belong to the workers, not to a sequence: the engine and the router share one instance
    among the policies of all their sequences, so a new request starts from what earlier ones
    measured instead of from nothing, and one noisy round weighs less. A sequence's own
    acceptance starts from the deployment's and then follows its own text.
    """

    __slots__ = (
        "draft_step",
        "plain_step",
        "verify",
        "round",
        "acceptance",
        "timed_rounds",
        "last_timed",
    )

    def __init__(self, config: PolicyConfig) -> None:
        ewma = config.ewma
        self.draft_step = _Ewma(ewma)  # seconds per drafted token
        self.plain_step = _Ewma(ewma)  # seconds per plain target step
        self.verify: dict[int, _Ewma] = {}  # k -> seconds per verify pass of k draft tokens
        # (k, pipelined) -> wall seconds of a round, from its start to the next round ready
        self.round: dict[tuple[int, bool], _Ewma] = {}
        self.timed_rounds = 0  # rounds timed so far, all sequences
        self.last_timed: dict[bool, int] = {}  # pipelined? -> timed_rounds at its latest round
        prior = [config.prior_acceptance] + [None] * (config.max_draft_tokens - 1)
        # Slower to move than a sequence's own model: it is the prior of every new sequence.
        self.acceptance = AcceptanceModel(
            prior, config.prior_strength, 5 * config.acceptance_window
        )

    @classmethod
    def priors(cls, config: PolicyConfig) -> DeploymentEstimates:
        """Fixed costs in units of a plain step (for policies that must ignore timing)."""
        est = cls(config)
        est.draft_step.value = config.draft_cost_prior
        est.plain_step.value = 1.0
        for k in range(1, config.max_draft_tokens + 1):
            cost = 1.0 + k * config.verify_cost_per_token_prior
            est.verify[k] = _Ewma(config.ewma, cost)
        return est


class SpeculationPolicy:
    """Before every target pass of one sequence: a spec round of k, or a plain step.

    Costs are seconds measured by the driver (whatever its transport: in-process or gRPC), so the
    decision reflects the real price of a round on this deployment. A `deterministic` policy (for
    seeded sampling) uses the configured cost priors and acceptance prior instead and ignores
    timings and other sequences, so its choices depend only on this sequence's acceptance, which
    a seed fixes: a seeded request then repeats exactly, in AUTO mode too (draft failures aside).
    """

    def __init__(
        self,
        config: PolicyConfig,
        mode: SpecMode = SpecMode.AUTO,
        deterministic: bool = False,
        shared: DeploymentEstimates | None = None,
    ) -> None:
        self.config = config
        self.deterministic = deterministic
        self.mode = mode
        if deterministic:
            shared = DeploymentEstimates.priors(config)
        elif shared is None:
            shared = DeploymentEstimates(config)
        self.shared = shared
        prior = shared.acceptance.known_rates()[: config.max_draft_tokens]
        prior += [None] * (config.max_draft_tokens - len(prior))
        self.acceptance = AcceptanceModel(
            prior,
            config.prior_strength,
            config.acceptance_window,
            continuation=shared.acceptance.continuation(),
        )
        self.draft_available = True
        self.speculating = mode is not SpecMode.OFF
        self.pipelined = config.pipelined  # how the next spec round runs
        self._last_pipelined: bool | None = None  # how the previous spec round ran
        self._explore_left = 0
        self._plain_since_probe = 0
        self._probe_interval = config.probe_interval
        self.switches = 0  # spec -> plain and back, for stats

    # -- decisions ----------------------------------------------------------------------------

    def next_k(self) -> int:
        """k for the next target pass; 0 means a plain step."""
        if self.mode is SpecMode.OFF or not self.draft_available:
            return 0
        if self.mode is SpecMode.AUTO and not self.speculating:
            if self._plain_since_probe < self._probe_interval:
                return 0
            self._plain_since_probe = 0  # probe one round
        self._choose_pipelining()
        best = self._best_k()
        keep = self.config.keep_gain
        if self.mode is SpecMode.AUTO and self.speculating and not self._pays(keep, best):
            return self._to_plain()
        return self._fixed_or(max(1, best[0]))

    def _choose_pipelining(self) -> None:
        """Adaptive pipelining: run the faster mode by measured round times; now and then run
        a few rounds of the other one, when the deployment has no fresh times for it."""
        if not self.config.adaptive_pipelining or self.deterministic:
            return
        if self._explore_left > 0:
            self._explore_left -= 1
            return
        shared = self.shared
        other = not self.pipelined
        seen = shared.last_timed.get(other)
        if self.pipelined in shared.last_timed and (
            seen is None or shared.timed_rounds - seen > self.config.reexplore_after
        ):
            self.pipelined = other  # measure it: the first round of a run is not timed
            self._explore_left = self.config.explore_rounds - 1
            shared.last_timed[other] = shared.timed_rounds  # one sequence explores, not all
            return
        timed_other = any(pipe == other for _, pipe in shared.round)
        if timed_other and self._best_k(other)[1] > self._best_k(self.pipelined)[1]:
            self.pipelined = other

    def _fixed_or(self, k: int) -> int:
        return self.config.num_draft_tokens or k

    def _to_plain(self) -> int:
        self.speculating = False
        self.switches += 1
        self._plain_since_probe = 0
        return 0

    def gain(self, best: tuple[int, float] | None = None) -> float | None:
        """Expected speculative throughput over plain throughput, at the best k (None: unknown)."""
        k, rate = self._best_k() if best is None else best
        plain = self._plain_cost()
        if k == 0 or plain is None or rate == float("inf"):
            return None
        return rate * plain

    def _pays(self, threshold: float, best: tuple[int, float] | None = None) -> bool:
        gain = self.gain(best)
        return gain is None or gain >= threshold  # nothing measured yet: speculate and learn

    def _plain_cost(self) -> float | None:
        """Seconds per plain step. Spec mode takes no plain steps to measure, so until one is
        measured use the cheapest verify pass seen: a plain step is a target pass over one
        position, a verify one over k+1, so this overestimates the plain cost (errs toward
        speculating) yet lets a draft that never agrees fall back to plain decoding."""
        if self.shared.plain_step.value is not None:
            return self.shared.plain_step.value
        measured = [v.value for v in self.shared.verify.values() if v.value is not None]
        return min(measured) if measured else None

    def _candidates(self) -> Sequence[int]:
        if self.config.num_draft_tokens:
            return [self.config.num_draft_tokens]
        return range(1, self.config.max_draft_tokens + 1)

    def _best_k(self, pipelined: bool | None = None) -> tuple[int, float]:
        """(k, tokens per second) of the best block size under the current estimates, for the
        pipelining mode of the next round (or the one given)."""
        pipelined = self.pipelined if pipelined is None else pipelined
        ks = self._candidates()
        measured = self._measured_rounds(pipelined)
        best = (0, 0.0)
        for k in ks:
            cost = self._round_cost(k, pipelined, measured)
            if cost is None:  # nothing measured yet: speculate and learn, from a middling block
                return (k if self.config.num_draft_tokens else min(4, ks[-1]), float("inf"))
            rate = self.acceptance.expected_tokens(k) / cost
            if rate > best[1]:
                best = (k, rate)
        return best

    def _measured_rounds(self, pipelined: bool) -> dict[int, float]:
        """k -> measured seconds of a round of k run this way (none for a timing-free policy)."""
        if self.deterministic:
            return {}
        return {
            k: e.value
            for (k, pipe), e in self.shared.round.items()
            if pipe == pipelined and e.value is not None
        }

    def _round_cost(
        self, k: int, pipelined: bool | None = None, measured: dict[int, float] | None = None
    ) -> float | None:
        """Seconds of a round of k: measured if this k ran; else the nearest measured k scaled by
        the component model's ratio; else the component model alone."""
        pipelined = self.pipelined if pipelined is None else pipelined
        if measured is None:
            measured = self._measured_rounds(pipelined)
        if k in measured:
            return measured[k]
        model = self._model_cost(k, pipelined)
        if not measured or model is None:
            return model
        near = min(measured, key=lambda m: (abs(m - k), m))
        near_model = self._model_cost(near, pipelined)
        if not near_model:
            return model
        # Scale, not shift: what the components miss (cores shared by draft and target) grows
        # with the work done; a per-round overhead is then overpriced a little for long blocks.
        return measured[near] * model / near_model

    def _model_cost(self, k: int, pipelined: bool | None = None) -> float | None:
        """Component model: the verify pass plus the draft time not hidden behind the previous
        verify (all of it serially; pipelined, all of it unless the previous block was accepted
        whole)."""
        draft = self.shared.draft_step.value
        length = self.acceptance.expected_length(k)  # k, unless blocks end early
        verify = self._verify_cost(length)
        if draft is None or verify is None:
            return None
        drafting = length * draft
        # A seeded request prices rounds one way whatever its pipelining (pipelining is timing,
        # and its k must not depend on timing: it repeats exactly either way).
        if (self.pipelined if pipelined is None else pipelined) and not self.deterministic:
            drafting *= 1.0 - self.acceptance.whole_block(k)
        return verify + drafting

    def _verify_cost(self, k: float) -> float | None:
        verify = self.shared.verify
        if k in verify:
            return verify[k].value
        if not verify:
            return None
        # Unmeasured k: a verify pass is affine in its positions, cost(k) = base + slope * k. Fit
        # it through the nearest measured k and a plain step (a pass over one position: k = 0);
        # without a plain step, take the slope from the configured prior. Scaling linearly in
        # k + 1 instead would price per-call overhead per token, and the policy would never try
        # a longer block than the first one it measured.
        near = min(verify, key=lambda m: abs(m - k))
        measured = verify[near].value
        plain = self.shared.plain_step.value
        if plain is not None and not self.deterministic:
            slope = max(0.0, (measured - plain) / near)
        else:
            prior = self.config.verify_cost_per_token_prior
            slope = measured * prior / (1.0 + near * prior)
        return max(measured + slope * (k - near), 1e-9)

    # -- observations -------------------------------------------------------------------------

    def observe_round(
        self,
        k: int,
        accepted: int,
        draft_seconds: float,
        verify_seconds: float,
        round_seconds: float | None = None,
        *,
        timed: bool = True,
        unsure_last: bool | None = None,
    ) -> None:
        """A round of k committed `accepted` draft tokens. `draft_seconds` is the exposed
        drafting before the verify (0 for a block drafted ahead), `round_seconds` the round's wall
        time from its start to the next round ready (default: draft + verify). `timed=False`
        records acceptance only: the round's times are not typical (the draft first caught up
        on many tokens after plain steps). `unsure_last`: whether the draft was unsure of the
        block's last token (its confidence stop ends blocks there); None: not known."""
        self.acceptance.observe(k, accepted)
        if unsure_last is not None:
            self.acceptance.observe_stop(k, unsure_last, accepted)
            if not self.deterministic:
                self.shared.acceptance.observe_stop(k, unsure_last, accepted)
        # The first round after a change of pipelining mode is neither (a block drafted ahead,
        # or none ready yet): it times nothing.
        timed = timed and self._last_pipelined in (None, self.pipelined)
        self._last_pipelined = self.pipelined
        if not self.deterministic:
            self.shared.acceptance.observe(k, accepted)
            if timed:
                self._observe_times(k, draft_seconds, verify_seconds, round_seconds)
        if not self.speculating and self.mode is SpecMode.AUTO:
            if self._pays(self.config.min_gain):
                self.speculating = True
                self.switches += 1
                self._probe_interval = self.config.probe_interval
            else:
                self._probe_interval = min(self._probe_interval * 2, self.config.max_probe_interval)

    def _observe_times(
        self, k: int, draft_seconds: float, verify_seconds: float, round_seconds: float | None
    ) -> None:
        shared, ewma = self.shared, self.config.ewma
        if draft_seconds > 0:
            shared.draft_step.add(draft_seconds / k)
        shared.verify.setdefault(k, _Ewma(ewma)).add(verify_seconds)
        wall = draft_seconds + verify_seconds if round_seconds is None else round_seconds
        shared.round.setdefault((k, self.pipelined), _Ewma(ewma)).add(wall)
        shared.timed_rounds += 1
        shared.last_timed[self.pipelined] = shared.timed_rounds

    def observe_plain(self, seconds: float) -> None:
        self.acceptance.age(1)
        if not self.deterministic:
            self.shared.plain_step.add(seconds)
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


def spec_policy(
    base: PolicyConfig,
    mode: SpecMode,
    k: int | None,
    deterministic: bool = False,
    shared: DeploymentEstimates | None = None,
    pipelined: bool | str | None = None,
) -> SpeculationPolicy:
    """The per-request policy: `k` fixes the block size (None = adaptive). `deterministic` (a
    seeded sampling request) makes it timing-free so that the request repeats exactly."""
    if k is not None and (not isinstance(k, int) or k < 1):
        raise ValueError(f"k (num_draft_tokens) must be >= 1, got {k!r}")
    if k is not None and k > base.max_draft_tokens:
        raise ValueError(f"k (num_draft_tokens) must be <= {base.max_draft_tokens}, got {k}")
    config = replace(base, num_draft_tokens=k or 0)
    if pipelined is not None:  # True, False or "auto" (measure both, run the faster)
        config = with_pipelining(config, pipelined)
    return SpeculationPolicy(config, mode, deterministic, shared)
