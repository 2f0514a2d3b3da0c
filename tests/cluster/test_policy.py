"""SpeculationPolicy: fixed and adaptive k, the fallback to plain decoding and the probes back.

Costs are fed in as if measured (seconds), so every decision below is deterministic.
"""

from __future__ import annotations

import random

import pytest

from cluster.scheduling.policy import (
    AcceptanceModel,
    DeploymentEstimates,
    PolicyConfig,
    SpecMode,
    SpeculationPolicy,
    expected_tokens,
    with_pipelining,
)
from tests.cluster.blocks import StoppingDraft, feed

# A cost model: a verify of k costs VERIFY0 + VERIFY1*k seconds, a drafted token DRAFT, a plain
# step PLAIN.
VERIFY0, VERIFY1, DRAFT, PLAIN = 1.0, 0.05, 0.1, 1.0


def verify_cost(k: int) -> float:
    return VERIFY0 + VERIFY1 * k


def feed_rounds(policy, alpha: float, n: int, ks=range(1, 9), draft: float = DRAFT) -> None:
    """n rounds at each k in ks, accepting round(alpha * k) tokens, with the model's costs."""
    for _ in range(n):
        for k in ks:
            policy.observe_round(k, round(alpha * k), draft * k, verify_cost(k))


def set_alpha(policy, alpha: float, draft: float = DRAFT, seed: int = 0) -> None:
    """Drive the acceptance estimate to alpha: 40 rounds of k=8, i.i.d. acceptance (the decayed
    counts forget their start within a few windows)."""
    rng = random.Random(seed)
    for _ in range(40):
        accepted = 0
        while accepted < 8 and rng.random() < alpha:
            accepted += 1
        policy.observe_round(8, accepted, draft * 8, verify_cost(8))


def make(mode=SpecMode.AUTO, **cfg) -> SpeculationPolicy:
    cfg.setdefault("pipelined", False)
    # The thresholds these tests were written for (back at +5%, stay while it pays at all).
    cfg.setdefault("min_gain", 1.05)
    cfg.setdefault("keep_gain", min(1.0, cfg["min_gain"]))
    return SpeculationPolicy(PolicyConfig(**cfg), mode)


# -- the formula ------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.8, 0.99])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_expected_tokens_is_the_geometric_sum(alpha, k):
    # E(k) = 1 + α + ... + α^k = (1 - α^(k+1)) / (1 - α)
    assert expected_tokens(alpha, k) == pytest.approx(sum(alpha**i for i in range(k + 1)))


def test_expected_tokens_edges():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 1) == 1.5
    assert expected_tokens(0.5, 3) == pytest.approx(1.875)
    assert expected_tokens(0.999999, 3) == pytest.approx(4.0, rel=1e-5)  # continuous at 1


# -- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"max_draft_tokens": 0}, "max_draft_tokens"),
        ({"num_draft_tokens": 9}, "num_draft_tokens"),
        ({"num_draft_tokens": -1}, "num_draft_tokens"),
        ({"min_gain": 0}, "min_gain"),
        ({"probe_interval": 0}, "probe_interval"),
        ({"probe_interval": 300}, "probe_interval"),
        ({"ewma": 0}, "ewma"),
        ({"ewma": 1.5}, "ewma"),
        ({"prior_acceptance": 1.0}, "prior_acceptance"),
        ({"prior_acceptance": -0.1}, "prior_acceptance"),
    ],
)
def test_config_validation(kw, word):
    with pytest.raises(ValueError, match=word):
        PolicyConfig(**kw)


# -- fixed k, modes -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [SpecMode.ON, SpecMode.AUTO])
def test_fixed_k(mode):
    p = make(mode, num_draft_tokens=4)
    assert p.next_k() == 4  # nothing measured yet: speculate and learn
    feed_rounds(p, 0.9, 3)
    p.observe_plain(PLAIN)
    assert [p.next_k() for _ in range(5)] == [4] * 5
    set_alpha(p, 0.7)
    assert p.next_k() == 4


def test_adaptive_k_before_any_measurement():
    p = make(SpecMode.AUTO)
    assert 1 <= p.next_k() <= p.config.max_draft_tokens
    assert p.speculating


def test_off_is_always_plain():
    p = make(SpecMode.OFF)
    assert not p.speculating
    feed_rounds(p, 1.0, 3)
    assert [p.next_k() for _ in range(20)] == [0] * 20
    assert not p.draft_retry_due()


def test_on_never_falls_back():
    p = make(SpecMode.ON)
    feed_rounds(p, 0.0, 5)
    p.observe_plain(0.01)  # plain is far cheaper: AUTO would leave, ON stays
    assert all(p.next_k() >= 1 for _ in range(50))


# -- acceptance model ---------------------------------------------------------------------------


def feed_iid(model: AcceptanceModel, alpha: float, k: int, n: int, seed: int = 0) -> list[int]:
    """n rounds of k with i.i.d. Bernoulli(alpha) acceptance; returns committed per round."""
    rng = random.Random(seed)
    committed = []
    for _ in range(n):
        accepted = 0
        while accepted < k and rng.random() < alpha:
            accepted += 1
        model.observe(k, accepted)
        committed.append(accepted + 1)
    return committed


@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.9])
def test_iid_acceptance_gives_the_geometric_sum(alpha):
    model = AcceptanceModel([0.5] * 8, strength=4, window=2000)
    committed = feed_iid(model, alpha, 8, 4000)
    assert all(abs(p - alpha) < 0.05 for p in model.rates()[:4])
    assert model.expected_tokens(8) == pytest.approx(sum(committed) / len(committed), rel=0.05)
    assert model.expected_tokens(4) == pytest.approx(expected_tokens(alpha, 4), rel=0.05)


def test_bursty_acceptance_is_predicted_where_the_iid_formula_fails():
    """Blocks accepted whole or rejected at once (what a real pair does): per-position rates
    predict tokens per round; the geometric sum of the mean rate does not."""
    model = AcceptanceModel([0.5] * 4, strength=4, window=2000)
    rng = random.Random(1)
    committed = []
    for _ in range(2000):
        accepted = 4 if rng.random() < 0.75 else 0
        model.observe(4, accepted)
        committed.append(accepted + 1)
    measured = sum(committed) / len(committed)  # about 0.75 * 5 + 0.25 = 4.0
    assert model.expected_tokens(4) == pytest.approx(measured, rel=0.03)
    per_token = sum(c - 1 for c in committed) / (4 * len(committed))
    assert expected_tokens(per_token, 4) < 0.8 * measured


def test_blocks_that_end_early_are_priced_by_how_far_they_reach():
    """A confidence stop makes k a cap: the model learns how far blocks reach and predicts the
    tokens and drafted length of every cap, also of caps it never ran with, though the draft's
    sure tokens are accepted more often than its unsure ones."""
    draft = StoppingDraft(c=0.6, p_sure=0.95, p_unsure=0.5)
    model = AcceptanceModel([0.5] * 8, strength=4, window=5000)
    feed(model, draft, cap=8, n=8000, seed=3)
    go_on, go_on_ok = model.continuation()
    assert all(abs(x - 0.6) < 0.03 for x in go_on[:3])
    assert all(x > 0.65 for x in go_on_ok[:3])  # P(sure | accepted) = 0.57 / 0.77
    # Learnt from blocks of cap 1 alone, too: the draft says whether it would have gone on.
    one = AcceptanceModel([0.5] * 8, strength=4, window=5000)
    feed(one, draft, cap=1, n=3000, seed=5)
    assert abs(one.continuation()[0][0] - 0.6) < 0.03
    for cap in (2, 4, 8):
        tokens, length = feed(None, draft, cap=cap, n=20000, seed=4)
        assert model.expected_tokens(cap) == pytest.approx(tokens, rel=0.03), cap
        assert model.expected_length(cap) == pytest.approx(length, rel=0.03), cap
    # Without stops nothing changes: every block reaches its cap.
    plain = AcceptanceModel([0.5] * 8, strength=4, window=5000)
    committed = feed_iid(plain, 0.7, 4, 500)
    for a in committed:
        plain.observe_stop(4, False, a - 1)
    assert plain.reach() == [1.0] * 8 and plain.expected_length(4) == 4.0


def test_one_rejected_block_does_not_swing_the_estimate():
    model = AcceptanceModel([0.6] * 4, strength=4, window=10)
    for _ in range(30):
        model.observe(4, 4)
    model.observe(4, 0)
    assert model.rates()[0] > 0.8
    for _ in range(30):
        model.observe(4, 0)
    assert model.rates()[0] < 0.1  # a draft that stopped agreeing is followed within a window


def test_positions_no_round_reached_take_the_last_measured_rate():
    model = AcceptanceModel([0.3] + [None] * 7, strength=4, window=10)
    for _ in range(40):
        model.observe(3, 3)
    rates = model.rates()
    assert rates[0] > 0.95 and rates[7] == pytest.approx(rates[2]) and rates[2] > 0.9
    assert model.known_rates()[3:] == [None] * 5
    given = AcceptanceModel([0.3] * 8, strength=4, window=10)  # a prior for every position
    for _ in range(40):
        given.observe(3, 3)
    assert given.rates()[7] == pytest.approx(0.3)


def test_a_new_sequence_starts_from_the_deployments_acceptance():
    shared = DeploymentEstimates(PolicyConfig())
    first = SpeculationPolicy(PolicyConfig(), SpecMode.AUTO, shared=shared)
    for _ in range(60):
        first.observe_round(2, 0, 0.1, 1.0)  # this draft never agrees here
    second = SpeculationPolicy(PolicyConfig(), SpecMode.AUTO, shared=shared)
    assert second.acceptance.rates()[0] < 0.2
    fresh = SpeculationPolicy(PolicyConfig(), SpecMode.AUTO)
    assert fresh.acceptance.rates()[0] == pytest.approx(PolicyConfig().prior_acceptance)


def test_plain_steps_age_the_evidence_so_a_probe_counts():
    model = AcceptanceModel([0.6] * 4, strength=4, window=10)
    for _ in range(40):
        model.observe(4, 0)
    before = model.rates()[0]
    model.age(50)
    assert model.rates()[0] == pytest.approx(before)  # aging keeps the estimate
    model.observe(4, 4)
    kept = 4 * model.keep  # the strength left, faded once more by the new round
    assert model.rates()[0] == pytest.approx((1 + kept * before) / (1 + kept))  # 1 of ~4.6


# -- adaptive k ---------------------------------------------------------------------------------


def measured_policy(
    alpha: float, round_cost, mode=SpecMode.ON, plain: float = PLAIN, **cfg
) -> SpeculationPolicy:
    """A policy that has seen every k run at `round_cost(k)` seconds and i.i.d. acceptance."""
    p = make(mode, **cfg)
    for k in range(1, p.config.max_draft_tokens + 1):
        p.observe_round(k, round(alpha * k), DRAFT * k, verify_cost(k), round_cost(k))
    for k in range(1, p.config.max_draft_tokens + 1):  # then acceptance at its true rate
        feed_iid(p.acceptance, alpha, k, 200, seed=k)
    p.observe_plain(plain)
    return p


def serial_cost(k: int, draft: float = DRAFT) -> float:
    return verify_cost(k) + draft * k


@pytest.mark.parametrize("draft", [0.01, 0.1, 0.3])
@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0])
def test_adaptive_k_is_the_best_measured_rate(alpha, draft):
    p = measured_policy(alpha, lambda k: serial_cost(k, draft))
    rates = {k: p.acceptance.expected_tokens(k) / serial_cost(k, draft) for k in range(1, 9)}
    assert p.next_k() == max(rates, key=rates.get)


def test_adaptive_k_grows_with_alpha():
    ks = [measured_policy(a, serial_cost).next_k() for a in (0.1, 0.5, 0.7, 0.8, 0.9, 1.0)]
    assert ks == sorted(ks)
    assert ks[0] <= 2 and ks[-1] == 8


def test_measured_round_time_outweighs_the_component_model():
    """Draft and verify measured alone look cheap, but whole rounds took 6x as long (draft and
    target contending for cores): AUTO must see that speculation does not pay."""
    p = make(SpecMode.AUTO)
    for _ in range(5):
        for k in (2, 4):
            p.observe_round(k, k, DRAFT * k, verify_cost(k), 6 * serial_cost(k))
    p.observe_plain(PLAIN)
    assert p._round_cost(4) == pytest.approx(6 * serial_cost(4))
    assert p.next_k() == 0
    q = make(SpecMode.AUTO)  # the same components with rounds costing what they add up to
    for _ in range(5):
        for k in (2, 4):
            q.observe_round(k, k, DRAFT * k, verify_cost(k), serial_cost(k))
    q.observe_plain(PLAIN)
    assert q.next_k() > 0


def test_unmeasured_k_is_priced_from_the_nearest_measured_round():
    p = make(SpecMode.ON)
    p.observe_round(2, 2, 2 * DRAFT, verify_cost(2), 2.0)  # a slow round: 2.0 s, model 1.3 s
    p.observe_plain(PLAIN)
    # k = 5: the measured k = 2 round scaled by the component model's ratio of 5 to 2.
    assert p._round_cost(5) == pytest.approx(2.0 * p._model_cost(5) / p._model_cost(2))
    assert p._round_cost(2) == pytest.approx(2.0)


def test_unmeasured_verify_is_extrapolated_affinely():
    """cost(k) = base + slope * k through the nearest measured k and a plain step (k = 0); the
    prior slope stands in while no plain step is measured."""
    p = make(SpecMode.ON)
    p.observe_round(2, 2, 2 * DRAFT, 0.3)  # only k=2 measured
    assert p._verify_cost(2) == pytest.approx(0.3)
    prior = p.config.verify_cost_per_token_prior
    slope = 0.3 * prior / (1 + 2 * prior)
    assert p._verify_cost(5) == pytest.approx(0.3 + 3 * slope)
    assert p._verify_cost(1) == pytest.approx(0.3 - slope)
    p.observe_plain(0.2)  # a pass over one position: the line goes through (0, 0.2) and (2, 0.3)
    assert p._verify_cost(5) == pytest.approx(0.45)
    assert p._verify_cost(1) == pytest.approx(0.25)


def test_adaptive_k_explores_longer_blocks_when_verify_is_flat():
    """Small models: a verify of k costs about a plain step. Having measured only the first
    block size, the policy must still move to longer blocks when acceptance is high."""
    p = make(SpecMode.AUTO, pipelined=True)
    first = p.next_k()
    seen = {first}
    for _ in range(30):
        k = p.next_k()
        seen.add(k)
        if k:
            p.observe_round(k, k, 0.1 * k, 1.0 + 0.02 * k)  # everything accepted, flat verify
        else:
            p.observe_plain(1.0)
    assert max(seen) > first


# -- AUTO: fallback and probes ------------------------------------------------------------------


def run_plain_mode(p: SpeculationPolicy, steps: int, accepted_ratio: float) -> list[int]:
    """Drive the policy like a driver does; returns the plain-step counts before each probe."""
    gaps, plain = [], 0
    for _ in range(steps):
        k = p.next_k()
        if k == 0:
            p.observe_plain(PLAIN)
            plain += 1
        else:
            gaps.append(plain)
            plain = 0
            p.observe_round(k, round(accepted_ratio * k), DRAFT * k, verify_cost(k))
    return gaps


def test_auto_falls_back_when_no_k_beats_plain():
    p = make(SpecMode.AUTO)
    feed_rounds(p, 0.0, 2)
    p.observe_plain(PLAIN)
    assert p.speculating
    assert p.next_k() == 0
    assert not p.speculating and p.switches == 1


def test_auto_stays_while_speculation_pays():
    p = make(SpecMode.AUTO)
    feed_rounds(p, 0.9, 2)
    p.observe_plain(PLAIN)
    set_alpha(p, 0.9)
    assert all(p.next_k() > 0 for _ in range(20))
    assert p.speculating and p.switches == 0


def test_auto_falls_back_without_a_plain_measurement():
    # Spec mode takes no plain step to measure, yet a draft that never agrees must be dropped.
    p = make(SpecMode.AUTO, pipelined=True)
    for _ in range(10):
        k = p.next_k()
        if k == 0:
            break
        p.observe_round(k, 0, 0.8 * k, verify_cost(k))
    assert k == 0 and not p.speculating


def test_probes_back_off_exponentially():
    p = make(SpecMode.AUTO, probe_interval=2, max_probe_interval=16)
    feed_rounds(p, 0.0, 2)
    p.observe_plain(PLAIN)
    assert p.next_k() == 0  # the switch to plain
    p.observe_plain(PLAIN)
    gaps = run_plain_mode(p, 200, accepted_ratio=0.0)
    # The step of the switch was already a plain one; then 2, 4, 8, 16, 16, ... plain steps.
    assert gaps[:7] == [1, 4, 8, 16, 16, 16, 16]
    assert not p.speculating and p.switches == 1


def test_probe_interval_counts_plain_steps():
    p = make(SpecMode.AUTO, probe_interval=5)
    feed_rounds(p, 0.0, 2)
    p.observe_plain(PLAIN)
    assert p.next_k() == 0
    ks = []
    for _ in range(5):
        p.observe_plain(PLAIN)
        ks.append(p.next_k())
    assert ks[:4] == [0] * 4 and ks[4] >= 1


def test_returns_to_spec_when_a_probe_pays():
    # Costs where speculation pays only with decent acceptance: cheap draft, verify ~ plain.
    p = make(SpecMode.AUTO, probe_interval=3)
    feed_rounds(p, 0.0, 1, draft=0.01)
    set_alpha(p, 0.0, draft=0.01)
    p.observe_plain(PLAIN)
    assert p.next_k() == 0 and not p.speculating  # α ≈ 0: plain
    p.observe_plain(PLAIN)
    gaps = run_plain_mode(p, 3, accepted_ratio=1.0)  # the draft is good again
    assert gaps == [2]  # one probe after the interval (the switch step counted as plain)
    assert p.speculating and p.switches == 2
    assert all(p.next_k() > 0 for _ in range(10))
    # A later fallback starts again from the base interval, not a backed-off one.
    set_alpha(p, 0.0, draft=0.01)
    assert p.next_k() == 0
    p.observe_plain(PLAIN)
    assert run_plain_mode(p, 4, accepted_ratio=0.0) == [2]


# -- draft availability -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [SpecMode.ON, SpecMode.AUTO])
def test_draft_failed_until_restored(mode):
    p = make(mode, num_draft_tokens=3, probe_interval=4)
    assert p.next_k() == 3
    p.draft_failed()
    assert not p.draft_available and p.switches == 1
    p.draft_failed()  # a second report of the same loss is not another switch
    assert p.switches == 1
    due = []
    for _ in range(6):
        assert p.next_k() == 0
        due.append(p.draft_retry_due())
        p.observe_plain(PLAIN)
    assert due == [False] * 4 + [True, True]
    p.draft_restored()
    assert p.draft_available and not p.draft_retry_due()
    assert p.next_k() == 3


def test_draft_retry_never_due_in_off_mode():
    p = make(SpecMode.OFF, probe_interval=1)
    p.draft_failed()
    for _ in range(5):
        p.observe_plain(PLAIN)
    assert not p.draft_retry_due() and p.next_k() == 0


def test_deterministic_policy_ignores_timings():
    """Seeded requests: decisions depend on acceptance only, never on measured seconds."""
    fast, slow = (
        SpeculationPolicy(PolicyConfig(), SpecMode.AUTO, deterministic=True) for _ in range(2)
    )
    choices = ([], [])
    for i in range(40):
        accepted = i % 3
        for policy, seconds, out in ((fast, 0.001, choices[0]), (slow, 5.0, choices[1])):
            k = policy.next_k()
            out.append(k)
            if k:
                policy.observe_round(k, min(accepted, k), seconds * k, seconds)
            else:
                policy.observe_plain(seconds)
    assert choices[0] == choices[1]


def test_policies_share_the_deployments_estimates():
    """Costs belong to the workers: a new sequence starts from what earlier ones measured."""
    shared = DeploymentEstimates(PolicyConfig())
    first = SpeculationPolicy(PolicyConfig(), SpecMode.AUTO, shared=shared)
    first.observe_round(4, 4, 0.4, 1.2, 1.7)
    first.observe_plain(1.0)
    second = SpeculationPolicy(PolicyConfig(), SpecMode.AUTO, shared=shared)
    assert second._verify_cost(4) == pytest.approx(1.2)
    assert second._round_cost(4) == pytest.approx(1.7)
    assert shared.plain_step.value == pytest.approx(1.0)
    assert shared.draft_step.value == pytest.approx(0.1)
    alone = SpeculationPolicy(PolicyConfig(), SpecMode.AUTO)
    assert alone._verify_cost(4) is None and alone.shared.plain_step.value is None
    seeded = SpeculationPolicy(PolicyConfig(), SpecMode.AUTO, deterministic=True, shared=shared)
    seeded.observe_round(4, 0, 40.0, 120.0)  # a timing-free policy never touches the shared model
    assert shared.verify[4].value == pytest.approx(1.2)
    assert shared.acceptance.rates()[0] > PolicyConfig().prior_acceptance


def test_an_untimed_round_counts_for_acceptance_only():
    p = make(SpecMode.AUTO)
    p.observe_round(4, 4, 0.4, 1.2, 1.6)
    before = p.acceptance.rates()[0]
    p.observe_round(4, 4, 9.0, 9.0, 18.0, timed=False)  # the draft caught up on 40 tokens first
    assert p._round_cost(4) == pytest.approx(1.6) and p.shared.draft_step.value == 0.1
    assert p.acceptance.rates()[0] > before


@pytest.mark.parametrize("gain", [0.97, 1.02])
def test_hysteresis_stays_in_spec_while_it_pays_and_returns_only_with_a_margin(gain):
    """In spec mode AUTO leaves when speculation is slower than plain; from plain mode a probe
    brings it back only when speculation beats plain by min_gain."""
    p = make(SpecMode.AUTO, num_draft_tokens=4, min_gain=1.05, probe_interval=1)
    for _ in range(40):
        p.observe_round(4, 4, 0.4, 1.0, 1.0)  # about 5 tokens per 1 s round
    plain = gain / p.acceptance.expected_tokens(4)  # seconds: spec rate / plain rate = gain
    p.observe_plain(plain)
    assert p.gain() == pytest.approx(gain, rel=1e-3)
    if gain >= 1.0:
        assert p.next_k() == 4 and p.speculating
        p._to_plain()  # e.g. after a bad stretch; now a probe at the same gain does not return
    else:
        assert p.next_k() == 0
    p.observe_plain(plain)
    assert p.next_k() == 4  # the probe
    p.observe_round(4, 4, 0.4, 1.0, 1.0)
    assert not p.speculating


# -- adaptive pipelining ------------------------------------------------------------------------


def run_rounds(p: SpeculationPolicy, n: int, pipelined_cost: float, serial_cost_: float) -> list:
    """n spec rounds, every block accepted, each costing what its pipelining mode costs here."""
    modes = []
    for _ in range(n):
        k = p.next_k()
        assert k > 0
        modes.append(p.pipelined)
        wall = (pipelined_cost if p.pipelined else serial_cost_) * (1 + 0.05 * k)
        p.observe_round(k, k, 0.0 if p.pipelined else DRAFT * k, verify_cost(k), wall)
    return modes


@pytest.mark.parametrize("faster", [True, False], ids=["pipelined-faster", "serial-faster"])
def test_adaptive_pipelining_settles_on_the_faster_mode(faster):
    p = make(SpecMode.AUTO, adaptive_pipelining=True, pipelined=True, reexplore_after=1000)
    p.observe_plain(10.0)  # plain decoding is slow: speculation pays either way
    costs = (1.0, 2.0) if faster else (2.0, 1.0)
    modes = run_rounds(p, 60, *costs)
    assert modes[0] is True  # it starts where configured
    assert False in modes[:20]  # and measures the other mode early
    assert all(m is faster for m in modes[-30:])


def test_exploration_runs_the_other_mode_for_a_few_rounds_and_times_only_steady_ones():
    p = make(SpecMode.AUTO, adaptive_pipelining=True, pipelined=True, explore_rounds=4)
    p.observe_plain(10.0)
    modes = run_rounds(p, 6, pipelined_cost=1.0, serial_cost_=5.0)
    assert modes == [True, False, False, False, False, True]
    # Rounds 3-5 were timed in serial mode; the first serial round (a block drafted ahead was
    # ready) was not: three timed serial rounds, all at the serial cost.
    serial = {k: e.value for (k, pipe), e in p.shared.round.items() if not pipe}
    assert serial and all(v == pytest.approx(5.0 * (1 + 0.05 * k)) for k, v in serial.items())


def test_stale_times_are_measured_again():
    p = make(SpecMode.AUTO, adaptive_pipelining=True, pipelined=True, reexplore_after=20)
    p.observe_plain(10.0)
    modes = run_rounds(p, 80, pipelined_cost=1.0, serial_cost_=2.0)
    runs = sum(1 for a, b in zip(modes, modes[1:], strict=False) if a and not b)
    assert runs >= 3  # the slower mode is looked at again now and then, not abandoned forever


@pytest.mark.parametrize("deterministic", [False, True])
def test_fixed_pipelining_never_changes(deterministic):
    config = PolicyConfig(pipelined=False, adaptive_pipelining=deterministic)
    p = SpeculationPolicy(config, SpecMode.AUTO, deterministic=deterministic)
    p.observe_plain(10.0)
    assert set(run_rounds(p, 30, pipelined_cost=0.1, serial_cost_=5.0)) == {False}


def test_pipelining_setting_values():
    base = PolicyConfig()
    assert with_pipelining(base, "auto").adaptive_pipelining
    assert not with_pipelining(base, False).pipelined
    assert (
        with_pipelining(base, True).pipelined
        and not with_pipelining(base, True).adaptive_pipelining
    )
    with pytest.raises(ValueError, match="pipelined"):
        with_pipelining(base, "sometimes")
