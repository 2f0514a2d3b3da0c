"""The step scheduler of one target replica: continuous batching with speculation.

Exactly one scheduler drives a target replica's batch. Each step:

1. admit waiting rows (one batched prefill on the target, one per draft worker, in parallel;
   at most `prefill_tokens_per_step` prompt tokens a step, so a burst of long prompts does not
   stall the running rows for long; the target's prefill pass decodes each row's first token,
   committed and streamed at once as a plain step);
2. choose each row's k (`BatchPolicy`: the batch's committed tokens per second, from measured
   step times; a seeded row decides alone, `RowPolicy`; k = 0 is a plain step, and plain and
   speculative rows share one target pass);
3. one batched propose per draft worker for its speculating rows, in parallel;
4. one batched verify on the target for every row (pipelined: while it runs, the drafts already
   draft the next block for the rows expected to accept theirs whole);
5. commit each row, stream its tokens out, release the rows that finished or were cancelled.

Rows join and leave between steps. A failing row fails alone: a draft worker that is gone sends
its rows to plain mode in the same step (nothing lost or recomputed, a re-prefill later brings them
back); a target that is gone hands every row to `on_target_lost` (the router re-prefills them on
another replica's scheduler). The transport is anything with the `BatchTarget` / `BatchDraft`
calls (cluster/scheduling/worker_api.py): threads in process, gRPC in the cluster. The thread the
steps run on and the inbox rows arrive through are step_loop's. No ray, no grpc.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from cluster.scheduling.admission import plan_admissions
from cluster.scheduling.batch_policy import BatchPolicy, row_choices
from cluster.scheduling.drafting import Drafting
from cluster.scheduling.lookup_drafting import (
    GRAMMAR,
    LOOKUP,
    LookupBlock,
    LookupDrafting,
    forced_blocks,
)
from cluster.scheduling.observer import NoObserver, SchedulerObserver, StepRecord
from cluster.scheduling.pipelining import PipeliningChoice
from cluster.scheduling.policy import PolicyConfig, SpecMode
from cluster.scheduling.rounds import add_rounds
from cluster.scheduling.row_policy import RowPolicy, deployment_acceptance
from cluster.scheduling.rows import Row
from cluster.scheduling.step_costs import StepCosts
from cluster.scheduling.step_loop import StepLoop
from cluster.scheduling.target_faults import TargetFaults, TargetLostHandler, _TargetLost
from cluster.scheduling.worker_api import BatchTarget, DraftPool
from workers.batch import PrefillRow, Proposal, VerifyRow
from workers.errors import KVBudgetExceeded
from workers.types import TokenLogprob

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SchedulerOptions:
    draft_timeout_s: float = 10.0  # a draft slower than this is treated as gone
    target_timeout_s: float | None = 60.0  # a target slower than this is failed over
    max_rows: int = 64  # rows in the running batch; more wait
    prefill_tokens_per_step: int = 2048  # prompt tokens admitted per step (at least one row)
    pipelined: bool | str = "auto"  # draft ahead while the target verifies; "auto": measure
    ahead_min_whole: float = 0.3  # draft ahead for rows whose block is accepted whole this often
    probe_rows: int = 4  # rows a probe of plain batch prefills drafts for (speculation: all)
    # The target's KV budget in tokens (0 = none). A row is admitted only when the most it can
    # ever hold (prompt + max_new_tokens + a block) fits beside the running rows' most, so an
    # admitted row is never refused later and the worker never passes its budget.
    kv_budget_tokens: int = 0
    # The draft pool drafts from the target's features (a feature head): rows that may draft
    # by model ask the target for them and carry them to their draft; nothing drafts ahead.
    draft_features: bool = False

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.prefill_tokens_per_step < 1:
            raise ValueError("max_rows and prefill_tokens_per_step must be >= 1")
        if self.pipelined not in (True, False, "auto"):
            raise ValueError(f'pipelined must be true, false or "auto", got {self.pipelined!r}')


class StepScheduler(TargetFaults, StepLoop):
    """The running batch of one target. `submit(row)` from any thread; the loop runs on its own
    thread (`start()`), or step by step (`step()`) in tests."""

    def __init__(
        self,
        target: BatchTarget,
        drafts: DraftPool | None,
        policy: PolicyConfig = PolicyConfig(),
        options: SchedulerOptions = SchedulerOptions(),
        *,
        name: str = "scheduler",
        clock: Callable[[], float] = time.perf_counter,
        on_target_lost: TargetLostHandler | None = None,
        observer: SchedulerObserver | None = None,
    ) -> None:
        super().__init__(name)
        self.observer: SchedulerObserver = observer or NoObserver()
        self.target = target
        self.drafts = drafts
        self.config = policy
        self.options = options
        self.clock = clock
        self.on_target_lost = on_target_lost
        # The acceptance of this replica's draft, every new row's prior (one thread), and the
        # measured costs of its steps.
        self.acceptance = deployment_acceptance(policy)
        self.costs = StepCosts(policy)
        self.batch_policy = BatchPolicy(policy, self.costs)
        self.pipelining = PipeliningChoice(options.pipelined)
        self.drafting = Drafting(
            drafts,
            timeout_s=options.draft_timeout_s,
            max_draft_tokens=policy.max_draft_tokens,
            ahead_min_whole=options.ahead_min_whole,
            name=name,
            features=options.draft_features,
        )
        self.lookups = LookupDrafting(policy, self.costs)
        self.running: list[Row] = []
        self.waiting: collections.deque[Row] = collections.deque()
        self.steps = 0
        self.busy_retries = 0  # target calls sent again after a refusal for now (WorkerBusy)
        self.row_steps = 0  # sum over steps of the rows in the target pass (mean batch size)
        self.plain_row_steps = 0  # of those, plain rows
        self.max_batch = 0
        # Rounds, proposed and accepted draft tokens by drafter ("model", "lookup"): the mix.
        self.drafter_mix: dict[str, list[int]] = {}
        # Where the loop's time goes (seconds by phase): the profile the benchmark prints.
        self.phase_seconds: collections.Counter[str] = collections.Counter()

    @property
    def load(self) -> int:
        """Rows this scheduler holds (running, waiting, just submitted): for routing."""
        return len(self.running) + len(self.waiting) + len(self._inbox)

    # -- the loop's ends ----------------------------------------------------------------------

    def _fail_all(self, exc: BaseException) -> None:
        self._take_inbox()
        self.drafting.poll(wait=True)
        rows = [*self.running, *self.waiting]
        self.running.clear()
        self.waiting.clear()
        for row in rows:
            self._fail(row, exc)

    def _has_work(self) -> bool:
        return bool(self._inbox or self.waiting or self.running or self.drafting.pending)

    def _shutdown(self) -> None:
        self._take_inbox()
        self.drafting.poll(wait=True)
        for row in [*self.running, *self.waiting]:
            row.finish_cancelled()
            self._release(row)
            row.sink.finished()
        self.running.clear()
        self.waiting.clear()
        self.alive = False

    # -- one step -----------------------------------------------------------------------------

    def step(self) -> bool:
        """One step of the batch; False when there was nothing to do."""
        try:
            self._take_inbox()
            self._drop_cancelled()
            t = self.clock()
            self._admit()
            self.phase_seconds["admit"] += self.clock() - t
            if not self.running:
                # Only background draft prefills of rows that left: let them answer, free them.
                self.drafting.poll(wait=not self.waiting)
                return bool(self.waiting)
            self._retry_drafts()
            self._run_batch()
            return True
        except _TargetLost as lost:
            self._target_lost(lost.__cause__ or lost)
            return False

    def _take_inbox(self) -> None:
        self.waiting.extend(self._submitted())

    def _drop_cancelled(self) -> None:
        for rows in (self.running, self.waiting):
            gone = [r for r in rows if r.cancelled]
            for row in gone:
                rows.remove(row)
                row.finish_cancelled()
                self._release(row)
                row.sink.finished()

    # -- admission ----------------------------------------------------------------------------

    def _admit(self) -> None:
        opts = self.options
        plan = plan_admissions(
            self.waiting,
            self.running,
            max_rows=opts.max_rows,
            prefill_tokens=opts.prefill_tokens_per_step,
            kv_budget=opts.kv_budget_tokens,
            max_draft_tokens=self.lookups.cap,
        )
        for row, exc in plan.refuse:
            self._fail(row, exc)
        batch = plan.admit
        if not batch:
            return
        for row in batch:
            if row.policy is None:
                row.drafter = row.request.drafter or self.config.drafter
                # A row that drafts by lookup only is plain as far as the draft model goes.
                mode = row.mode if row.drafter.uses_model else SpecMode.OFF
                row.policy = RowPolicy.for_request(
                    self.config, mode, row.request.k, row.deterministic, self.acceptance
                )
                if mode is SpecMode.OFF or self.drafts is None or not self.drafts.configured:
                    row.policy.draft_failed()
            self.lookups.admit(row)
        fresh = [r for r in batch if r.policy.mode is not SpecMode.OFF and r.lease is None]
        # A seeded row's k must not depend on timing, and an ON row asked for speculation: their
        # drafts prefill before the next step, waited for. An AUTO row's does not hold the batch
        # up: it prefills in the background, and only when the batch speculates (under load,
        # when every step is plain, never). Where draft work beside a target pass pays (pools of
        # their own, measured) the drafts prefill beside the target's; where they share cores,
        # after it: beside it they would slow the pass that makes every first token.
        now = [r for r in fresh if r.deterministic or r.mode is SpecMode.ON]
        later = [r for r in fresh if r not in now]
        beside = self.pipelining.overlap_pays
        draft_calls = self.drafting.prefill(now) if beside else []
        t0 = self.clock()
        prefill_rows = [
            PrefillRow(
                r.seq_id,
                r.rounds.tokens,
                r.params,
                features=self._features(r),
                prompt_len=len(r.rounds.prompt_ids) - r.resumed,
                fork_of=r.fork_of,
            )
            for r in batch
        ]
        prefill_call = lambda t: t.prefill_batch(prefill_rows)  # noqa: E731 - sent again if refused
        target_f = self._target_call(prefill_call)
        results = self._target_wait(target_f, prefill_call)
        self.observer.prefill(len(batch), self.clock() - t0)
        self.drafting.settle_prefill(draft_calls)
        self.drafting.poll()
        refused: list[Row] = []
        for row, res in zip(batch, results, strict=True):
            row.fork_of = None  # copied or computed: any later prefill computes
            if isinstance(res, int):  # the prefill pass decoded the next token: a plain step
                row.on_target = True
                row.forced = getattr(res, "forced", ())
                if row.params.prompt_logprobs is not None:  # once: a re-prefill asks none
                    row.prompt_logprobs = getattr(res, "prompt_logprobs", ())
                    row.params = replace(row.params, prompt_logprobs=None)
                row.features = bytearray(getattr(res, "features", b""))  # every prompt position's
                self.running.append(row)
                self._commit_token(row, res, getattr(res, "logprobs", ()))
            elif isinstance(res, KVBudgetExceeded) and (self.running or refused):
                refused.append(row)  # waits for room: rows leave as they finish
            else:
                wrong = TypeError(f"the target's prefill answered {res!r}, not the next token")
                self._fail(row, res if isinstance(res, BaseException) else wrong)
        self.waiting.extendleft(reversed(refused))
        # The first tokens are out. Drafts for the rows still running (not done at one token).
        if not beside:
            self.drafting.settle_prefill(self.drafting.prefill(self._still_running(now)))
        later = self._still_running(later)
        if later and self.batch_policy.would_speculate(
            row_choices(self.running, self.config.max_draft_tokens, decide_own=False)
        ):
            self.drafting.start_prefill(later)

    def _still_running(self, rows: Sequence[Row]) -> list[Row]:
        running = {id(r) for r in self.running}
        return [r for r in rows if id(r) in running]

    def _retry_drafts(self) -> None:
        self.drafting.poll()
        due = [r for r in self.running if r.policy.draft_retry_due() and not r.draft_pending]
        self.drafting.start_prefill(due)

    # -- the batch ----------------------------------------------------------------------------

    def _run_batch(self) -> None:
        rows = list(self.running)
        self.drafting.background = self.pipelining.overlap_pays
        policy = self.batch_policy
        ks = self._choose(rows)
        forced = forced_blocks(rows)  # a structured output's forced tokens: certain blocks
        ks = [0 if r.seq_id in forced else k for r, k in zip(rows, ks, strict=True)]
        # The rows taking one draft nothing else (forced rows are not looked up, nor priced in).
        free = [i for i, r in enumerate(rows) if r.seq_id not in forced]
        free_ks = [ks[i] for i in free]
        lookups = self.lookups.plan([rows[i] for i in free], free_ks)  # zeroes the k it takes
        for i, k in zip(free, free_ks, strict=True):
            ks[i] = k
        ks = self.drafting.for_step(rows, ks, policy.probing, self.options.probe_rows)
        if policy.probing and not any(ks):
            policy.retry_probe()  # nothing to probe with yet: once drafts are there
        t0 = self.clock()
        drafted_now = self.drafting.propose(rows, ks)
        model_proposals = dict(drafted_now.proposals)
        proposals = {
            **model_proposals,
            **{s: b.proposal for s, b in lookups.items()},
            **forced,
        }
        draft_seconds = self.clock() - t0
        phase = self.phase_seconds
        phase["draft"] += draft_seconds
        vrows = []
        for row in rows:
            p = proposals.get(row.seq_id)
            committed = row.rounds.committed_len
            feats = self._features(row)
            if p is None:
                vrows.append(VerifyRow(row.seq_id, committed, features=feats))
            else:
                one_hot = p.drafter in (LOOKUP, GRAMMAR)  # certain blocks: q is one-hot
                vrows.append(
                    VerifyRow(row.seq_id, committed, p.tokens, p.q, one_hot=one_hot, features=feats)
                )
        t1 = self.clock()
        verify_call = lambda t: t.verify_batch(vrows)  # noqa: E731 - sent again if refused
        verify_f = self._target_call(verify_call)
        ahead = self.drafting.ahead(rows, model_proposals, self.pipelining.now)
        shared = bool(ahead or self.drafting.pending)  # draft work beside this target pass
        t2 = self.clock()
        phase["send"] += t2 - t1
        try:
            verdicts = self._target_wait(verify_f, verify_call)
        finally:
            verify_seconds = self.clock() - t1
            phase["verify"] += self.clock() - t2
        width = max(len(v.draft_tokens) for v in vrows) + 1
        self._note_fallbacks(rows, vrows)
        # Counted before any row hears of this step (a reader may look right after its stream).
        self.steps += 1
        self.costs.steps = self.steps
        self.row_steps += len(rows)
        self.plain_row_steps += sum(1 for v in vrows if v.plain)
        self.max_batch = max(self.max_batch, len(rows))
        t3 = self.clock()
        committed = self._commit(rows, vrows, verdicts, proposals, lookups)
        t4 = self.clock()
        phase["commit"] += t4 - t3
        hits, misses = self.drafting.hits, self.drafting.misses
        self.drafting.settle_ahead(ahead, model_proposals, verdicts, rows)
        t5 = self.clock()
        step_seconds = t5 - t0
        phase["ahead"] += t5 - t4
        observer = self.observer
        if ahead:
            observer.pipeline(self.drafting.hits - hits, self.drafting.misses - misses)
        plain_rows = sum(1 for v in vrows if v.plain)
        record = StepRecord(
            len(rows), plain_rows, draft_seconds, drafted_now.drafted, verify_seconds, step_seconds
        )
        observer.step(record)
        # Prices: the target pass by its padded positions; the draft passes by rows drafting.
        if not shared:  # draft work beside it may share the cores: that time is not typical
            self.costs.observe_target(len(rows), width, verify_seconds)
        if drafted_now.drafted and drafted_now.timed:
            self.costs.observe_draft(drafted_now.drafted, drafted_now.passes, draft_seconds)
        if width == 1:
            self.costs.last_plain_step = self.steps
        if lookups:  # the model's checks compare model speculation with plain steps
            return
        self.pipelining.observe(width > 1, committed, step_seconds)
        if width == 1 or 2 * len(proposals) >= len(rows):  # plain, or most rows speculated
            self.batch_policy.realized.observe(len(rows), width > 1, committed, step_seconds)

    def _features(self, row: Row) -> bool:
        """Whether the row asks the target for features: its draft reads them."""
        return (
            self.options.draft_features
            and row.drafter.uses_model
            and (row.policy is None or row.policy.mode is not SpecMode.OFF)
        )

    def _note_fallbacks(self, rows: Sequence[Row], vrows: Sequence[VerifyRow]) -> None:
        """Tell the observer of each row that falls back from speculation to a plain step."""
        alone = len(rows) == 1
        for row, vrow in zip(rows, vrows, strict=True):
            if (cause := row.passed(vrow.plain, alone)) is not None:
                self.observer.fallback(cause)

    def _choose(self, rows: Sequence[Row]) -> list[int]:
        return self.batch_policy.choose(row_choices(rows, self.config.max_draft_tokens))

    def _commit(
        self,
        rows: Sequence[Row],
        vrows: Sequence[VerifyRow],
        verdicts,
        proposals: dict[str, Proposal],
        lookups: dict[str, LookupBlock],
    ) -> int:
        committed = 0
        for row, vrow, res in zip(rows, vrows, verdicts, strict=True):
            if isinstance(res, BaseException):
                self._row_target_error(row, res)
                continue
            if vrow.features:
                row.features += res.features
            row.forced = res.forced
            if vrow.plain:
                committed += self._commit_token(row, res.token, res.logprobs)
                continue
            p = proposals[row.seq_id]
            out = row.rounds.on_round(list(vrow.draft_tokens), res.accepted, res.token, p.drafter)
            add_rounds(self.drafter_mix, p.drafter, 1, len(vrow.draft_tokens), res.accepted)
            self.observer.round(p.drafter, len(vrow.draft_tokens), res.accepted)
            block = lookups.get(row.seq_id)
            if block is not None:
                self.lookups.observe(row, block, res.accepted)
            elif p.drafter != GRAMMAR:  # forced blocks teach no drafter's policy
                row.policy.observe_round(len(vrow.draft_tokens), res.accepted, p.unsure_last)
            committed += self._emit(row, out, res.logprobs)
        return committed

    def _commit_token(self, row: Row, token: int, logprobs: Sequence[TokenLogprob] = ()) -> int:
        """A plain step's token (or the one a prefill pass decoded)."""
        out = row.rounds.on_plain(token)
        row.policy.observe_plain()
        return self._emit(row, out, logprobs)

    def _emit(self, row: Row, out: list[int], logprobs: Sequence[TokenLogprob] = ()) -> int:
        """`logprobs`: the target's, one per token the round committed (when the row asked);
        those of the tokens that go out go with them."""
        if out:
            self.lookups.committed(row, out)
            row.sink.tokens(out, tuple(logprobs[: len(out)]))
        if row.rounds.finished:
            self.lookups.finished(row)
            self.running.remove(row)
            self._release(row)
            row.sink.finished()
        return len(out)
