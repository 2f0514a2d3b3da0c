"""What the round driver tells the policy: a round's wall time up to the next round ready, and
no times for a round whose draft first caught up on many tokens.

Fake workers answer at once and a fake clock advances by what each call "costs", so the seconds
the driver measures are known exactly.
"""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from cluster.driver import DriverOptions, RoundDriver
from cluster.policy import PolicyConfig, SpecMode, SpeculationPolicy
from cluster.rounds import SequenceRounds, StopConditions
from workers.draft import Proposal
from workers.sampling import SamplingParams
from workers.verification import Verdict

DRAFT_STEP, VERIFY, PLAIN, PROMPT = 0.1, 1.0, 1.0, [1, 2, 3]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class LazyFuture(Future):
    """A future whose work (advancing the clock) runs when the driver waits for it, like a
    remote call whose time passes while the caller blocks on the result."""

    def __init__(self, clock: Clock, seconds: float, value) -> None:
        super().__init__()
        self.clock, self.seconds, self.value = clock, seconds, value

    def result(self, timeout=None):
        if not self.done():
            self.clock.now += self.seconds
            self.set_result(self.value)
        return super().result(timeout)


class Draft:
    """Always proposes token 7; catching up costs a step per lagging token."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.lags: list[int] = []

    def prefill(self, seq_id, token_ids, params):
        return LazyFuture(self.clock, 0.0, None)

    def propose(self, seq_id, committed_len, k, commit=(), start=None):
        self.lags.append(len(commit))
        cost = DRAFT_STEP * (k + len(commit))
        return LazyFuture(self.clock, cost, Proposal(start, [7] * k, None))

    def release(self, seq_id):
        pass


class Target:
    """Accepts every draft token (the bonus is 7 too); plain steps give 7."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def prefill(self, seq_id, token_ids, params):
        return LazyFuture(self.clock, 0.0, None)

    def verify(self, seq_id, committed_len, draft_tokens, q):
        return LazyFuture(self.clock, VERIFY, Verdict(len(draft_tokens), 7, True))

    def plain_step(self, seq_id, committed_len):
        return LazyFuture(self.clock, PLAIN, 7)

    def release(self, seq_id):
        pass


class Recorder(SpeculationPolicy):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.rounds_seen: list[tuple] = []

    def observe_round(self, k, accepted, draft_s, verify_s, round_s=None, *, timed=True):
        self.rounds_seen.append((k, accepted, draft_s, verify_s, round_s, timed))
        super().observe_round(k, accepted, draft_s, verify_s, round_s, timed=timed)


def make_driver(pipelined: bool, k: int = 4, mode: SpecMode = SpecMode.ON):
    clock = Clock()
    policy = Recorder(PolicyConfig(num_draft_tokens=k, pipelined=pipelined), mode)
    driver = RoundDriver(
        "s",
        SequenceRounds(PROMPT, StopConditions(max_new_tokens=100)),
        policy,
        Draft(clock),
        Target(clock),
        SamplingParams(),
        DriverOptions(),
        clock=clock,
    )
    driver.start()
    return driver, policy, clock


def test_a_serial_round_costs_its_draft_plus_its_verify():
    driver, policy, _ = make_driver(pipelined=False)
    driver.step()
    k, accepted, draft_s, verify_s, round_s, timed = policy.rounds_seen[-1]
    assert (k, accepted, timed) == (4, 4, True)
    assert draft_s == pytest.approx(4 * DRAFT_STEP) and verify_s == pytest.approx(VERIFY)
    assert round_s == pytest.approx(4 * DRAFT_STEP + VERIFY)


def test_a_pipelined_round_includes_waiting_for_the_block_drafted_ahead():
    driver, policy, _ = make_driver(pipelined=True)
    driver.step()  # the first block is drafted in the open, the next one ahead
    driver.step()  # a pipeline hit: no drafting before the verify
    k, accepted, draft_s, verify_s, round_s, _ = policy.rounds_seen[-1]
    assert driver.rounds.stats.pipeline_hits >= 1 and draft_s == 0.0
    # The fakes run one at a time, so the ahead block (5 tokens + 5 lagging) is all exposed.
    assert round_s == pytest.approx(VERIFY + DRAFT_STEP * (5 + 5))
    assert round_s > draft_s + verify_s


def test_a_probe_after_plain_steps_times_nothing():
    driver, policy, _ = make_driver(pipelined=False, mode=SpecMode.AUTO)
    driver.step()
    policy._to_plain()  # AUTO fell back to plain decoding (say, after a bad stretch)
    while len(policy.rounds_seen) == 1:  # plain steps until the policy probes spec mode
        driver.step()
    assert driver.rounds.stats.plain_steps == policy.config.probe_interval
    assert driver.draft.lags[-1] > policy.config.max_draft_tokens + 1  # it caught up first
    assert policy.rounds_seen[-1][-1] is False
    assert policy.shared.round[(4, False)].value == pytest.approx(4 * DRAFT_STEP + VERIFY)
    assert policy.speculating  # the probe paid (~3 tokens expected per 1.4 s vs 1 per s)
    driver.step()
    assert policy.rounds_seen[-1][-1] is True
