"""Speculate or take plain steps: the hysteresis and probes both policies use. Pure.

In speculative mode a policy stays while speculation is predicted to beat plain decoding by
`keep_gain`; from plain mode it comes back only at `min_gain` (the larger: a mispredicted gain
must not turn into a loss, nor the mode flap). While plain it probes one speculative step after
`probe_interval` plain steps, so acceptance and draft costs are measured again; each probe that
does not bring speculation back doubles the interval (up to `max_probe_interval`), and coming
back resets it.
"""

from __future__ import annotations

from cluster.scheduling.policy import PolicyConfig


class SpecSwitch:
    """The mode of one policy and its probe schedule; the policy says when a probe failed."""

    __slots__ = (
        "keep_gain",
        "min_gain",
        "base_interval",
        "max_interval",
        "speculating",
        "switches",
        "plain_steps",
        "probe_interval",
    )

    def __init__(self, config: PolicyConfig, speculating: bool = True) -> None:
        self.keep_gain = config.keep_gain
        self.min_gain = config.min_gain
        self.base_interval = config.probe_interval
        self.max_interval = config.max_probe_interval
        self.speculating = speculating
        self.switches = 0  # spec -> plain and back, for stats and tests
        self.plain_steps = 0  # plain steps counted since the latest probe or switch to plain
        self.probe_interval = config.probe_interval

    def pays(self, spec_rate: float, plain_rate: float) -> bool:
        """Whether speculation's rate beats plain's by enough to stay (in speculative mode) or
        to come back (in plain mode)."""
        gain = self.keep_gain if self.speculating else self.min_gain
        return spec_rate >= gain * plain_rate

    def to_plain(self) -> None:
        self.speculating = False
        self.switches += 1
        self.plain_steps = 0

    def to_spec(self) -> None:
        self.speculating = True
        self.switches += 1
        self.probe_interval = self.base_interval

    def probe_due(self) -> bool:
        """Whether the plain steps counted call for a probe now (the count then starts again)."""
        if self.plain_steps < self.probe_interval:
            return False
        self.plain_steps = 0
        return True

    def back_off(self) -> None:
        """A probe that did not pay (or will not): wait twice as long for the next."""
        self.probe_interval = min(self.probe_interval * 2, self.max_interval)
