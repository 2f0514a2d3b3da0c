"""The batch policy prices whole steps: k per row maximises the batch's committed tokens per
second, down to k = 0 (plain steps for every row) when batched verification costs more than it
gains, and back when speculation pays again. Fake step times from a cost function stand in for
the clock."""

from __future__ import annotations

import random

import pytest

from cluster.scheduling.acceptance import AcceptanceModel
from cluster.scheduling.batch_policy import BatchPolicy, RowChoice, expected_passes
from cluster.scheduling.policy import PolicyConfig
from cluster.scheduling.step_costs import LineFit, RealizedRates, StepCosts
from tests.cluster.blocks import StoppingDraft, feed

CFG = PolicyConfig(max_draft_tokens=8, probe_interval=4, max_probe_interval=16)


def compute_bound(rows: int, width: int) -> float:
    """A target whose pass costs 2 ms + 1 ms per padded position (compute-bound at scale)."""
    return 0.002 + 0.001 * rows * width


def overhead_bound(rows: int, width: int) -> float:
    """A target dominated by per-pass overhead: 20 ms + 0.05 ms per position."""
    return 0.020 + 0.00005 * rows * width


def draft_pass(rows: int) -> float:
    return 0.0005 + 0.0001 * rows


def rows_of(n: int, alpha: float, kind: str = "auto", cap: int = 8) -> list[RowChoice]:
    acc = AcceptanceModel([alpha] * 8, 1.0, 10.0)
    expected = [acc.expected_tokens(k) for k in range(9)]
    return [RowChoice(cap, kind, expected) for _ in range(n)]


def run_steps(policy: BatchPolicy, costs: StepCosts, rows, target, steps: int) -> list[int]:
    """Drive the policy: each step's chosen k is 'measured' with the given cost functions."""
    chosen = []
    for _ in range(steps):
        ks = policy.choose(rows)
        k = max(ks)
        width = k + 1
        costs.observe_target(len(rows), width, target(len(rows), width))
        drafting = sum(1 for x in ks if x > 0)
        if k:
            costs.observe_draft(drafting, k, k * draft_pass(drafting))
        else:
            costs.last_plain_step = costs.steps
        costs.steps += 1
        chosen.append(k)
    return chosen


def test_line_fit_recovers_slope_and_offset_and_falls_back_to_the_prior_ratio():
    fit = LineFit(keep=1.0, prior_ratio=0.1)
    for x in (1, 5, 16, 80):
        fit.add(x, 0.002 + 0.001 * x)
    a, b = fit.coefficients()
    assert a == pytest.approx(0.002, rel=1e-6) and b == pytest.approx(0.001, rel=1e-6)
    one = LineFit(keep=1.0, prior_ratio=0.1)
    one.add(5, 1.4)  # one width seen: y = a (1 + 0.1 (x - 1)) through it
    assert one.predict(1) == pytest.approx(1.0) and one.predict(5) == pytest.approx(1.4)


def test_speculates_at_low_load_and_goes_plain_when_the_batch_saturates_the_target():
    costs = StepCosts(CFG)
    policy = BatchPolicy(CFG, costs)
    single = rows_of(1, 0.8)
    ks = run_steps(policy, costs, single, compute_bound, 40)
    assert ks[-1] > 0 and sum(k > 0 for k in ks[-20:]) >= 19  # one stream: speculation pays
    big = rows_of(64, 0.8)
    ks = run_steps(policy, costs, big, compute_bound, 40)
    # 64 rows x (k+1) positions: the target is compute-bound, k + 1 positions cost ~k + 1 times
    # one: every row takes plain steps (probes aside).
    assert ks[-10:].count(0) >= 9
    assert policy.speculating is False
    # The load goes away: speculation comes back (a probe sees it pay).
    ks = run_steps(policy, costs, single, compute_bound, 40)
    assert ks[-1] > 0 and policy.speculating


def test_overhead_bound_target_keeps_speculating_under_load():
    costs = StepCosts(CFG)
    policy = BatchPolicy(CFG, costs)
    ks = run_steps(policy, costs, rows_of(16, 0.8), overhead_bound, 60)
    assert sum(k > 0 for k in ks[-20:]) >= 19


def test_poor_acceptance_goes_plain_even_alone():
    costs = StepCosts(CFG)
    policy = BatchPolicy(CFG, costs)
    ks = run_steps(policy, costs, rows_of(1, 0.02), compute_bound, 60)
    assert ks[-10:].count(0) >= 9


def test_own_and_pinned_rows_keep_their_k_whatever_the_batch_does():
    costs = StepCosts(CFG)
    policy = BatchPolicy(CFG, costs)
    rows = rows_of(32, 0.8)
    run_steps(policy, costs, rows, compute_bound, 40)
    assert not policy.speculating
    acc = rows[0].expected
    seeded = RowChoice(8, "own", (), own_k=3)  # seeded sampling: decided by itself
    on_pinned = RowChoice(8, "on", acc, pin=2)  # mode ON with num_draft_tokens=2
    on_free = RowChoice(8, "on", acc)  # mode ON, adaptive: at least one draft token
    capped = RowChoice(1, "on", acc, pin=4)  # one token left before max_new_tokens
    off = RowChoice(8, "own", (), own_k=0)
    ks = policy.choose([*rows, seeded, on_pinned, on_free, capped, off])
    batch_k = ks[0]
    assert ks[-5:] == [3, 2, max(1, batch_k), 1, 0]
    assert set(ks[: len(rows)]) == {batch_k}


def test_hysteresis_band_a_predicted_gain_below_min_gain_does_not_start_speculation():
    """The model's gain must beat min_gain to leave plain mode, and keep_gain to stay: a gain
    inside the band (here ~1.1x) never turns plain into speculation, but keeps it going."""
    cfg = PolicyConfig(max_draft_tokens=1, probe_interval=4, min_gain=1.15, keep_gain=1.05)

    def target(rows: int, width: int) -> float:  # a verify of 2 costs 1.7x a plain step
        return 0.010 * (1.0 if width == 1 else 1.7)

    def measured(policy: BatchPolicy) -> StepCosts:
        costs = policy.costs
        for w in (1, 2):
            for _ in range(8):
                costs.observe_target(1, w, target(1, w))
        for _ in range(8):
            costs.observe_draft(1, 1, 0.001)  # E(1) = 1.9 tokens / 18 ms ~ 1.06x plain
        costs.last_plain_step = costs.steps  # a plain step was just measured
        return costs

    rows = rows_of(1, 0.9, cap=1)
    start_plain = BatchPolicy(cfg, StepCosts(cfg))
    start_plain.switch.speculating = False
    measured(start_plain)
    assert [max(start_plain.choose(rows)) for _ in range(3)] == [0, 0, 0]
    keep_going = BatchPolicy(cfg, StepCosts(cfg))
    measured(keep_going)
    assert [max(keep_going.choose(rows)) for _ in range(3)] == [1, 1, 1]


def test_measured_steps_veto_speculation_the_model_overrates_and_the_veto_lapses():
    """The step model says speculation pays (an overhead-bound target), but whole steps as they
    ran say it does not: the policy goes plain at that batch size and stays there while the
    measurement holds; once the spec figure is stale the model decides again."""
    costs = StepCosts(CFG)
    policy = BatchPolicy(CFG, costs)
    rows = rows_of(4, 0.8)
    run_steps(policy, costs, rows, overhead_bound, 40)
    assert policy.speculating  # the model alone speculates here
    real = policy.realized
    for _ in range(4):
        real.observe(4, True, 8, 0.100)  # spec steps: 80 tok/s
        real.observe(4, False, 4, 0.025)  # plain steps: 160 tok/s
    assert real.veto(4) and not real.veto(16)  # per batch size
    chosen = run_steps(policy, costs, rows, overhead_bound, 30)
    assert chosen[0] == 0 and not policy.speculating
    assert not policy.would_speculate(rows)
    assert not policy.speculating
    assert sum(1 for k in chosen if k) <= 3  # probes only (every 4, 8, 16 plain steps)
    real.steps += real.stale_after + 1  # the spec figure grows stale
    assert not real.veto(4) and policy.would_speculate(rows)


def test_no_probes_where_even_a_perfect_draft_could_not_pay():
    """Compute-bound at 64 rows: k + 1 positions cost about k + 1 plain steps, so no acceptance
    could make speculation pay and a probe would only cost a padded step: none is run. With
    few rows on the same target the ceiling is high and probes (or speculation) come back."""
    costs = StepCosts(CFG)
    policy = BatchPolicy(CFG, costs)
    many = rows_of(64, 0.9)
    # Measured over a spread of loads first, so the line's slope is known.
    for rows in (1, 4, 16, 64):
        for w in (1, 2, 5):
            costs.observe_target(rows, w, compute_bound(rows, w))
    for b in (1, 4, 16, 64):
        costs.observe_draft(b, 2, 2 * draft_pass(b))
    chosen = run_steps(policy, costs, many, compute_bound, 200)
    assert not policy.speculating
    assert sum(1 for k in chosen if k) <= 1  # at most the first step, before it learned
    few = rows_of(1, 0.9)
    assert max(run_steps(policy, costs, few, compute_bound, 40)) > 0


# -- blocks that end early (a draft with a confidence stop) ------------------------------------


def stopping_row(draft: StoppingDraft) -> RowChoice:
    """A row whose acceptance model learnt from this draft's blocks (at the largest cap)."""
    acc = AcceptanceModel([0.5] * 8, 4.0, 5000.0)
    feed(acc, draft, cap=8, n=6000, seed=1)
    return RowChoice(8, "auto", [acc.expected_tokens(k) for k in range(9)], reach=acc.reach())


def simulate_step_rate(drafts, k: int, target, steps: int, seed: int) -> float:
    """Committed tokens per second of steps of cap k, drawn block by block (the oracle)."""
    rng = random.Random(seed)
    tokens = seconds = 0.0
    for _ in range(steps):
        longest = 0
        for d in drafts:
            length, accepted, _ = d.block(rng, k)
            tokens += accepted + 1
            longest = max(longest, length)
        seconds += target(len(drafts), longest + 1) + longest * draft_pass(len(drafts))
    return tokens / seconds


def trained_costs(target) -> StepCosts:
    costs = StepCosts(CFG, keep=1.0)
    for rows in (1, 2, 4, 8):
        for width in range(1, 10):
            costs.observe_target(rows, width, target(rows, width))
        costs.observe_draft(rows, 1, draft_pass(rows))
    return costs


def test_expected_passes_is_the_mean_longest_block():
    drafts = [StoppingDraft(c, 0.9, 0.5) for c in (0.3, 0.8, 0.5)]
    rows = [stopping_row(d) for d in drafts]
    rng = random.Random(0)
    n = 20000
    total = sum(max(d.block(rng, 6)[0] for d in drafts) for _ in range(n))
    assert expected_passes(rows, [6, 6, 6]) == pytest.approx(total / n, rel=0.02)
    assert expected_passes(rows_of(3, 0.8), [6, 2, 0]) == 6.0  # no stops: the widest k


SURE = StoppingDraft(c=0.55, p_sure=0.95, p_unsure=0.4)
SHAKY = StoppingDraft(c=0.3, p_sure=0.8, p_unsure=0.3)


@pytest.mark.parametrize("drafts", [[SURE], [SURE] * 4 + [SHAKY] * 4], ids=["1 row", "8 rows"])
def test_step_rates_of_early_ending_blocks_match_a_simulation(drafts):
    """The policy's tokens per second of a step of cap k, for every k, against steps drawn block
    by block; and its choice is the simulation's best cap. The target here is CPU-like: a
    wide verify costs much more than a plain step, so what a short block costs matters."""
    costs = trained_costs(compute_bound)
    policy = BatchPolicy(CFG, costs)
    rows = [stopping_row(d) for d in drafts]
    simulated = {k: simulate_step_rate(drafts, k, compute_bound, 20000, k) for k in range(1, 9)}
    for k in range(1, 9):
        assert policy._rate(rows, k) == pytest.approx(simulated[k], rel=0.03), k
    best = max(simulated, key=simulated.get)
    chosen = max(range(1, 9), key=lambda k: policy._rate(rows, k))
    assert simulated[chosen] >= 0.98 * simulated[best]


def test_realized_rates_are_tokens_over_seconds_not_a_mean_of_step_rates():
    """Steps alternate between a rejected block (1 token in 50 ms) and an accepted one (9 in
    150 ms): 50 tok/s is what they run at, where a mean of per-step rates says 40."""
    real = RealizedRates()
    for _ in range(200):
        real.observe(1, True, 1, 0.05)
        real.observe(1, True, 9, 0.15)
        real.observe(1, False, 1, 0.022)  # plain steps: 45 tok/s
    assert real.rate(1, True) == pytest.approx(50.0, rel=0.02)
    assert not real.veto(1)  # a mean of step rates would have vetoed speculation here
