"""What the step scheduler needs from its workers, whatever carries the calls (in-process threads
or gRPC): batched calls that return futures of one result per row. No ray, no grpc.

A transport fails a whole call (the future raises `WorkerUnavailable`) only when the worker is
gone or did not answer in time; a worker's refusal of one row (stale, unknown sequence, bad
argument, KV budget) is that row's slot in the result list, and its neighbours go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Protocol

from workers.batch import PrefillRow, ProposeRow, VerifyRow


class WorkerUnavailable(Exception):
    """Raised by a transport (through its futures) when a worker is gone or did not answer in
    time, as opposed to the worker's own refusals (stale, unknown sequence, bad input)."""


class WorkerBusy(Exception):
    """A worker refused a whole call for now (RESOURCE_EXHAUSTED, ABORTED: overloaded, or a
    message over its size limit) without being gone: its sequences are as the call found them,
    and the same call may pass a moment later. Not a loss: the rows stay where they are."""


class TargetUnavailable(Exception):
    """The target failed and no other target could take the sequence over."""


class BatchDraft(Protocol):
    def prefill_batch(self, rows: Sequence[PrefillRow]) -> Future: ...  # Future[list[None | exc]]

    def propose_batch(self, rows: Sequence[ProposeRow]) -> Future: ...  # Future[list[Proposal|exc]]

    def release(self, seq_id: str) -> None: ...


class BatchTarget(Protocol):
    def prefill_batch(self, rows: Sequence[PrefillRow]) -> Future: ...  # Future[list[None | exc]]

    def verify_batch(self, rows: Sequence[VerifyRow]) -> Future: ...  # Future[list[Verdict|exc]]

    def release(self, seq_id: str) -> None: ...


class DraftLease(Protocol):
    """A draft worker a row is bound to (from its draft prefill on): `key` groups the rows of one
    worker into one batched call per step."""

    key: str
    side: BatchDraft


class DraftPool(Protocol):
    # The least-loaded healthy draft, or None. wait=False: never block on a draft's first check.
    def acquire(self, *, wait: bool = True) -> DraftLease | None: ...

    def checking(self) -> bool: ...  # a draft's first check is still out (acquire may wait)

    def release(self, lease: DraftLease) -> None: ...

    @property
    def configured(self) -> bool: ...


def is_worker_loss(exc: BaseException) -> bool:
    # TimeoutError: concurrent.futures' result(timeout=...) raises the builtin in 3.11.
    return isinstance(exc, WorkerUnavailable | TimeoutError)
