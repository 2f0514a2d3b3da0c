"""SpeculationPolicy: fixed and adaptive k, the fallback to plain decoding and the probes back.

Costs are fed in as if measured (seconds), so every decision below is deterministic.
"""

from __future__ import annotations

import pytest

from cluster.policy import PolicyConfig, SpecMode, SpeculationPolicy, expected_tokens

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


def set_alpha(policy, alpha: float, draft: float = DRAFT) -> None:
    """Drive the acceptance estimate to alpha (40 rounds of k=10: the EWMA forgets its start)."""
    for _ in range(40):
        policy.observe_round(10, round(alpha * 10), draft * 10, verify_cost(10))


def make(mode=SpecMode.AUTO, **cfg) -> SpeculationPolicy:
    cfg.setdefault("pipelined", False)
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
    set_alpha(p, 0.5)
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


# -- adaptive k ---------------------------------------------------------------------------------


def best_k_for(alpha: float, pipelined: bool = False, draft: float = DRAFT) -> int:
    p = make(SpecMode.ON, pipelined=pipelined)
    feed_rounds(p, alpha, 1, draft=draft)
    set_alpha(p, alpha, draft=draft)
    p.observe_plain(PLAIN)
    return p.next_k()


def brute_force_best_k(alpha: float, pipelined: bool, draft: float, max_k: int = 8) -> int:
    """The module's cost model: a round costs its verify plus the draft time not hidden behind
    the previous verify (all of it serially; with pipelining, all of it unless the previous block
    was accepted whole, probability α^k)."""

    def rate(k: int) -> float:
        exposed = draft * k * ((1 - alpha**k) if pipelined else 1.0)
        return expected_tokens(alpha, k) / (verify_cost(k) + exposed)

    return max(range(1, max_k + 1), key=rate)


@pytest.mark.parametrize("draft", [0.01, 0.1, 0.3])
@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0])
def test_adaptive_k_is_the_best_rate(alpha, pipelined, draft):
    assert best_k_for(alpha, pipelined, draft) == brute_force_best_k(alpha, pipelined, draft)


def test_adaptive_k_grows_with_alpha():
    ks = [best_k_for(a) for a in (0.1, 0.5, 0.7, 0.8, 0.9, 1.0)]
    assert ks == sorted(ks)
    assert ks[0] <= 2 and ks[-1] == 8


def test_adaptive_k_follows_alpha_down_and_up():
    p = make(SpecMode.AUTO)
    feed_rounds(p, 0.9, 1)
    p.observe_plain(0.5 * PLAIN)  # plain cheap enough that low alpha can still pay at small k
    set_alpha(p, 0.95)
    high = p.next_k()
    set_alpha(p, 0.5)
    low = p.next_k()
    set_alpha(p, 0.95)
    again = p.next_k()
    assert high >= 6 and low <= 3 and again == high


def test_unmeasured_k_is_extrapolated_affinely():
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


def test_policies_share_one_cost_model():
    """Costs belong to the workers: a new sequence starts from what earlier ones measured."""
    from cluster.policy import CostModel

    costs = CostModel(PolicyConfig().ewma)
    first = SpeculationPolicy(PolicyConfig(), SpecMode.AUTO, costs=costs)
    first.observe_round(4, 4, 0.4, 1.2)
    first.observe_plain(1.0)
    second = SpeculationPolicy(PolicyConfig(), SpecMode.AUTO, costs=costs)
    assert second._verify_cost(4) == pytest.approx(1.2)
    assert second.plain_step.value == pytest.approx(1.0)
    assert second.draft_step.value == pytest.approx(0.1)
    alone = SpeculationPolicy(PolicyConfig(), SpecMode.AUTO)
    assert alone._verify_cost(4) is None and alone.plain_step.value is None
    seeded = SpeculationPolicy(PolicyConfig(), SpecMode.AUTO, deterministic=True, costs=costs)
    seeded.observe_round(4, 4, 40.0, 120.0)  # a timing-free policy never touches the shared model
    assert costs.verify[4].value == pytest.approx(1.2)
