"""What the gRPC services (workers/service.py) need from a worker: the in-process DraftWorker /
TargetWorker, or a tensor-parallel target with the same methods. Batched methods answer one slot
per row: the value, or the exception that refused that row alone (workers/batch.py)."""

from __future__ import annotations

from typing import Any, Protocol

from workers.batch import PrefillRow, ProposeRow, VerifyRow


class RunnerInfo(Protocol):
    """Read from `worker.runner` for Stats."""

    path: str
    vocab_size: int
    max_context: int
    eos_token_ids: set[int]
    tokenizer: Any  # a PreTrainedTokenizerBase (its fingerprint goes out in Stats)


class DraftModel(Protocol):
    runner: RunnerInfo

    @property
    def live_sequences(self) -> int: ...

    def release(self, seq_id: str) -> bool: ...

    def prefill_batch(self, rows: list[PrefillRow]) -> list[object]: ...

    def propose_batch(self, rows: list[ProposeRow]) -> list[object]: ...


class TargetModel(Protocol):
    runner: RunnerInfo

    @property
    def live_sequences(self) -> int: ...

    def release(self, seq_id: str) -> bool: ...

    def prefill_batch(self, rows: list[PrefillRow]) -> list[object]: ...

    def verify_batch(self, rows: list[VerifyRow]) -> list[object]: ...
