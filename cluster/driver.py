"""Drives one sequence through draft->verify rounds, pipelined, over any transport.

The driver talks to a draft and a target through two small protocols whose calls return futures;
the in-process engine implements them with a thread, the router with gRPC. So there is one round
logic (this file, `SequenceRounds` and `SpeculationPolicy`) and two transports.

Pipelining: while the target verifies block i, the draft is already asked for block i+1, on the
guess that block i is accepted whole and that the target's bonus token equals the draft's own next
token. The draft therefore proposes k+1 tokens ahead: the guessed bonus, then the next block. When
the guess holds the next block is ready the moment verification returns (a pipeline hit); otherwise
the draft rolls back to the committed tokens with the next call (a miss). Never more than one block
ahead. Whether a round drafts ahead is the policy's call (`policy.pipelined`: fixed, or chosen by
measured round times). Every propose names the position it drafts from (`start`), so a draft
whose speculative tail is longer than expected (a block cut short, a late answer) is trimmed
instead of drafting past it.

Faults: a draft that fails or times out sends the sequence to plain mode at once (nothing committed
is lost or recomputed); a later re-prefill brings a draft back. A target that is gone (the transport
raises `WorkerUnavailable`, or the target no longer knows the sequence, or it does not answer within
`target_timeout_s`) is replaced through the `target_failover` callback: the committed tokens are
re-prefilled on the new target and the sequence goes on; with no target left the driver raises
`TargetUnavailable`. No ray, no grpc.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from cluster.policy import SpeculationPolicy
from cluster.rounds import SequenceRounds
from workers.draft import Proposal
from workers.errors import UnknownSequenceError
from workers.sampling import SamplingParams
from workers.verification import SparseQ, Verdict


class DraftSide(Protocol):
    def prefill(self, seq_id: str, token_ids: list[int], params: SamplingParams) -> Future: ...

    def propose(
        self,
        seq_id: str,
        committed_len: int,
        k: int,
        commit: Sequence[int] = (),
        start: int | None = None,
    ) -> Future: ...  # Future[Proposal]; see DraftWorker.propose

    def release(self, seq_id: str) -> None: ...


class TargetSide(Protocol):
    def prefill(self, seq_id: str, token_ids: list[int], params: SamplingParams) -> Future: ...

    def verify(
        self, seq_id: str, committed_len: int, draft_tokens: list[int], q: SparseQ | None
    ) -> Future: ...  # Future[Verdict]

    def plain_step(self, seq_id: str, committed_len: int) -> Future: ...  # Future[int]

    def release(self, seq_id: str) -> None: ...


class DraftUnavailable(Exception):
    """The draft failed or timed out; the sequence goes on in plain mode."""


class WorkerUnavailable(Exception):
    """Raised by a transport (through its futures) when a worker is gone or did not answer in
    time, as opposed to the worker's own refusals (stale, unknown sequence, bad input)."""


class TargetUnavailable(Exception):
    """The target failed and no other target could take the sequence over."""


class _TargetLost(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _is_target_loss(exc: BaseException) -> bool:
    # TimeoutError: concurrent.futures' result(timeout=...) raises the builtin in 3.11.
    return isinstance(exc, WorkerUnavailable | UnknownSequenceError | TimeoutError)


# (failed target, the error) -> a target that has not seen the sequence, or None: no other left.
TargetFailover = Callable[[TargetSide, BaseException], "TargetSide | None"]


@dataclass(frozen=True, slots=True)
class DriverOptions:
    draft_timeout_s: float = 10.0  # a draft slower than this is treated as gone
    target_timeout_s: float | None = None


class RoundDriver:
    """One sequence's loop. `step()` makes one target pass; `run()` iterates to the end."""

    def __init__(
        self,
        seq_id: str,
        rounds: SequenceRounds,
        policy: SpeculationPolicy,
        draft: DraftSide | None,
        target: TargetSide,
        params: SamplingParams,
        options: DriverOptions = DriverOptions(),
        clock: Callable[[], float] = time.perf_counter,
        target_failover: TargetFailover | None = None,
    ) -> None:
        self.seq_id = seq_id
        self.rounds = rounds
        self.policy = policy
        self.draft = draft
        self.target = target
        self.params = params
        self.options = options
        self.clock = clock
        self.target_failover = target_failover
        self.target_failovers = 0  # times the sequence moved to another target
        self._draft_len = 0  # committed tokens the draft holds (0: no draft state)
        self._ready: Proposal | None = None  # a pipeline hit: next block, already drafted
        if draft is None:
            policy.draft_failed()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Prefill target and draft in parallel. A failing draft only means plain mode."""
        tokens = self.rounds.tokens
        lost: _TargetLost | None = None
        try:
            target_f = self._target_submit(lambda t: t.prefill(self.seq_id, tokens, self.params))
        except _TargetLost as exc:
            target_f, lost = None, exc
        draft_f = None
        if self.draft is not None and self.policy.draft_available:
            try:
                draft_f = self._call_draft(lambda d: d.prefill(self.seq_id, tokens, self.params))
            except DraftUnavailable:
                self._lose_draft()
        if target_f is not None:
            try:
                self._target_wait(target_f)
            except _TargetLost as exc:
                lost = exc
        if lost is not None:
            self._fail_over(lost.cause)
        if draft_f is not None:
            self._settle_prefill(draft_f, len(tokens))

    def run(self) -> Iterator[list[int]]:
        if not self.rounds.finished:
            self.start()
        while not self.rounds.finished:
            out = self.step()
            if out:
                yield out

    def close(self) -> None:
        """Free the sequence on both sides (also after errors and cancellation)."""
        self._ready = None
        for side in (self.target, self.draft):
            if side is not None:
                try:
                    side.release(self.seq_id)
                except Exception:  # noqa: BLE001 - a dead worker has nothing left to free
                    pass

    # -- one target pass ----------------------------------------------------------------------

    def step(self) -> list[int]:
        """One target pass; returns the tokens it committed (none after a target failover)."""
        try:
            return self._step()
        except _TargetLost as lost:
            self._fail_over(lost.cause)
            return []

    def _step(self) -> list[int]:
        if self.policy.draft_retry_due():
            self._reprefill_draft()
        k = self.rounds.block_size(self.policy.next_k())
        if k > 0:
            try:
                return self._spec_round(k)
            except DraftUnavailable:
                self._lose_draft()
        return self._plain_step()

    def _plain_step(self) -> list[int]:
        self._ready = None  # a drafted-ahead block no longer starts at the committed length
        t0 = self.clock()
        committed = self.rounds.committed_len
        token = self._target_wait(
            self._target_submit(lambda t: t.plain_step(self.seq_id, committed))
        )
        self.policy.observe_plain(self.clock() - t0)
        return self.rounds.on_plain(token)

    def _spec_round(self, k: int) -> list[int]:
        committed = self.rounds.committed_len
        t0 = self.clock()
        proposal = self._take_ready(k)
        draft_seconds = 0.0  # a pipeline hit's block was drafted while the target worked
        # A draft that first catches up on many committed tokens (after plain steps) makes an
        # untypical round: its acceptance counts, its times do not.
        timed = True
        if proposal is None:
            timed = self.rounds.committed_len - self._draft_len <= self._max_lag()
            proposal = self._draft_result(
                self._call_draft(
                    lambda d: d.propose(self.seq_id, self._draft_len, k, self._lag(), committed)
                )
            )
            self._draft_len = committed
            draft_seconds = self.clock() - t0
        if not proposal.tokens:  # the draft is at its context limit
            raise DraftUnavailable("draft proposed nothing")
        t1 = self.clock()
        verify_f = self._target_submit(
            lambda t: t.verify(self.seq_id, committed, proposal.tokens, proposal.q)
        )
        ahead_f = None
        draft_lost = False
        if self.policy.pipelined:
            # Guess: the whole block is accepted; draft the bonus guess plus the next block.
            ahead_start = committed + len(proposal.tokens)
            try:
                ahead_f = self._call_draft(
                    lambda d: d.propose(
                        self.seq_id, self._draft_len, k + 1, self._lag(), ahead_start
                    )
                )
                self._draft_len = committed
            except DraftUnavailable:
                draft_lost = True  # settle after the verify in flight; never drop its result
        try:
            verdict: Verdict = self._target_wait(verify_f)
        except _TargetLost:
            if ahead_f is not None:  # let the draft settle before anyone calls it again
                try:
                    self._draft_result(ahead_f)
                except DraftUnavailable:
                    self._lose_draft()
            raise
        verify_seconds = self.clock() - t1
        out = self.rounds.on_round(proposal.tokens, verdict.accepted, verdict.token)
        if draft_lost:
            self._lose_draft()
        elif ahead_f is not None and not self.rounds.finished:
            self._settle_ahead(ahead_f, proposal, verdict)
        # The round's price is its wall time up to the next round being ready: with pipelining
        # that includes waiting for the block drafted ahead.
        self.policy.observe_round(
            len(proposal.tokens),
            verdict.accepted,
            draft_seconds,
            verify_seconds,
            self.clock() - t0,
            timed=timed,
        )
        return out

    def _max_lag(self) -> int:
        """Committed tokens a draft is behind in steady spec mode: at most a whole block + 1."""
        return self.policy.config.max_draft_tokens + 1

    # -- pipelining ---------------------------------------------------------------------------

    def _settle_ahead(self, ahead_f: Future, proposal: Proposal, verdict: Verdict) -> None:
        stats = self.rounds.stats
        try:
            ahead: Proposal = self._draft_result(ahead_f)
        except DraftUnavailable:
            self._lose_draft()
            return
        whole = verdict.accepted == len(proposal.tokens)
        at_bonus = ahead.start == proposal.start + len(proposal.tokens)
        if whole and at_bonus and len(ahead.tokens) > 1 and ahead.tokens[0] == verdict.token:
            stats.pipeline_hits += 1
            q = None if ahead.q is None else SparseQ(ahead.q.indices[1:], ahead.q.probs[1:])
            self._ready = Proposal(ahead.start + 1, ahead.tokens[1:], q)
        else:
            stats.pipeline_misses += 1

    def _take_ready(self, k: int) -> Proposal | None:
        ready, self._ready = self._ready, None
        if ready is None:
            return None
        if ready.start != self.rounds.committed_len:  # cannot happen unless state drifted
            return None
        if len(ready.tokens) > k:
            q = None if ready.q is None else SparseQ(ready.q.indices[:k], ready.q.probs[:k])
            ready = Proposal(ready.start, ready.tokens[:k], q)
        return ready

    def _lag(self) -> list[int]:
        """Committed tokens the draft has not been told yet (sent with its next call)."""
        return self.rounds.tokens_from(self._draft_len)

    # -- target failures ----------------------------------------------------------------------

    def _target_submit(self, call: Callable[[TargetSide], Future]) -> Future:
        try:
            return call(self.target)
        except Exception as exc:
            if _is_target_loss(exc):
                raise _TargetLost(exc) from exc
            raise

    def _target_wait(self, fut: Future):
        try:
            return fut.result(timeout=self.options.target_timeout_s)
        except Exception as exc:
            if _is_target_loss(exc):
                raise _TargetLost(exc) from exc
            raise

    def _fail_over(self, cause: BaseException) -> None:
        """Move the sequence to another target: re-prefill the committed tokens there. The draft
        keeps its state (it only ever holds committed tokens plus a speculative tail)."""
        self._ready = None
        while True:
            new = self.target_failover(self.target, cause) if self.target_failover else None
            if new is None:
                raise TargetUnavailable(
                    f"target worker failed ({cause}) and no other target worker is available"
                ) from cause
            old, self.target = self.target, new
            if old is not new:
                try:
                    old.release(self.seq_id)
                except Exception:  # noqa: BLE001 - it is gone, or lost the sequence already
                    pass
            tokens = self.rounds.tokens
            try:
                self._target_wait(
                    self._target_submit(
                        lambda t, toks=tokens: t.prefill(self.seq_id, toks, self.params)
                    )
                )
            except _TargetLost as lost:
                cause = lost.cause
                continue
            self.target_failovers += 1
            return

    # -- draft failures -----------------------------------------------------------------------

    def _call_draft(self, call: Callable[[DraftSide], Future]) -> Future:
        if self.draft is None:
            raise DraftUnavailable("no draft")
        try:
            return call(self.draft)
        except Exception as exc:  # noqa: BLE001 - any transport error means: no draft now
            raise DraftUnavailable(str(exc)) from exc

    def _draft_result(self, fut: Future):
        try:
            return fut.result(timeout=self.options.draft_timeout_s)
        except Exception as exc:  # noqa: BLE001 - failure or timeout: plain mode, no token lost
            raise DraftUnavailable(str(exc)) from exc

    def _settle_prefill(self, fut: Future, length: int) -> None:
        try:
            self._draft_result(fut)
            self._draft_len = length
            self.policy.draft_restored()
        except DraftUnavailable:
            self._lose_draft()

    def _lose_draft(self) -> None:
        self.rounds.stats.draft_failures += 1
        self._ready = None
        self._draft_len = 0
        self.policy.draft_failed()

    def _reprefill_draft(self) -> None:
        """Bring a (possibly new) draft up to the committed tokens and resume spec mode."""
        if self.draft is None:
            return
        tokens = self.rounds.tokens
        try:
            fut = self._call_draft(lambda d: d.prefill(self.seq_id, tokens, self.params))
        except DraftUnavailable:
            self._lose_draft()
            return
        self._settle_prefill(fut, len(tokens))
