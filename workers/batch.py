"""The batched worker interface: one call carries many sequences (rows), answered per row.

A step scheduler (cluster/scheduler.py) sends one batched call per worker per step. Each row is
checked and applied on its own: a row that fails (unknown sequence, stale committed length, bad
argument) comes back as its exception in that row's slot and changes nothing of its sequence;
its neighbours are unaffected. No ray, no grpc.

    results = target.verify_batch([VerifyRow("a", 12, [5, 9]), VerifyRow("b", 40, [])])
    # -> [Verdict(...), Verdict(accepted=0, token=..., bonus=False)]   (row b: a plain step)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from workers.sampling import SamplingParams
from workers.verification import SparseQ, Verdict


@dataclass(frozen=True, slots=True)
class Proposal:
    """Draft tokens starting at absolute position `start`; q is None for greedy."""

    start: int
    tokens: list[int]
    q: SparseQ | None = None


@dataclass(frozen=True, slots=True)
class PrefillRow:
    """(Re)start a sequence from its committed tokens."""

    seq_id: str
    token_ids: Sequence[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class ProposeRow:
    """Draft k tokens; `commit` (committed after committed_len) is applied first, `start` drafts
    from that absolute position (see DraftWorker.propose)."""

    seq_id: str
    committed_len: int
    k: int
    commit: Sequence[int] = ()
    start: int | None = None


@dataclass(frozen=True, slots=True)
class VerifyRow:
    """Verify `draft_tokens` (q: the draft's distributions, None for greedy). No draft tokens is a
    plain step: the answer is Verdict(accepted=0, token=the next token, bonus=False)."""

    seq_id: str
    committed_len: int
    draft_tokens: Sequence[int] = ()
    q: SparseQ | None = None

    @property
    def plain(self) -> bool:
        return not self.draft_tokens


# One slot per row: the row's value, or the exception that refused (only) that row.
RowResult = object


def plain_verdict(token: int) -> Verdict:
    return Verdict(0, int(token), bonus=False)


def run_row(fn, *args) -> object:
    """One row of a batched call: its value, or the exception that refused it (alone)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - a failing row fails alone, never the batch
        return exc
