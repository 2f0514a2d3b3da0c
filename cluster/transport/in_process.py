"""In-process workers behind the scheduler's worker API: each worker's calls on a thread of its
own, answered as futures (what the in-process engine runs on; no gRPC, no Ray).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from workers.batch import PrefillRow, ProposeRow, VerifyRow
from workers.draft import DraftWorker
from workers.target import TargetWorker


class _OnThread:
    """Runs every call of one worker on one dedicated thread (workers are not thread-safe).

    `torch_threads` caps torch's intra-op threads for that thread only: torch keeps an OpenMP
    team per calling thread, and a multi-threaded draft team slows the target's passes even while
    the draft is idle (measured here: a target verify 14 -> 21 ms). A small draft loses little
    running on one thread.
    """

    def __init__(self, name: str, torch_threads: int | None = None) -> None:
        init = (lambda: torch.set_num_threads(torch_threads)) if torch_threads else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=init)

    def submit(self, fn, *args) -> Future:
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class LocalDraft:
    """`BatchDraft` over an in-process `DraftWorker`, and the lease of every row (one draft)."""

    key = "local"

    def __init__(self, worker: DraftWorker) -> None:
        self.worker = worker
        self.side = self
        self.thread = _OnThread("draft", torch_threads=1)

    def prefill_batch(self, rows: Sequence[PrefillRow]) -> Future:
        return self.thread.submit(self.worker.prefill_batch, list(rows))

    def propose_batch(self, rows: Sequence[ProposeRow]) -> Future:
        return self.thread.submit(self.worker.propose_batch, list(rows))

    def release(self, seq_id: str) -> None:
        self.thread.submit(self.worker.release, seq_id).result()


class LocalDraftPool:
    """The `DraftPool` of one in-process draft."""

    def __init__(self, draft: LocalDraft) -> None:
        self.draft = draft
        self.configured = True

    def acquire(self, *, wait: bool = True) -> LocalDraft:
        return self.draft

    def checking(self) -> bool:
        return False  # nothing to check: it is here

    def release(self, lease: LocalDraft) -> None:
        pass


class LocalTarget:
    """`BatchTarget` over an in-process `TargetWorker`."""

    def __init__(self, worker: TargetWorker) -> None:
        self.worker = worker
        self.thread = _OnThread("target")

    def prefill_batch(self, rows: Sequence[PrefillRow]) -> Future:
        return self.thread.submit(self.worker.prefill_batch, list(rows))

    def verify_batch(self, rows: Sequence[VerifyRow]) -> Future:
        return self.thread.submit(self.worker.verify_batch, list(rows))

    def release(self, seq_id: str) -> None:
        self.thread.submit(self.worker.release, seq_id).result()
