"""What both policies are configured by: the speculation mode a request asks for (`SpecMode`) and
the thresholds, priors and limits of choosing k (`PolicyConfig`). Pure.

The policies themselves: `batch_policy` (k for the rows the batch decides, priced by measured step
times), `row_policy` (a row's acceptance; k for the rows that decide alone, priced by the cost
priors), `switching` (the hysteresis and probes both use).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cluster.scheduling.lookup import LookupConfig


class SpecMode(enum.Enum):
    AUTO = "auto"  # adaptive: speculate while it pays, plain otherwise
    ON = "on"  # always speculate (unless the draft is unavailable)
    OFF = "off"  # plain decoding on the target only


class Drafter(enum.Enum):
    """What proposes a row's blocks. Rows with different drafters share one target pass."""

    AUTO = "auto"  # each step, lookup where a match promises more, the draft model otherwise
    MODEL = "model"  # the draft pool's model only
    LOOKUP = "lookup"  # continuations found in text already seen only (no draft model)

    @property
    def uses_model(self) -> bool:
        return self is not Drafter.LOOKUP

    @property
    def uses_lookup(self) -> bool:
        return self is not Drafter.MODEL


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
    prior_acceptance: float = 0.6  # per drafted token, before anything is measured
    acceptance_window: float = 10.0  # rounds: older acceptance observations fade over this many
    prior_strength: float = 4.0  # a new sequence's prior (the deployment's rates) counts this much
    # Costs relative to one plain target step: what a row that decides its k alone prices its
    # rounds by (seeded sampling: no decision may depend on timing). The verify slope is also the
    # step-cost fit's prior while a single pass width has been measured.
    draft_cost_prior: float = 0.25  # one draft step
    verify_cost_per_token_prior: float = 0.1  # a verify of k costs 1 + k * this
    drafter: Drafter = Drafter.AUTO  # a request that does not choose gets this one
    lookup: LookupConfig = field(default_factory=LookupConfig)

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
        if not 0 <= self.prior_acceptance < 1:
            raise ValueError(f"prior_acceptance must be in [0, 1), got {self.prior_acceptance}")
        if self.acceptance_window < 1:
            raise ValueError(f"acceptance_window must be >= 1, got {self.acceptance_window}")
        if self.prior_strength <= 0:
            raise ValueError(f"prior_strength must be > 0, got {self.prior_strength}")
        if self.draft_cost_prior <= 0 or self.verify_cost_per_token_prior < 0:
            raise ValueError("draft_cost_prior must be > 0 and verify_cost_per_token_prior >= 0")
