"""The draft side of a step: one batched call per draft worker for its rows. No ray, no grpc.

Rows are bound to a draft worker (a lease from the pool) from their draft prefill on; each step
the rows that speculate are grouped by worker, and each group is one `propose_batch`. A worker
that fails or does not answer within `timeout_s` sends its rows to plain mode for that step (the
verify goes on without them); a row the worker refuses alone goes plain alone. Either way nothing
committed is lost, and the row's draft is re-prefilled later (policy.draft_retry_due).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from cluster.scheduling.observer import DRAFT_DOWN, DRAFT_SLOW
from cluster.scheduling.pipelining import ahead_hit
from cluster.scheduling.rows import Row, group_by_lease
from cluster.scheduling.worker_api import DraftPool
from workers.batch import PrefillRow, Proposal, ProposeRow
from workers.types import SparseQ

log = logging.getLogger(__name__)

Calls = list[tuple[list[Row], Future | None]]


class Drafting:
    def __init__(
        self,
        pool: DraftPool | None,
        *,
        timeout_s: float,
        max_draft_tokens: int,
        ahead_min_whole: float,
        name: str = "scheduler",
        features: bool = False,
    ) -> None:
        self.drafts = pool
        self.features = features  # the drafts read the target's features: none drafts ahead
        self.timeout_s = timeout_s
        self.max_draft_tokens = max_draft_tokens
        self.ahead_min_whole = ahead_min_whole
        self.name = name
        self.pending: list[_Pending] = []
        self.background = True  # draft work may overlap target passes (its own compute)
        self.hits = 0  # blocks drafted ahead and used / thrown away (all rows, for metrics)
        self.misses = 0

    def prefill(self, rows: Sequence[Row], wait: bool = True) -> Calls:
        """Bind each row to a draft worker and prefill it there (one call per worker); the
        caller waits with `settle_prefill`. `wait=False` (a prefill in the background): a
        draft whose first check has not answered is not waited for, since the batch would wait
        too; the row steps plain meanwhile, not counted as a draft failure, and asks again the
        next step it would speculate. Rows whose prefill the batch waits for anyway (seeded,
        mode ON) wait for the check too."""
        if self.drafts is None or not rows:
            return []
        for row in rows:
            if row.lease is None:
                row.lease = self.drafts.acquire(wait=wait)
                if row.lease is None and (wait or not self.drafts.checking()):
                    row.lose_draft(DRAFT_DOWN)  # none there; one being checked is no failure
        calls = []
        for group in group_by_lease(rows).values():
            side = group[0].lease.side
            try:
                fut = side.prefill_batch(
                    [PrefillRow(r.seq_id, r.rounds.tokens, r.params) for r in group]
                )
            except Exception:  # noqa: BLE001 - the draft is gone: plain mode
                fut = None
            calls.append(([r for r in group], fut))
        return calls

    def settle_prefill(self, calls: Calls) -> None:
        for group, fut in calls:
            results = self._results(fut, len(group))
            for row, res in zip(group, results, strict=True):
                if res is None:
                    row.draft_len = row.rounds.committed_len
                    row.features_sent = 0
                    row.ready = None
                    row.policy.draft_restored()
                else:
                    self.drop_lease(row)
                    row.lose_draft(loss_cause(res))

    def start_prefill(self, rows: Sequence[Row]) -> None:
        """Prefill in the background (`background`): the batch does not wait for it; until
        `poll` sees the answer the rows step plain, and the tokens they commit meanwhile reach
        the draft as lag. Otherwise prefill now and wait: where draft and target share cores a
        draft prefill beside a target pass slows that pass by more than it saves."""
        rows = [r for r in rows if not r.draft_pending]
        # A seeded row's steps must not depend on timing: its draft is there when it asks.
        at_once = [r for r in rows if not self.background or r.deterministic]
        if at_once:
            self.settle_prefill(self.prefill(at_once))
        rows = [r for r in rows if r not in at_once]
        if not rows:
            return
        now = time.monotonic()
        lens = {r.seq_id: r.rounds.committed_len for r in rows}
        for group, fut in self.prefill(rows, wait=False):
            for r in group:
                r.draft_pending = True
            leases = [r.lease for r in group]
            self.pending.append(_Pending(group, leases, [lens[r.seq_id] for r in group], fut, now))

    def poll(self, wait: bool = False) -> None:
        """Settle the background prefills that answered (all of them, waiting, when `wait`)."""
        now = time.monotonic()
        for p in list(self.pending):
            busy = p.fut is not None and not p.fut.done()
            if not busy or wait or now - p.started >= self.timeout_s:
                self._settle(p)

    def _settle(self, p: _Pending) -> None:
        self.pending.remove(p)
        results = self._results(p.fut, len(p.rows))
        for row, lease, n, res in zip(p.rows, p.leases, p.lens, results, strict=True):
            row.draft_pending = False
            if row.lease is not lease:  # the row left meanwhile: free what it made
                self._release_lease(row.seq_id, lease, held=res is None)
            elif res is None:
                row.draft_len = n
                row.features_sent = 0
                row.ready = None
                row.policy.draft_restored()
            else:
                self.drop_lease(row)
                row.lose_draft(loss_cause(res))

    def for_step(
        self, rows: Sequence[Row], ks: list[int], probing: bool, probe_rows: int
    ) -> list[int]:
        """The k each row runs with: rows chosen to speculate whose draft is not there yet get
        it prefilled (a probe a few rows, speculation all), in the background, stepping plain
        until it answers, or at once, speculating in this step (`background`)."""
        asked = list(ks)
        want: list[int] = []  # indices of rows whose draft prefill starts now
        for i, row in enumerate(rows):
            if ks[i] > 0 and (row.lease is None or row.draft_pending):
                ks[i] = 0
                if row.lease is None and not row.draft_pending and row.policy.draft_available:
                    want.append(i)
        if probing:
            pending = sum(1 for r in rows if r.draft_pending)
            want = want[: max(0, probe_rows - pending)]
        self.start_prefill([rows[i] for i in want])
        for i in want:
            if rows[i].lease is not None and not rows[i].draft_pending:
                ks[i] = asked[i]  # prefilled at once: it speculates now
        return ks

    def propose(self, rows: Sequence[Row], ks: Sequence[int]) -> DraftStep:
        """Proposals of the rows that speculate (rows whose draft fails go plain)."""
        proposals: dict[str, Proposal] = {}
        asks: list[tuple[Row, int]] = []
        for row, k in zip(rows, ks, strict=True):
            if k <= 0 or row.lease is None or row.draft_pending:
                row.ready = None
                continue
            ready, row.ready = row.ready, None
            if ready is not None and ready.start == row.rounds.committed_len and ready.tokens:
                proposals[row.seq_id] = trim(ready, k)
            else:
                asks.append((row, k))
        timed = all(
            row.rounds.committed_len - row.draft_len <= self.max_draft_tokens + 1 for row, _ in asks
        )
        calls = []
        by_key: dict[str, list[tuple[Row, int]]] = {}
        for row, k in asks:
            by_key.setdefault(row.lease.key, []).append((row, k))
        for group in by_key.values():
            reqs = [
                ProposeRow(
                    r.seq_id,
                    r.draft_len,
                    k,
                    r.lag(),
                    r.rounds.committed_len,
                    bytes(r.features[r.features_sent :]) if self.features else b"",
                )
                for r, k in group
            ]
            calls.append((group, self._call(group[0][0], lambda s, q=reqs: s.propose_batch(q))))
        passes = 0
        for group, fut in calls:
            results = self._results(fut, len(group))
            for (row, _k), res in zip(group, results, strict=True):
                if isinstance(res, Proposal) and res.tokens:
                    row.draft_len = row.rounds.committed_len
                    row.features_sent = len(row.features)
                    proposals[row.seq_id] = res
                    passes = max(passes, len(res.tokens))
                else:
                    self.lose(row, res)
        return DraftStep(proposals, len(asks), timed, passes)

    def ahead(self, rows: Sequence[Row], proposals: dict[str, Proposal], default: bool) -> Calls:
        """Pipelining: draft the guessed bonus plus the next block while the target verifies
        (not from features: the target has not seen the tokens it would need them of)."""
        if self.features:
            return []
        pick = []
        for row in rows:
            p = proposals.get(row.seq_id)
            want = row.request.pipelined
            if want is None or want == "auto":
                want = default
            if p is None or not want:
                continue
            k = len(p.tokens)
            if row.policy.acceptance.whole_block(k) < self.ahead_min_whole:
                continue
            pick.append(row)
        calls = []
        for group in group_by_lease(pick).values():
            reqs = []
            for r in group:
                p = proposals[r.seq_id]
                reqs.append(
                    ProposeRow(
                        r.seq_id, r.draft_len, len(p.tokens) + 1, (), p.start + len(p.tokens)
                    )
                )
            calls.append((group, self._call(group[0], lambda s, q=reqs: s.propose_batch(q))))
        return calls

    def settle_ahead(self, calls: Calls, proposals: dict[str, Proposal], verdicts, rows) -> None:
        verdict_of = {r.seq_id: v for r, v in zip(rows, verdicts, strict=True)}
        for group, fut in calls:
            results = self._results(fut, len(group))
            for row, res in zip(group, results, strict=True):
                if not isinstance(res, Proposal):
                    self.lose(row, res)
                    continue
                verdict = verdict_of.get(row.seq_id)
                if row.rounds.finished or isinstance(verdict, BaseException):
                    continue
                hit = ahead_hit(proposals[row.seq_id], verdict, res)
                stats = row.rounds.stats
                if hit is not None:
                    stats.pipeline_hits += 1
                    self.hits += 1
                    row.ready = hit
                else:
                    stats.pipeline_misses += 1
                    self.misses += 1

    def _call(self, row: Row, call) -> Future | None:
        try:
            return call(row.lease.side)
        except Exception:  # noqa: BLE001 - any transport error means: no draft now
            return None

    def _results(self, fut: Future | None, n: int) -> list:
        if fut is None:
            return [RuntimeError("draft call failed")] * n
        try:
            return fut.result(timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - failure or timeout: plain mode, no token lost
            return [exc] * n

    def lose(self, row: Row, exc: object) -> None:
        log.debug("%s: %s loses its draft (%s)", self.name, row.seq_id, exc)
        self.drop_lease(row)
        row.lose_draft(loss_cause(exc))

    def drop_lease(self, row: Row) -> None:
        lease, row.lease = row.lease, None
        if row.draft_pending:  # its prefill answers first (a release must not overtake it)
            self._settle(next(p for p in self.pending if row in p.rows))
        elif lease is not None:
            self._release_lease(row.seq_id, lease, held=True)

    def _release_lease(self, seq_id: str, lease, *, held: bool) -> None:
        if held:
            try:
                lease.side.release(seq_id)
            except Exception:  # noqa: BLE001 - a dead draft holds nothing any more
                pass
        self.drafts.release(lease)


@dataclass(frozen=True, slots=True)
class DraftStep:
    """What the draft side of a step made: `proposals` by sequence; `drafted`: rows drafted
    now (not ahead), `passes` the draft forwards that took (blocks may end before k: a
    confidence stop); `timed`: its times are typical."""

    proposals: dict[str, Proposal]
    drafted: int
    timed: bool
    passes: int


@dataclass(slots=True)
class _Pending:
    """A background draft prefill: the rows, their leases and committed lengths when sent."""

    rows: list[Row]
    leases: list
    lens: list[int]
    fut: Future | None
    started: float


def loss_cause(exc: object) -> str:
    """Why a draft call failed, as the fallback metrics name it."""
    return DRAFT_SLOW if isinstance(exc, TimeoutError) else DRAFT_DOWN


def trim(p: Proposal, k: int) -> Proposal:
    """The first k tokens of a block (the draft went on after them: not unsure of the last)."""
    if len(p.tokens) <= k:
        return p
    q = None if p.q is None else SparseQ(p.q.indices[:k], p.q.probs[:k])
    return Proposal(p.start, p.tokens[:k], q)
