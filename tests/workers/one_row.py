"""One sequence through the batched worker API: each helper sends a batch of one row and answers
that row's value, or raises the row's error.

What the tests use as the oracle for batched calls (the same row, alone) and to drive a single
sequence. Works with anything that has the batched methods: an in-process worker, the
tensor-parallel target, or a gRPC side (whose futures are waited for).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from workers.batch import PrefillRow, Proposal, ProposeRow, VerifyRow
from workers.types import SamplingParams, SparseQ, Verdict


def alone(call: Callable[[list], Any], row: object, timeout_s: float = 30.0) -> Any:
    """`call([row])`'s one slot: the row's value, or its error raised."""
    slots = call([row])
    if isinstance(slots, Future):
        slots = slots.result(timeout_s)
    (slot,) = slots
    if isinstance(slot, BaseException):
        raise slot
    return slot


def prefill(
    worker: Any, seq_id: str, token_ids: Sequence[int], params=SamplingParams()
) -> int | None:
    """The target's next token (its prefill decodes it and commits it: committed length n + 1),
    or None from a draft (committed length n)."""
    return alone(worker.prefill_batch, PrefillRow(seq_id, list(token_ids), params))


def propose(
    draft: Any,
    seq_id: str,
    committed_len: int,
    k: int,
    commit: Sequence[int] = (),
    start: int | None = None,
) -> Proposal:
    return alone(draft.propose_batch, ProposeRow(seq_id, committed_len, k, tuple(commit), start))


def verify(
    target: Any,
    seq_id: str,
    committed_len: int,
    draft_tokens: Sequence[int],
    q: SparseQ | None = None,
) -> Verdict:
    return alone(target.verify_batch, VerifyRow(seq_id, committed_len, list(draft_tokens), q))


def plain_step(target: Any, seq_id: str, committed_len: int) -> int:
    """One plain decoding step (a verify row without draft tokens): the next token."""
    return alone(target.verify_batch, VerifyRow(seq_id, committed_len)).token
