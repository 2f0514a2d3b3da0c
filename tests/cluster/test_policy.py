"""RowPolicy: a row's acceptance, fixed and adaptive k for a row that decides alone (priced by
the cost priors), the fallback to plain decoding and the probes back, its draft's availability.

Acceptance is fed in round by round, so every decision below is deterministic.
"""

from __future__ import annotations

import random

import pytest

from cluster.scheduling.acceptance import AcceptanceModel
from cluster.scheduling.policy import PolicyConfig, SpecMode
from cluster.scheduling.row_policy import RowPolicy, deployment_acceptance
from tests.cluster.blocks import StoppingDraft, feed, geometric_tokens


def feed_rounds(policy, alpha: float, n: int, ks=range(1, 9)) -> None:
    """n rounds at each k in ks, accepting round(alpha * k) tokens."""
    for _ in range(n):
        for k in ks:
            policy.observe_round(k, round(alpha * k))


def set_alpha(policy, alpha: float, seed: int = 0) -> None:
    """Drive the acceptance estimate to alpha: 40 rounds of k=8, i.i.d. acceptance (the decayed
    counts forget their start within a few windows)."""
    rng = random.Random(seed)
    for _ in range(40):
        accepted = 0
        while accepted < 8 and rng.random() < alpha:
            accepted += 1
        policy.observe_round(8, accepted)


def make(mode=SpecMode.AUTO, **cfg) -> RowPolicy:
    # The thresholds these tests were written for (back at +5%, stay while it pays at all).
    cfg.setdefault("min_gain", 1.05)
    cfg.setdefault("keep_gain", min(1.0, cfg["min_gain"]))
    return RowPolicy(PolicyConfig(**cfg), mode)


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
    p = make(mode, num_draft_tokens=4, prior_acceptance=0.9, draft_cost_prior=0.1)
    assert p.next_k() == 4  # nothing measured yet: the prior says speculation pays
    feed_rounds(p, 0.9, 3)
    p.observe_plain()
    assert [p.next_k() for _ in range(5)] == [4] * 5
    set_alpha(p, 0.7)
    assert p.next_k() == 4


def test_adaptive_k_before_any_measurement():
    p = make(SpecMode.AUTO)
    assert 1 <= p.next_k() <= p.config.max_draft_tokens
    assert p.switch.speculating


def test_off_is_always_plain():
    p = make(SpecMode.OFF)
    assert not p.switch.speculating
    feed_rounds(p, 1.0, 3)
    assert [p.next_k() for _ in range(20)] == [0] * 20
    assert not p.draft_retry_due()


def test_on_never_falls_back():
    p = make(SpecMode.ON)
    feed_rounds(p, 0.0, 5)
    p.observe_plain()  # plain pays better: AUTO would leave, ON stays
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
    assert model.expected_tokens(4) == pytest.approx(geometric_tokens(alpha, 4), rel=0.05)


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
    assert geometric_tokens(per_token, 4) < 0.8 * measured


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
    deployment = deployment_acceptance(PolicyConfig())
    first = RowPolicy(PolicyConfig(), SpecMode.AUTO, deployment=deployment)
    for _ in range(60):
        first.observe_round(2, 0)  # this draft never agrees here
    second = RowPolicy(PolicyConfig(), SpecMode.AUTO, deployment=deployment)
    assert second.acceptance.rates()[0] < 0.2
    fresh = RowPolicy(PolicyConfig(), SpecMode.AUTO)
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


# -- adaptive k, for a row that decides alone -----------------------------------------------


def prior_cost(policy: RowPolicy, k: int) -> float:
    """A round of cap k in plain steps: a verify of its drafted tokens plus their drafting."""
    length = policy.acceptance.expected_length(k)
    cfg = policy.config
    return 1.0 + length * (cfg.verify_cost_per_token_prior + cfg.draft_cost_prior)


@pytest.mark.parametrize("stops", [False, True], ids=["full blocks", "confidence stop"])
@pytest.mark.parametrize("alpha", [0.5, 0.7, 0.8, 0.9, 1.0])
def test_adaptive_k_is_the_best_rate_under_the_cost_priors(alpha, stops):
    p = make(SpecMode.ON)
    if stops:
        feed(p.acceptance, StoppingDraft(c=0.6, p_sure=alpha, p_unsure=alpha / 2), 8, 400, 1)
    else:
        for k in range(1, 9):
            feed_iid(p.acceptance, alpha, k, 200, seed=k)
    rates = {k: p.acceptance.expected_tokens(k) / prior_cost(p, k) for k in range(1, 9)}
    assert p.next_k() == max(rates, key=rates.get)


def test_adaptive_k_grows_with_alpha():
    ks = []
    for alpha in (0.1, 0.5, 0.7, 0.8, 0.9, 1.0):
        p = make(SpecMode.ON)
        for k in range(1, 9):
            feed_iid(p.acceptance, alpha, k, 200, seed=k)
        ks.append(p.next_k())
    assert ks == sorted(ks)
    assert ks[0] <= 2 and ks[-1] == 8


# -- AUTO: fallback and probes ------------------------------------------------------------------


def run_plain_mode(p: RowPolicy, steps: int, accepted_ratio: float) -> list[int]:
    """Drive the policy like a driver does; returns the plain-step counts before each probe."""
    gaps, plain = [], 0
    for _ in range(steps):
        k = p.next_k()
        if k == 0:
            p.observe_plain()
            plain += 1
        else:
            gaps.append(plain)
            plain = 0
            p.observe_round(k, round(accepted_ratio * k))
    return gaps


def test_auto_falls_back_when_no_k_beats_plain():
    p = make(SpecMode.AUTO)
    feed_rounds(p, 0.0, 2)
    p.observe_plain()
    assert p.switch.speculating
    assert p.next_k() == 0
    assert not p.switch.speculating and p.switch.switches == 1


def test_auto_stays_while_speculation_pays():
    p = make(SpecMode.AUTO)
    feed_rounds(p, 0.9, 2)
    p.observe_plain()
    set_alpha(p, 0.9)
    assert all(p.next_k() > 0 for _ in range(20))
    assert p.switch.speculating and p.switch.switches == 0


def test_probes_back_off_exponentially():
    p = make(SpecMode.AUTO, probe_interval=2, max_probe_interval=16)
    feed_rounds(p, 0.0, 2)
    p.observe_plain()
    assert p.next_k() == 0  # the switch to plain
    p.observe_plain()
    gaps = run_plain_mode(p, 200, accepted_ratio=0.0)
    # The step of the switch was already a plain one; then 2, 4, 8, 16, 16, ... plain steps.
    assert gaps[:7] == [1, 4, 8, 16, 16, 16, 16]
    assert not p.switch.speculating and p.switch.switches == 1


def test_probe_interval_counts_plain_steps():
    p = make(SpecMode.AUTO, probe_interval=5)
    feed_rounds(p, 0.0, 2)
    p.observe_plain()
    assert p.next_k() == 0
    ks = []
    for _ in range(5):
        p.observe_plain()
        ks.append(p.next_k())
    assert ks[:4] == [0] * 4 and ks[4] >= 1


def test_returns_to_spec_when_a_probe_pays():
    # An acceptance that follows the latest round alone (a window of one round), so that one
    # probe can show the draft good again.
    p = make(SpecMode.AUTO, probe_interval=3, acceptance_window=1)
    feed_rounds(p, 0.0, 1)
    set_alpha(p, 0.0)
    p.observe_plain()
    assert p.next_k() == 0 and not p.switch.speculating  # α ≈ 0: plain
    p.observe_plain()
    gaps = run_plain_mode(p, 3, accepted_ratio=1.0)  # the draft is good again
    assert gaps == [2]  # one probe after the interval (the switch step counted as plain)
    assert p.switch.speculating and p.switch.switches == 2
    assert all(p.next_k() > 0 for _ in range(10))
    # A later fallback starts again from the base interval, not a backed-off one.
    set_alpha(p, 0.0)
    assert p.next_k() == 0
    p.observe_plain()
    assert run_plain_mode(p, 4, accepted_ratio=0.0) == [2]


# -- draft availability -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [SpecMode.ON, SpecMode.AUTO])
def test_draft_failed_until_restored(mode):
    p = make(mode, num_draft_tokens=3, probe_interval=4)
    assert p.next_k() == 3
    p.draft_failed()
    assert not p.draft_available and p.switch.switches == 1
    p.draft_failed()  # a second report of the same loss is not another switch
    assert p.switch.switches == 1
    due = []
    for _ in range(6):
        assert p.next_k() == 0
        due.append(p.draft_retry_due())
        p.observe_plain()
    assert due == [False] * 4 + [True, True]
    p.draft_restored()
    assert p.draft_available and not p.draft_retry_due()
    assert p.next_k() == 3


def test_draft_retry_never_due_in_off_mode():
    p = make(SpecMode.OFF, probe_interval=1)
    p.draft_failed()
    for _ in range(5):
        p.observe_plain()
    assert not p.draft_retry_due() and p.next_k() == 0


def test_a_seeded_row_neither_learns_from_nor_teaches_its_deployment():
    """Seeded requests: decisions depend on the row's own acceptance only, never on what other
    requests showed the deployment, so a seeded request repeats exactly."""
    deployment = deployment_acceptance(PolicyConfig())
    taught = RowPolicy(PolicyConfig(), SpecMode.AUTO, deployment=deployment)
    for _ in range(60):
        taught.observe_round(2, 0)  # this draft never agrees here
    before = deployment.rates()
    seeded = RowPolicy(PolicyConfig(), SpecMode.AUTO, deterministic=True, deployment=deployment)
    assert seeded.acceptance.rates()[0] == pytest.approx(PolicyConfig().prior_acceptance)
    seeded.observe_round(4, 4, unsure_last=True)
    assert deployment.rates() == before and deployment.continuation()[0][3] == 1.0
    alone = RowPolicy(PolicyConfig(), SpecMode.AUTO, deterministic=True)
    alone.observe_round(4, 4, unsure_last=True)
    choices = ([], [])
    for i in range(40):
        for policy, out in ((seeded, choices[0]), (alone, choices[1])):
            k = policy.next_k()
            out.append(k)
            if k:
                policy.observe_round(k, min(i % 3, k))
            else:
                policy.observe_plain()
    assert choices[0] == choices[1]


@pytest.mark.parametrize("gain", [0.97, 1.02])
def test_hysteresis_stays_in_spec_while_it_pays_and_returns_only_with_a_margin(gain):
    """In spec mode AUTO leaves when speculation is slower than plain; from plain mode a probe
    brings it back only when speculation beats plain by min_gain."""
    # Every block accepted: 5 tokens a round of 4, which the priors price at 5 / gain plain steps.
    draft = (5.0 / gain - 1.0) / 4
    p = make(
        SpecMode.AUTO,
        num_draft_tokens=4,
        min_gain=1.05,
        probe_interval=1,
        acceptance_window=1,
        draft_cost_prior=draft,
        verify_cost_per_token_prior=0.0,
    )
    for _ in range(40):
        p.observe_round(4, 4)
    assert p._best_k() == (4, pytest.approx(gain, rel=1e-3))
    if gain >= 1.0:
        assert p.next_k() == 4 and p.switch.speculating
        p.switch.to_plain()  # e.g. after a bad stretch: a probe at this gain does not return
    else:
        assert p.next_k() == 0
    p.observe_plain()
    assert p.next_k() == 4  # the probe
    p.observe_round(4, 4)
    assert not p.switch.speculating


# -- configuration ---------------------------------------------------------------------------
