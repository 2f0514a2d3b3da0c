"""The draft side: proposes k tokens (and, when sampling, the distribution q each came from).

Per sequence the worker keeps the committed tokens plus a speculative tail it drafted but nobody has
committed yet. A pipelined router asks for the next block before the current one is verified; the
tail then simply grows, and a commit keeps whatever prefix of the tail the target agreed with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from workers.batch import PrefillRow, Proposal, ProposeRow, run_row
from workers.errors import StaleSequenceError, UnknownSequenceError
from workers.model_runner import ModelRunner
from workers.sampling import PositionalRng, SamplingParams, warp_probs
from workers.verification import SparseQ

DRAFT_STREAM = 1  # the draft's random stream differs from the target's for the same seed


@dataclass(slots=True)
class _DraftSeq:
    tokens: list[int]  # committed tokens, then the speculative tail
    committed_len: int
    params: SamplingParams
    rng: PositionalRng


class DraftWorker:
    """Drafts for many sequences on one model. Callers serialize access."""

    def __init__(self, runner: ModelRunner, top_m: int = 64) -> None:
        if top_m < 1:
            raise ValueError(f"top_m must be >= 1, got {top_m}")
        self.runner = runner
        self.top_m = top_m
        self._seqs: dict[str, _DraftSeq] = {}

    @classmethod
    def from_path(cls, path: str | os.PathLike, top_m: int = 64, **kw) -> DraftWorker:
        return cls(ModelRunner(path, **kw), top_m=top_m)

    @property
    def live_sequences(self) -> int:
        return len(self._seqs)

    def prefill(self, seq_id: str, token_ids: list[int], params: SamplingParams) -> None:
        """(Re)start a sequence from its committed tokens; replaces any earlier state."""
        if not token_ids:
            raise ValueError("prompt: must contain at least one token")
        self.release(seq_id)
        self.runner.extend(seq_id, list(token_ids[:-1]))
        self._seqs[seq_id] = _DraftSeq(
            list(token_ids), len(token_ids), params, PositionalRng(params.seed, DRAFT_STREAM)
        )

    def committed_len(self, seq_id: str) -> int:
        return self._get(seq_id).committed_len

    def propose(
        self,
        seq_id: str,
        committed_len: int,
        k: int,
        commit: list[int] | tuple[int, ...] = (),
        start: int | None = None,
    ) -> Proposal:
        """Draft up to k tokens after everything this sequence holds (committed + tail).

        `commit` (tokens committed after committed_len) is applied first, so a router sends the
        result of a round and asks for the next block in one call. `start` (an absolute position
        between the committed length and the end of the tail) drafts from there instead, dropping
        the tail after it. Fewer than k tokens come back only at the model's context limit.
        """
        if commit:
            committed_len = self.commit(seq_id, committed_len, list(commit))
        seq = self._get(seq_id)
        self._check(seq_id, seq, committed_len)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if start is not None:
            if not seq.committed_len <= start <= len(seq.tokens):
                raise ValueError(
                    f"start: {start} is outside [{seq.committed_len}, {len(seq.tokens)}]"
                )
            del seq.tokens[start:]
            # The cache never holds the last token: drafting feeds it to get the next logits.
            self.runner.rollback(seq_id, min(self.runner.length(seq_id), start - 1))
        start = len(seq.tokens)
        k = max(0, min(k, self.runner.max_context - start + 1))
        drafted: list[int] = []
        idx: list[torch.Tensor] = []
        prob: list[torch.Tensor] = []
        for _ in range(k):
            pending = seq.tokens[self.runner.length(seq_id) :]
            logits = self.runner.extend(seq_id, pending)[-1]
            if seq.params.greedy:
                tok = int(logits.argmax())
            else:
                probs = warp_probs(logits, seq.params)
                m = min(self.top_m, probs.shape[-1])
                top = torch.topk(probs, m)
                top_p = top.values / top.values.sum()
                choice = int(torch.multinomial(top_p, 1, generator=seq.rng.at(len(seq.tokens))))
                tok = int(top.indices[choice])
                idx.append(top.indices)
                prob.append(top_p)
            drafted.append(tok)
            seq.tokens.append(tok)
        q = SparseQ(torch.stack(idx), torch.stack(prob)) if idx else None
        return Proposal(start, drafted, q)

    def commit(self, seq_id: str, committed_len: int, new_tokens: list[int]) -> int:
        """Make committed_len + new_tokens the committed sequence; returns the new committed length.

        Keeps the longest prefix of the speculative tail that agrees (and its KV), drops the rest.
        Applying the same commit twice is a no-op.
        """
        seq = self._get(seq_id)
        new_len = committed_len + len(new_tokens)
        if seq.committed_len == new_len and seq.tokens[committed_len:new_len] == list(new_tokens):
            return new_len  # already applied (a retry)
        self._check(seq_id, seq, committed_len)
        tail = seq.tokens[committed_len:]
        agree = 0
        while agree < min(len(tail), len(new_tokens)) and tail[agree] == new_tokens[agree]:
            agree += 1
        # When the whole commit was drafted here already, the rest of the tail stays (pipelining).
        if agree < len(new_tokens):
            seq.tokens = seq.tokens[: committed_len + agree] + list(new_tokens[agree:])
            cached = self.runner.length(seq_id)
            self.runner.rollback(seq_id, min(cached, committed_len + agree))
        seq.committed_len = new_len
        return new_len

    def release(self, seq_id: str) -> bool:
        self.runner.release(seq_id)
        return self._seqs.pop(seq_id, None) is not None

    # -- batched (one call, many rows; each row answered on its own) --------------------------

    def prefill_batch(self, rows: list[PrefillRow]) -> list[object]:
        """Per row: None, or the exception that refused that row."""
        return [run_row(self.prefill, r.seq_id, list(r.token_ids), r.params) for r in rows]

    def propose_batch(self, rows: list[ProposeRow]) -> list[object]:
        """Per row: a Proposal, or the exception that refused that row (nothing of it changed)."""
        return [
            run_row(self.propose, r.seq_id, r.committed_len, r.k, list(r.commit), r.start)
            for r in rows
        ]

    def _get(self, seq_id: str) -> _DraftSeq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise UnknownSequenceError(f"draft holds no sequence {seq_id!r}") from None

    @staticmethod
    def _check(seq_id: str, seq: _DraftSeq, committed_len: int) -> None:
        if seq.committed_len != committed_len:
            raise StaleSequenceError(
                f"sequence {seq_id!r}: draft holds committed length {seq.committed_len}, "
                f"caller assumed {committed_len}"
            )

