"""The draft side: proposes k tokens (and, when sampling, the distribution q each came from).

Per sequence the worker keeps the committed tokens plus a speculative tail it drafted but nobody has
committed yet. A pipelined router asks for the next block before the current one is verified; the
tail then simply grows, and a commit keeps whatever prefix of the tail the target agreed with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from workers.batch import PrefillRow, Proposal, ProposeRow, split_prefill
from workers.errors import StaleSequenceError, UnknownSequenceError
from workers.model_runner import ModelRunner
from workers.sampling import PositionalRng, warp_probs
from workers.token_range import check_length, check_token_ids
from workers.types import SamplingParams, SparseQ

DRAFT_STREAM = 1  # the draft's random stream differs from the target's for the same seed


@dataclass(slots=True)
class _DraftSeq:
    tokens: list[int]  # committed tokens, then the speculative tail
    committed_len: int
    params: SamplingParams
    rng: PositionalRng


class DraftWorker:
    """Drafts for many sequences on one model. Callers serialize access."""

    def __init__(self, runner: ModelRunner, top_m: int = 64, confidence_stop: float = 0.0) -> None:
        """confidence_stop: a row stops drafting after a token the draft gave less than this
        probability (0 = always k tokens). Lossless: where a block stops depends only on the
        draft's own distributions. Why: on a CPU target a wider verify costs more (5 tokens
        ~1.6x one on SmolLM2-135M), so low-confidence tails cost more than they return."""
        check_draft_options(top_m, confidence_stop)
        self.runner = runner
        self.top_m = top_m
        self.confidence_stop = confidence_stop
        self._seqs: dict[str, _DraftSeq] = {}

    @classmethod
    def from_path(
        cls, path: str | os.PathLike, top_m: int = 64, confidence_stop: float = 0.0, **kw
    ) -> DraftWorker:
        return cls(ModelRunner(path, **kw), top_m=top_m, confidence_stop=confidence_stop)

    @property
    def live_sequences(self) -> int:
        return len(self._seqs)

    @property
    def kv_tokens(self) -> int:
        """Tokens held in the KV cache (the budget counts these)."""
        return self.runner.kv_tokens

    @property
    def max_kv_tokens(self) -> int | None:
        return self.runner.max_kv_tokens

    def committed_len(self, seq_id: str) -> int:
        """The sequence's committed length (the speculative tail not counted), for checks."""
        return self._get(seq_id).committed_len

    def release(self, seq_id: str) -> bool:
        self.runner.release(seq_id)
        return self._seqs.pop(seq_id, None) is not None

    # -- batched (one call, many rows; each row answered on its own) --------------------------

    def prefill_batch(self, rows: list[PrefillRow]) -> list[object]:
        """Per row: None, or the exception that refused that row (KVBudgetExceeded when the
        budget is full). All admitted prompts are prefilled in one forward."""
        out, work, later = split_prefill(rows, self.runner, self._check_prompt)
        for i in work:
            self.release(rows[i].seq_id)
        try:  # the cache never holds the last token: drafting feeds it
            self.runner.extend_batch(
                [(rows[i].seq_id, rows[i].token_ids[:-1]) for i in work], logits=False
            )
        except Exception as exc:  # noqa: BLE001 - every row of the failed forward
            for i in work:
                self.runner.release(rows[i].seq_id)
                out[i] = exc
            work = []
        for i in work:
            r, n = rows[i], len(rows[i].token_ids)
            rng = PositionalRng(r.params.seed, DRAFT_STREAM)
            self._seqs[r.seq_id] = _DraftSeq(list(r.token_ids), n, r.params, rng)
        for i in later:
            out[i] = self.prefill_batch([rows[i]])[0]
        return out

    def _check_prompt(self, r: PrefillRow) -> None:
        check_token_ids("token_ids", r.token_ids, self.runner.vocab_size)
        check_length("prompt", len(r.token_ids), self.runner.max_context)

    def propose_batch(self, rows: list[ProposeRow]) -> list[object]:
        """Per row: a Proposal of up to k tokens after everything the sequence holds (committed
        + tail), or the exception that refused that row.

        Each row's `commit` (tokens committed after its committed_len: a router sends the result
        of a round and asks for the next block in one row) is applied first, then its `start`
        (an absolute position between the committed length and the end of the tail: draft from
        there, dropping the tail after it); a row refused after its commit keeps the commit.
        Then the k_i drafting steps of all rows run batched: step j is one forward over the rows
        that still draft (ragged k: the others drop out). Fewer than k tokens come back only at
        the model's context limit, or after a token the draft was unsure of (confidence_stop).
        Sampling draws from each row's positional stream, so a row drafts what it would alone.
        """
        out: list[object] = [None] * len(rows)
        todo: dict[int, tuple[_DraftSeq, int, int]] = {}  # row -> (seq, start, k)
        later: list[int] = []
        named: set[str] = set()
        for i, r in enumerate(rows):
            if r.seq_id in named:  # the same sequence again: after the batch, in order
                later.append(i)
                continue
            named.add(r.seq_id)
            try:
                todo[i] = self._begin(r)
            except Exception as exc:  # noqa: BLE001 - a refused row fails alone
                out[i] = exc
        drafted: dict[int, list[int]] = {i: [] for i in todo}
        unsure: set[int] = set()  # rows whose latest token was below the confidence stop
        idx: dict[int, list[torch.Tensor]] = {i: [] for i in todo}
        prob: dict[int, list[torch.Tensor]] = {i: [] for i in todo}
        active = [i for i, (_, _, k) in todo.items() if k > 0]
        while active:
            items = []
            for i in active:
                seq = todo[i][0]
                items.append((rows[i].seq_id, seq.tokens[self.runner.length(rows[i].seq_id) :]))
            try:
                logits = self.runner.extend_batch(items)
            except Exception as exc:  # noqa: BLE001 - the rows of the failed forward
                for i in active:
                    out[i] = exc
                    del todo[i]
                break
            for i, lg in zip(active, logits, strict=True):
                seq = todo[i][0]
                tok = self._draw(seq, lg[-1], idx[i], prob[i])
                drafted[i].append(tok)
                seq.tokens.append(tok)
                if self.confidence_stop and self._confidence(seq, lg[-1], tok, idx[i], prob[i]) < (
                    self.confidence_stop
                ):
                    unsure.add(i)
            active = [i for i in active if len(drafted[i]) < todo[i][2] and i not in unsure]
        for i, (_, start, _) in todo.items():
            q = SparseQ(torch.stack(idx[i]), torch.stack(prob[i])) if idx[i] else None
            out[i] = Proposal(start, drafted[i], q, unsure_last=i in unsure)
        for i in later:
            out[i] = self.propose_batch([rows[i]])[0]
        return out

    def _begin(self, r: ProposeRow) -> tuple[_DraftSeq, int, int]:
        """Apply the row's commit and start; (seq, where drafting starts, k after clamping)."""
        commit = check_token_ids("commit", r.commit, self.runner.vocab_size)
        committed_len = r.committed_len
        if commit:
            committed_len = self._commit(r.seq_id, committed_len, commit)
        seq = self._get(r.seq_id)
        self._check(r.seq_id, seq, committed_len)
        if r.k < 1:
            raise ValueError(f"k must be >= 1, got {r.k}")
        if r.start is not None:
            if not seq.committed_len <= r.start <= len(seq.tokens):
                raise ValueError(
                    f"start: {r.start} is outside [{seq.committed_len}, {len(seq.tokens)}]"
                )
            del seq.tokens[r.start :]
            # The cache never holds the last token: drafting feeds it to get the next logits.
            self.runner.rollback(r.seq_id, min(self.runner.length(r.seq_id), r.start - 1))
        start = len(seq.tokens)
        return seq, start, max(0, min(r.k, self.runner.max_context - start + 1))

    def _commit(self, seq_id: str, committed_len: int, new_tokens: list[int]) -> int:
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

    def _draw(self, seq: _DraftSeq, logits: torch.Tensor, idx: list, prob: list) -> int:
        return draw_token(seq.params, seq.rng.at(len(seq.tokens)), logits, self.top_m, idx, prob)

    @staticmethod
    def _confidence(seq: _DraftSeq, logits: torch.Tensor, tok: int, idx: list, prob: list) -> float:
        return confidence(seq.params, logits, tok, idx, prob)

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


def check_draft_options(top_m: int, confidence_stop: float) -> None:
    """Every draft worker's knobs: q's support size and where a block stops."""
    if top_m < 1:
        raise ValueError(f"top_m must be >= 1, got {top_m}")
    if not 0.0 <= confidence_stop < 1.0:
        raise ValueError(f"confidence_stop must be in [0, 1), got {confidence_stop}")


def draw_token(
    params: SamplingParams,
    gen: torch.Generator,
    logits: torch.Tensor,
    top_m: int,
    idx: list,
    prob: list,
) -> int:
    """The next draft token from one row of full-vocabulary logits (greedy: argmax; else drawn
    from the warped top-m, whose indices and renormalized probabilities, the row's q, are
    appended to idx / prob)."""
    if params.greedy:
        return int(logits.argmax())
    probs = warp_probs(logits, params)
    m = min(top_m, probs.shape[-1])
    top = torch.topk(probs, m)
    top_p = top.values / top.values.sum()
    choice = int(torch.multinomial(top_p, 1, generator=gen))
    idx.append(top.indices)
    prob.append(top_p)
    return int(top.indices[choice])


def confidence(
    params: SamplingParams, logits: torch.Tensor, tok: int, idx: list, prob: list
) -> float:
    """The draft's probability of the token it just drafted (of its q, when sampling)."""
    if params.greedy:
        return float(torch.softmax(logits.float(), dim=-1)[tok])
    return float(prob[-1][idx[-1] == tok].sum())
