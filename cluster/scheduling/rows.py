"""One sequence as the step scheduler holds it: its committed state, its policy, its draft.

A `Row` carries everything that survives a move to another target replica (the committed tokens
in `rounds`, the policy's acceptance, the stats), so a failover re-prefills the committed tokens
on another scheduler's target and goes on. The consumer side (router, engine) talks to it only
through `RowSink` and `cancel()`. No ray, no grpc.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cluster.scheduling.lookup import RowLookup
from cluster.scheduling.observer import DRAFT_DOWN, LOAD, LOW_ACCEPTANCE, NO_MATCH
from cluster.scheduling.policy import Drafter, SpecMode
from cluster.scheduling.rounds import FinishReason, SequenceRounds
from cluster.scheduling.row_policy import RowPolicy
from cluster.scheduling.worker_api import DraftLease
from workers.batch import Proposal
from workers.types import SamplingParams, TokenLogprob


class RowSink(Protocol):
    """Where a row's output goes. Called on the scheduler thread: must not block."""

    # `logprobs`: one per token when the row asked for them (SamplingParams.logprobs), else ().
    def tokens(self, tokens: list[int], logprobs: tuple[TokenLogprob, ...] = ()) -> None: ...

    def finished(self) -> None: ...  # rounds.finish_reason is set; the row is released

    def failed(self, exc: BaseException) -> None: ...  # the row ended with an error


@dataclass(frozen=True, slots=True)
class RowRequest:
    """What a caller asks for; the scheduler makes the row's policy from it on admission."""

    mode: SpecMode = SpecMode.AUTO
    k: int | None = None  # None: adaptive
    pipelined: bool | str | None = None  # None: the scheduler's default (drafting reads it)
    drafter: Drafter | None = None  # None: the scheduler's default


class Row:
    def __init__(
        self,
        seq_id: str,
        rounds: SequenceRounds,
        params: SamplingParams,
        sink: RowSink,
        request: RowRequest = RowRequest(),
    ) -> None:
        self.seq_id = seq_id
        self.rounds = rounds
        self.params = params
        self.sink = sink
        self.request = request
        self.policy: RowPolicy | None = None  # made on admission, on the scheduler thread
        # One of n samples of a prompt: the seq_id of the first, whose prefill this row copies
        # when both are admitted in the same step (then cleared: a re-prefill computes).
        self.fork_of: str | None = None
        # The last `resumed` prompt tokens are the request's own output (a sequence an ingress
        # moved here): the target's penalties, min_tokens and grammar count them as output.
        self.resumed = 0
        # The target's log-probabilities of the prompt (after its first token), when the
        # params asked: set by the first prefill, before the row's first tokens go out.
        self.prompt_logprobs: tuple = ()
        # The tokens the row's grammar forces next, as the target said with its last answer:
        # the row's next block (cluster/scheduling/lookup_drafting.forced_blocks).
        self.forced: tuple[int, ...] = ()
        self.drafter: Drafter = request.drafter or Drafter.AUTO  # the scheduler's, on admission
        self.lookup: RowLookup | None = None  # its own text indexed, when it drafts by lookup
        self.lease: DraftLease | None = None  # the draft worker holding this row's draft state
        self.draft_len = 0  # committed tokens the draft holds (0: none)
        self.draft_pending = False  # a background draft prefill is on its way
        self.ready: Proposal | None = None  # drafted ahead and confirmed: the next block
        # A feature draft's input (scheduler.draft_features): the target's packed features of
        # every committed position but the last, as they came; the draft holds the first
        # `features_sent` bytes of them.
        self.features = bytearray()
        self.features_sent = 0
        self.on_target = False  # the current target holds the committed tokens
        self.target_failovers = 0
        self.speculated = False  # its previous target pass verified a draft (for fallbacks)
        self.draft_loss = DRAFT_DOWN  # why its draft went last (DRAFT_DOWN or DRAFT_SLOW)
        self.home: Any = None  # the router's record of the target the row runs on
        self.tried: set[str] = set()  # targets that failed this row
        self._cancel = threading.Event()
        self.released = threading.Event()  # set once the scheduler let go of the row

    @property
    def mode(self) -> SpecMode:
        return self.request.mode

    @property
    def deterministic(self) -> bool:
        """Seeded sampling: every decision must depend on this row alone (it repeats exactly)."""
        return self.params.seed is not None and not self.params.greedy

    def cancel(self) -> None:
        """The consumer is gone (or matched a stop string): leave the batch at the next step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def lag(self) -> list[int]:
        """Committed tokens the draft has not been told yet (sent with its next call)."""
        return self.rounds.tokens_from(self.draft_len)

    def passed(self, plain: bool, alone: bool) -> str | None:
        """A target pass of this row (plain or not, alone in the batch or not): why it fell
        back from speculation to a plain step, when it did (observer's causes), else None."""
        was, self.speculated = self.speculated, not plain
        if not was or not plain:
            return None
        if not self.drafter.uses_model:
            return NO_MATCH
        if not self.policy.draft_available:
            return self.draft_loss
        return LOW_ACCEPTANCE if alone or self.deterministic else LOAD

    def lose_draft(self, cause: str = DRAFT_DOWN) -> None:
        """Plain mode at once; nothing committed is lost. A re-prefill is tried later."""
        self.draft_loss = cause
        self.rounds.stats.draft_failures += 1
        self.ready = None
        self.draft_len = 0
        self.features_sent = 0
        if self.policy is not None:
            self.policy.draft_failed()

    def finish_cancelled(self) -> None:
        self.rounds.cancel()

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.rounds.finish_reason


def group_by_lease(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Rows of each draft worker (one batched call per worker per step)."""
    out: dict[str, list[Row]] = {}
    for r in rows:
        if r.lease is not None:
            out.setdefault(r.lease.key, []).append(r)
    return out
