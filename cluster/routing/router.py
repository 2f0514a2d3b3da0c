"""The router: the public generation API over gRPC worker pools, one step scheduler per target.

    router = Router(RouterConfig(target_model_path="/models/target"))
    router.set_workers(drafts=["10.0.0.5:7001"], targets=["10.0.0.6:7002"])
    async for msg in router.generate_stream(request):   # protos.specdec_pb2.GenerateRequest
        ...

Per request: validate and tokenize (cluster/api/validation.py: a bad field raises
`RequestError(INVALID_ARGUMENT, field, ...)`), admit (more than `max_in_flight` sequences raises
`RequestError(RESOURCE_EXHAUSTED, ...)` at once), hand the sequence to the step scheduler of the
least-loaded target (cluster/scheduling/scheduler.py: continuous batching, one batched verify per
step for all its rows, one batched propose per draft worker), detokenize incrementally, trim stop
strings and stream each step's tokens. A consumer that goes away (task cancelled, client cancel or
deadline) frees its admission slot at once; its row leaves the batch at the next step and is
released on every worker. A target that fails hands its rows to the router, which re-prefills their
committed tokens on another target's scheduler; with none left the request ends with
`RequestError(UNAVAILABLE, ...)`, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import grpc

from cluster.api.response_stream import collect
from cluster.api.text_stream import TextStream
from cluster.api.validation import Admission, RequestError, ValidRequest, internal_error
from cluster.routing.config import RouterConfig
from cluster.routing.mailbox import LoopMailbox, LoopSink
from cluster.routing.sequence_stream import SequenceStream, stream_sequences
from cluster.routing.target_model import TargetModel
from cluster.scheduling.observer import SchedulerObserver
from cluster.scheduling.rounds import SequenceRounds, StopConditions
from cluster.scheduling.rows import Row, RowRequest
from cluster.scheduling.scheduler import StepScheduler
from cluster.scheduling.worker_api import TargetUnavailable
from cluster.transport.pools import Endpoint, EndpointState, LocalSide, WorkerPool
from protos import specdec_pb2, worker_pb2
from workers.errors import KVBudgetExceeded
from workers.logits_processing import with_held_ids
from workers.sampling import child_seed
from workers.wire import tokenizer_fingerprint

log = logging.getLogger(__name__)


class WorkerMismatchError(ValueError):
    """A worker serves something the router cannot use (other tokenizer, role or model)."""


def _request_error(exc: BaseException) -> RequestError:
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, TargetUnavailable):
        return RequestError(grpc.StatusCode.UNAVAILABLE, "", str(exc))
    if isinstance(exc, KVBudgetExceeded):
        return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "", f"target KV budget: {exc}")
    # Anything else is ours, a worker's ValueError too: requests are validated before any worker
    # sees them, by the workers' own rules (a shape error is a bug, not the client's mistake).
    return internal_error(exc, "router")


class Router:
    """Speculative decoding over gRPC worker pools, for the Ray Serve ingress and the standalone
    gRPC ingress (cluster/api/grpc_service.py).

      * `Router(config, drafts=[...], targets=[...])` — reads the target's tokenizer and model
        config from `config.target_model_path` (`TargetModel`, local files only); worker
        addresses are "host:port". `local_targets`: address -> a factory of the side to call
        there in-process (cluster/transport/same_process.py: a target replica's own worker).
      * `set_workers(drafts=[...], targets=[...])` — replace either pool at any time.
      * `check_workers()` — probe every address now; raises `WorkerMismatchError` when a worker's
        tokenizer / role / model does not match.
      * `async for msg in router.generate_stream(request)` — `GenerateResponse` chunks; the last
        one carries finish_reason, usage and stats. Leaving the loop releases the sequence.
      * `await router.generate(request)` — the whole `GenerateResponse`.
      * Both raise `RequestError` (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, INTERNAL).
      * `close()` — end running streams (CANCELLED), stop the schedulers, close channels.
    """

    def __init__(
        self,
        config: RouterConfig,
        *,
        drafts: Sequence[str] = (),
        targets: Sequence[str] = (),
        local_targets: Mapping[str, LocalSide] | None = None,
        health_checks: bool = True,
        observer: SchedulerObserver | None = None,
    ) -> None:
        """observer: told of every scheduler's steps (metrics; cluster/observability)."""
        if not isinstance(config, RouterConfig):  # a ClusterConfig from the Serve application
            config = RouterConfig.from_cluster_config(config)
        self.config = config
        self.model = TargetModel.load(config.target_model_path)
        self.fingerprint = tokenizer_fingerprint(self.model.tokenizer)
        self._policy = config.policy_config()
        self._options = config.scheduler_options()
        self._limits = config.limits()
        self._drafts = WorkerPool(
            "draft",
            self._check_draft,
            timeout_s=config.draft_timeout_s,
            probe_timeout_s=config.probe_timeout_s,
        )
        self._targets = WorkerPool(
            "target",
            self._check_target,
            timeout_s=config.target_timeout_s,
            probe_timeout_s=config.probe_timeout_s,
            local=local_targets,
        )
        self._schedulers: dict[str, StepScheduler] = {}  # target address -> its scheduler
        self._observer = observer
        self._lock = threading.Lock()
        self._admission = Admission(config.max_in_flight, "router")
        self._closing = threading.Event()
        self._mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.set_workers(drafts=drafts, targets=targets)
        self._health: threading.Thread | None = None
        if health_checks:
            self._health = threading.Thread(
                target=self._health_loop, name="router-health", daemon=True
            )
            self._health.start()

    # -- workers ------------------------------------------------------------------------------

    def set_workers(
        self, drafts: Sequence[str] | None = None, targets: Sequence[str] | None = None
    ) -> None:
        """Replace the draft and/or target addresses (None: leave that pool as it is). Sequences
        running on a removed address finish there."""
        if drafts is not None:
            self._drafts.set(drafts)
        if targets is not None:
            self._targets.set(targets)

    def check_workers(self) -> dict[str, list[dict[str, Any]]]:
        """Probe every address now; returns `worker_status()`. Raises WorkerMismatchError when a
        worker is rejected (wrong tokenizer, role or model)."""
        for pool in (self._targets, self._drafts):
            pool.recheck(list(EndpointState))
        status = self.worker_status()
        bad = [
            f"{role[:-1]} {w['address']}: {w['error']}"
            for role, ws in status.items()
            for w in ws
            if w["state"] == EndpointState.REJECTED.value
        ]
        if bad:
            raise WorkerMismatchError("router refuses workers: " + "; ".join(bad))
        return status

    def worker_status(self) -> dict[str, list[dict[str, Any]]]:
        return {"targets": self._targets.status(), "drafts": self._drafts.status()}

    def batch_status(self) -> dict[str, dict[str, Any]]:
        """Per target: rows running / waiting and steps taken by its scheduler."""
        with self._lock:
            scheds = dict(self._schedulers)
        return {
            a: {
                "running": len(s.running),
                "waiting": len(s.waiting),
                "steps": s.steps,
                "row_steps": s.row_steps,
                "plain_row_steps": s.plain_row_steps,
                "max_batch": s.max_batch,
                "speculating": s.batch_policy.speculating,
                "phase_seconds": dict(s.phase_seconds),
                # rounds, proposed and accepted tokens by drafter ("model", "lookup")
                "drafters": {k: list(v) for k, v in s.drafter_mix.items()},
                "recent_output_tokens": s.lookups.recent.index.tokens,
            }
            for a, s in scheds.items()
        }

    @property
    def in_flight(self) -> int:
        return self._admission.in_flight

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def _check_common(self, info: worker_pb2.ModelInfo, role: int, name: str) -> str | None:
        if info.role != role:
            return f"it is a {worker_pb2.Role.Name(info.role)} worker, not a {name} worker"
        if info.tokenizer_fingerprint != self.fingerprint:
            return (
                f"its tokenizer (model {info.model_path!r}) differs from the target's "
                f"({self.config.target_model_path!r}): speculative decoding needs draft and "
                f"target to share a tokenizer"
            )
        return None

    def _check_draft(self, info: worker_pb2.ModelInfo) -> str | None:
        return self._check_common(info, worker_pb2.ROLE_DRAFT, "draft")

    def _check_target(self, info: worker_pb2.ModelInfo) -> str | None:
        problem = self._check_common(info, worker_pb2.ROLE_TARGET, "target")
        if problem:
            return problem
        theirs = (info.vocab_size, info.max_context, frozenset(info.eos_token_ids))
        ours = (self.model.vocab_size, self.model.max_context, self.model.eos_token_ids)
        if theirs != ours:
            return (
                f"its model {info.model_path!r} (vocab, context, EOS = {theirs[0]}, {theirs[1]}, "
                f"{sorted(theirs[2])}) is not the router's target "
                f"{self.config.target_model_path!r} ({ours[0]}, {ours[1]}, {sorted(ours[2])})"
            )
        return None

    def _health_loop(self) -> None:
        while not self._closing.wait(self.config.health_recheck_s):
            for pool in (self._targets, self._drafts):
                try:
                    pool.recheck()
                except Exception:  # noqa: BLE001 - keep checking
                    log.exception("health recheck failed")

    # -- placing rows on schedulers -----------------------------------------------------------

    def _scheduler_for(self, ep: Endpoint) -> StepScheduler:
        with self._lock:
            sched = self._schedulers.get(ep.address)
            if sched is not None and sched.alive and sched.target is not ep.side:
                # The address left the pool (its channel closed) and came back: a new channel.
                sched.close()
                sched = None
            if sched is None or not sched.alive:
                sched = StepScheduler(
                    ep.side,
                    self._drafts,
                    self._policy,
                    self._options,
                    name=f"scheduler-{ep.address}",
                    on_target_lost=self._target_lost,
                    observer=self._observer,
                ).start()
                self._schedulers[ep.address] = sched
            return sched

    def _place_group(
        self, rows: list[Row], tried: set[str] | None = None, *, wait: bool = True
    ) -> bool:
        """Put rows on the least-loaded target's scheduler (not one in `tried`), submitted
        together: a request's n samples are then admitted in one step, and the first one's
        prefill is copied, not computed again. False when there is no target (`wait`: counting
        those whose first check has not answered yet, waiting for it)."""
        tried = set() if tried is None else tried
        while True:
            ep = self._targets.acquire(exclude=tried, wait=wait)
            if ep is None:
                return False
            held = [ep] + [self._targets.hold(ep) for _ in rows[1:]]
            for row in rows:
                row.home = ep
            try:
                self._scheduler_for(ep).submit_many(rows)
                return True
            except RuntimeError:  # that scheduler just stopped: try another
                tried.add(ep.address)
                for row, home in zip(rows, held, strict=True):
                    self._targets.release(home)
                    row.home = None

    def _place(self, row: Row, tried: set[str]) -> bool:
        """Put the row on the least-loaded target's scheduler; False when there is none."""
        return self._place_group([row], tried)

    def _mailbox(self) -> LoopMailbox:
        """The running loop's mailbox (one wake-up a step for all its streams)."""
        loop = asyncio.get_running_loop()
        box = self._mailboxes.get(loop)
        if box is None:
            box = self._mailboxes[loop] = LoopMailbox(loop)
        return box

    def _row_done(self, row: Row | None) -> None:
        if row is not None and row.home is not None:
            ep, row.home = row.home, None
            self._targets.release(ep)

    def _target_lost(self, rows: list[Row], exc: BaseException) -> None:
        """A scheduler's target is gone: move its rows (on that scheduler's thread)."""
        dead = rows[0].home.address if rows and rows[0].home is not None else None
        if dead is not None:
            self._targets.mark_down(dead, f"target failed: {exc}")
        for row in rows:
            home, row.home = row.home, None
            tried = set(row.tried)
            if home is not None:
                tried.add(home.address)
                row.tried.add(home.address)
                self._targets.release(home)
            if row.cancelled or self._closing.is_set():
                row.finish_cancelled()
                row.sink.finished()
                continue
            if self._place(row, tried):
                row.target_failovers += 1
                continue
            row.sink.failed(
                TargetUnavailable(
                    f"target worker failed ({exc}) and no other target worker is available"
                    + self._why()
                )
            )

    # -- requests -----------------------------------------------------------------------------

    def validate(self, request: specdec_pb2.GenerateRequest) -> ValidRequest:
        """Check a request and tokenize it; RequestError(INVALID_ARGUMENT, field, ...) if bad."""
        return self.model.validate(request, self._limits)

    async def generate_stream(
        self, request: specdec_pb2.GenerateRequest
    ) -> AsyncIterator[specdec_pb2.GenerateResponse]:
        """Stream the generation; see the class docstring. Raises RequestError."""
        req = self.validate(request)
        eos = frozenset() if req.ignore_eos else self.model.eos_token_ids
        stop = StopConditions(req.max_new_tokens, eos, req.stop_token_ids, self.model.max_context)
        params = with_held_ids(req.params, eos | req.stop_token_ids)
        request_kind = RowRequest(req.mode, req.k or None, None, req.drafter)
        queue: asyncio.Queue = asyncio.Queue()
        seqs: list[SequenceStream] = []
        try:
            for i in range(req.n):  # n samples of one prompt: n rows, one queue
                self._admit()
                sink = LoopSink(self._mailbox(), self._row_done, _request_error, queue, i)
                seq_id = req.seq_id if i == 0 else f"{req.seq_id}-{i}"
                own = params if i == 0 else replace(params, seed=child_seed(params.seed, i))
                row = Row(seq_id, SequenceRounds(req.prompt_ids, stop), own, sink, request_kind)
                row.fork_of = seqs[0].row.seq_id if i else None  # its prefill is copied
                row.resumed = req.resumed
                sink.row = row
                text = TextStream(
                    self.tokenizer,
                    req.prompt_ids,
                    req.stop,
                    req.include_stop_str,
                    min_tokens=max(0, params.min_tokens - req.resumed),
                )
                seqs.append(SequenceStream(i, row, text))
            rows = [seq.row for seq in seqs]
            # A target whose first check is still out is waited for on a thread, never on the
            # event loop that carries every other stream of this replica.
            placed = self._place_group(rows, wait=False) or (
                self._targets.checking() and await asyncio.to_thread(self._place_group, rows)
            )
            if not placed:
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE, "", "no target worker is available" + self._why()
                )
            async for msg in stream_sequences(queue, seqs):
                yield msg
        finally:
            for seq in seqs:
                if not seq.row.released.is_set():
                    seq.row.cancel()  # the consumer is gone (or done): the row leaves the batch
                    self._wake(seq.row)
                self._leave()

    async def generate(self, request: specdec_pb2.GenerateRequest) -> specdec_pb2.GenerateResponse:
        """The whole generation as one response. Raises RequestError."""
        return await collect(self.generate_stream(request))

    def _wake(self, row: Row) -> None:
        home = row.home
        if home is None:
            return
        with self._lock:
            sched = self._schedulers.get(home.address)
        if sched is not None:
            sched.wake()

    def _admit(self) -> None:
        if self._closing.is_set():
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "", "router is shutting down")
        self._admission.enter()

    def _leave(self) -> None:
        self._admission.leave()

    def _why(self) -> str:
        status = self._targets.status()
        if not status:
            return " (none configured)"
        return (
            " ("
            + "; ".join(f"{w['address']}: {w['state']} {w['error']}".strip() for w in status)
            + ")"
        )

    # -- shutdown -----------------------------------------------------------------------------

    def close(self) -> None:
        """End running streams (CANCELLED), stop the schedulers and health checks, close the
        channels."""
        self._closing.set()
        with self._lock:
            scheds = list(self._schedulers.values())
        for sched in scheds:
            sched.close()
        if self._health is not None:
            self._health.join(timeout=5)
        self._drafts.close()
        self._targets.close()
