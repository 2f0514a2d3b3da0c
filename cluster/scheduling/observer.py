"""What a step scheduler tells an observer (metrics, in the cluster): one record per target
pass, every speculative round, every prefill, and every row that falls back from speculation to
plain steps with why. Pure: the scheduler calls these on its own thread and the default observer
does nothing; cluster/observability turns them into metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# Why a row that speculated in its previous pass takes a plain step now.
LOW_ACCEPTANCE = "low_acceptance"  # its own policy (alone in the batch, or deciding alone)
LOAD = "load"  # the batch policy at a batch of > 1 rows: verifying costs more than it saves
DRAFT_DOWN = "draft_down"  # its draft worker failed or none was free
DRAFT_SLOW = "draft_slow"  # its draft worker did not answer within draft_timeout_s
NO_MATCH = "no_match"  # a lookup-only row whose text offers no continuation now


@dataclass(frozen=True, slots=True)
class StepRecord:
    rows: int  # rows in the target pass
    plain_rows: int  # of those, rows taking a plain step
    draft_seconds: float  # the step's propose calls to the draft pool (the target idle)
    drafted: int  # rows whose block was asked of the draft pool in this step (not ahead)
    verify_seconds: float  # the batched target call, issue to answer
    step_seconds: float  # draft, verify, commit


class SchedulerObserver(Protocol):
    def step(self, record: StepRecord) -> None: ...

    def round(self, drafter: str, proposed: int, accepted: int) -> None: ...

    def prefill(self, rows: int, seconds: float) -> None: ...

    def fallback(self, cause: str) -> None: ...

    def pipeline(self, hits: int, misses: int) -> None: ...


class NoObserver:
    """The default: nothing is recorded."""

    def step(self, record: StepRecord) -> None:
        pass

    def round(self, drafter: str, proposed: int, accepted: int) -> None:
        pass

    def prefill(self, rows: int, seconds: float) -> None:
        pass

    def fallback(self, cause: str) -> None:
        pass

    def pipeline(self, hits: int, misses: int) -> None:
        pass
