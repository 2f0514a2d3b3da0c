"""The target side: verifies a draft block in one forward pass, or decodes one plain step.

Per sequence the worker keeps the committed tokens; its KV cache holds all of them but the last,
which is fed together with the draft block, so verifying k tokens is one forward over k+1 positions
and its logits are exactly p_1..p_{k+1}. After every call the cache is rolled back to the new
committed length minus one: rejected draft positions never survive a round (they become holes of
the batched cache). A batched call runs all its rows in one forward.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from workers.batch import (
    PrefillRow,
    PrefillToken,
    VerifyRow,
    plain_verdict,
    run_row,
    split_prefill,
)
from workers.errors import StaleSequenceError, UnknownSequenceError
from workers.grammar import OutputGrammar
from workers.logits_processing import process_logits
from workers.logprobs import token_logprobs
from workers.model_runner import ModelRunner
from workers.sampling import PositionalRng, next_token, warp_probs
from workers.token_range import check_id_bounds, check_length, check_token_ids
from workers.types import SamplingParams, Verdict
from workers.verification import one_hot_q, verify_greedy, verify_sampled
from workers.wire import pack_features

TARGET_STREAM = 0


@dataclass(slots=True)
class _TargetSeq:
    tokens: list[int]  # committed tokens; the KV cache holds tokens[:-1]
    params: SamplingParams
    rng: PositionalRng
    prompt_len: int  # tokens[:prompt_len] are the request's prompt (penalties count the rest)
    grammar: OutputGrammar | None = None  # the structured output's state over the output
    last_call: tuple | None = None  # (key, result) of the last verify/plain step, for retries


class TargetWorker:
    """Verifies and decodes for many sequences on one model (or one tensor-parallel rank)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._seqs: dict[str, _TargetSeq] = {}
        self.prefilled_tokens = 0  # prompt tokens run through prefill forwards (forks: none)

    @classmethod
    def from_path(cls, path: str | os.PathLike, **kw) -> TargetWorker:
        return cls(ModelRunner(path, **kw))

    @property
    def max_context(self) -> int:
        return self.runner.max_context

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

    def committed_tokens(self, seq_id: str) -> list[int]:
        """The sequence's committed tokens, for checks (the batched calls answer with lengths)."""
        return list(self._get(seq_id).tokens)

    def release(self, seq_id: str) -> bool:
        self.runner.release(seq_id)
        return self._seqs.pop(seq_id, None) is not None

    # -- batched (one call, many rows; each row answered on its own) --------------------------

    def prefill_batch(self, rows: list[PrefillRow]) -> list[object]:
        """Per row: the next token, or the exception that refused that row (KVBudgetExceeded
        when the budget is full). All admitted prompts are prefilled in one forward, which also
        decodes each row's next token from its last position (the head runs there only): the
        first token costs no pass of its own. The token is committed, as a plain step's is.
        A row that forks an earlier row of the call with the same tokens (n samples of one
        prompt) copies its KV and logits instead of computing them, and draws its own token."""
        out, work, later = split_prefill(rows, self.runner, self._check_prompt, holds_last=True)
        for i in work:
            self.release(rows[i].seq_id)
        sources = _fork_sources(rows, work)
        computed = [i for i in work if i not in sources]
        # Rows that want their prompt's log-probabilities need every position's logits: a
        # forward of their own; the others run the head at their last position only.
        whole = [i for i in computed if rows[i].params.prompt_logprobs is not None]
        logits: dict[int, torch.Tensor | BaseException] = {}
        feats: dict[int, torch.Tensor] = {}
        for group, last in (([i for i in computed if i not in whole], True), (whole, False)):
            self._prefill_forward(rows, group, last, logits, feats)
        for i in work:
            r, src = rows[i], sources.get(i, i)
            failed = logits[src] if isinstance(logits[src], BaseException) else out[src]
            if isinstance(failed, BaseException):
                self.runner.release(r.seq_id)
                out[i] = failed
                continue
            if i in sources:
                self.runner.fork(rows[src].seq_id, r.seq_id, len(r.token_ids))
            out[i] = run_row(self._first_token, r, logits[src], feats.get(src))
            if isinstance(out[i], BaseException):
                self.runner.release(r.seq_id)
        for i in later:
            out[i] = self.prefill_batch([rows[i]])[0]
        return out

    def _prefill_forward(
        self,
        rows: Sequence[PrefillRow],
        group: list[int],
        last: bool,
        logits: dict[int, torch.Tensor | BaseException],
        feats: dict[int, torch.Tensor],
    ) -> None:
        """One prefill forward of rows[i] for i in group: each row's logits (its last
        position's, or every position's) or the exception that failed the forward, into
        `logits`; the features of the rows that asked, into `feats`."""
        if not group:
            return
        items = [(rows[i].seq_id, list(rows[i].token_ids)) for i in group]
        res, fs = self._forward(items, last=last, features=any(rows[i].features for i in group))
        if not isinstance(res, BaseException):
            self.prefilled_tokens += sum(len(t) for _, t in items)
        for j, i in enumerate(group):
            logits[i] = res if isinstance(res, BaseException) else res[j]
            if rows[i].features and not isinstance(res, BaseException):
                feats[i] = fs[j]

    def _first_token(self, r: PrefillRow, logits: torch.Tensor, feats: torch.Tensor | None) -> int:
        """Decode a prefilled row's next token from its logits ([1, V] at its last position,
        or [n, V] at every position when it asked for its prompt's log-probabilities) and start
        its sequence; ValueError for a grammar the matcher refuses (the row fails alone)."""
        n = len(r.token_ids)
        prompt_len = n if r.prompt_len is None else r.prompt_len
        grammar = self._grammar(r.params, r.token_ids[prompt_len:])
        final = logits[-1:]
        last = process_logits(final, r.token_ids, prompt_len, (), r.params)
        if grammar is not None:
            last = grammar.mask(last, ())
        rng = PositionalRng(r.params.seed, TARGET_STREAM)
        token = next_token(last[0], r.params, rng.at(n))
        if grammar is not None:
            grammar.commit([token])
        # The cache now holds all committed tokens but the new last one, as after a step.
        self._seqs[r.seq_id] = _TargetSeq([*r.token_ids, token], r.params, rng, prompt_len, grammar)
        prompt = ()
        if r.params.prompt_logprobs is not None and logits.shape[0] == n:
            prompt = token_logprobs(logits[:-1], r.token_ids[1:], r.params.prompt_logprobs)
        forced = grammar.forced() if grammar is not None else ()
        return PrefillToken.of(
            token, pack_features(feats), _logprobs(final, [token], r.params), prompt, forced
        )

    def _check_prompt(self, r: PrefillRow) -> None:
        vocab = self.runner.vocab_size
        check_token_ids("token_ids", r.token_ids, vocab)
        check_length("prompt", len(r.token_ids), self.runner.max_context, new_tokens=1)
        if r.prompt_len is not None and not 1 <= r.prompt_len <= len(r.token_ids):
            raise ValueError(f"prompt_len: must be in [1, {len(r.token_ids)}], got {r.prompt_len}")
        check_token_ids("logit_bias", [t for t, _ in r.params.logit_bias], vocab)
        check_token_ids("held_ids", r.params.held_ids, vocab)

    def verify_batch(self, rows: list[VerifyRow]) -> list[object]:
        """Per row: a Verdict (a plain row: accepted 0 and the next token), or the row's error.

        Every row that needs the model is verified in ONE forward (a plain row feeds one
        position, a row with k draft tokens k + 1). Semantics are each row's own verify /
        plain_step: retries of the last call answered again, stale / unknown rows refused alone.
        A seq_id named twice: the later rows run after the batch, in order.
        """
        out: list[object] = [None] * len(rows)
        work: list[tuple[int, _TargetSeq, tuple]] = []
        later: list[int] = []
        named: set[str] = set()
        for i, r in enumerate(rows):
            if r.seq_id in named:
                later.append(i)
                continue
            named.add(r.seq_id)
            try:
                seq, key, cached = self._begin(r)
            except Exception as exc:  # noqa: BLE001 - a refused row fails alone
                out[i] = exc
                continue
            if cached is not None:
                out[i] = cached
            else:
                work.append((i, seq, key))
        items = [(rows[i].seq_id, [seq.tokens[-1], *rows[i].draft_tokens]) for i, seq, _ in work]
        res, feats = self._forward(items, features=any(rows[i].features for i, _, _ in work))
        for j, (i, seq, key) in enumerate(work):
            if isinstance(res, BaseException):
                out[i] = res
                continue
            f = feats[j] if rows[i].features else None
            out[i] = run_row(self._finish, rows[i], seq, key, res[j], f)
        for i in later:
            out[i] = self.verify_batch([rows[i]])[0]
        return out

    def _begin(self, r: VerifyRow) -> tuple[_TargetSeq, tuple, object | None]:
        """The row's checks; (seq, key, the cached answer of a retry or None). Its arguments
        first: a malformed row is refused as such whatever the sequence's state."""
        self._check_block(r)
        seq = self._get(r.seq_id)
        n = r.committed_len
        key = ("plain", n) if r.plain else ("verify", n, tuple(r.draft_tokens))
        if seq.last_call is not None and seq.last_call[0] == key:  # a retry: answer again
            return seq, key, seq.last_call[1]
        self._check(r.seq_id, seq, n)
        if r.plain:
            self.runner.check_extend(r.seq_id, 1)
        else:
            k = len(r.draft_tokens)
            check_length("draft_tokens", n, self.runner.max_context, new_tokens=k)
            if not seq.params.greedy and r.q is None and not r.one_hot:
                raise ValueError("q: sampling needs one draft distribution per draft token")
        return seq, key, None

    def _check_block(self, r: VerifyRow) -> None:
        """The draft block's token ids, and q when sent: one row per draft token, its indices
        token ids too."""
        vocab = self.runner.vocab_size
        check_token_ids("draft_tokens", r.draft_tokens, vocab)
        if r.q is None:
            return
        if r.one_hot:
            raise ValueError("q: must be empty when one_hot (the tokens are certain)")
        if r.q.indices.shape[0] != len(r.draft_tokens):
            raise ValueError("q: needs one draft distribution per draft token")
        if r.q.indices.numel():
            check_id_bounds("q", int(r.q.indices.min()), int(r.q.indices.max()), vocab)

    def _finish(
        self,
        r: VerifyRow,
        seq: _TargetSeq,
        key: tuple,
        logits: torch.Tensor,
        feats: torch.Tensor | None = None,
    ) -> Verdict:
        """The round's verdict; `feats` (the fed positions' features) when the row asked:
        the verdict carries those of the positions now committed."""
        n = r.committed_len
        draft = list(r.draft_tokens)
        raw = logits
        logits = process_logits(logits, seq.tokens, seq.prompt_len, draft, seq.params)
        if seq.grammar is not None:
            logits = seq.grammar.mask(logits, draft)
        if r.plain:
            token = next_token(logits[-1], seq.params, seq.rng.at(n))
            if seq.grammar is not None:
                seq.grammar.commit([token])
            seq.tokens.append(token)
            verdict = plain_verdict(
                token, pack_features(feats), _logprobs(raw[-1:], [token], seq.params)
            )
            if seq.grammar is not None:
                verdict = replace(verdict, forced=seq.grammar.forced())
            seq.last_call = (key, verdict)
            return verdict
        drafted = torch.tensor(draft, dtype=torch.long)
        if seq.params.greedy:
            verdict = verify_greedy(logits, drafted)
        else:
            q = one_hot_q(drafted) if r.q is None else r.q  # r.one_hot (checked in _begin)
            verdict = verify_sampled(warp_probs(logits, seq.params), drafted, q, seq.rng, n)
        if feats is not None:  # the last committed token's and the accepted ones'
            verdict = replace(verdict, features=pack_features(feats[: verdict.accepted + 1]))
        committed = verdict.committed(draft)
        if seq.params.logprobs is not None:
            verdict = replace(verdict, logprobs=_logprobs(raw, committed, seq.params))
        if seq.grammar is not None:
            seq.grammar.commit(committed)
            verdict = replace(verdict, forced=seq.grammar.forced())
        seq.tokens.extend(committed)
        self.runner.rollback(r.seq_id, len(seq.tokens) - 1)  # rejected positions become holes
        seq.last_call = (key, verdict)
        return verdict

    def _forward(
        self, items: list[tuple[str, list[int]]], last: bool = False, features: bool = False
    ) -> tuple[list[torch.Tensor] | BaseException, list[torch.Tensor]]:
        """One batched forward: (per row logits, per row features when asked, else []), or
        the exception that failed it (then every row it carried) in place of the logits."""
        if not items:
            return [], []
        try:
            if features:
                return self.runner.extend_batch_features(items, last=last)
            return self.runner.extend_batch(items, last=last), []
        except Exception as exc:  # noqa: BLE001 - answered per row by the caller
            return exc, []

    def _grammar(self, params: SamplingParams, output: Sequence[int]) -> OutputGrammar | None:
        """The sequence's grammar state over its output so far (a re-prefill's too)."""
        if not params.grammar:
            return None
        return OutputGrammar(self.runner.tokenizer, params.grammar, self.runner.vocab_size, output)

    def _get(self, seq_id: str) -> _TargetSeq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise UnknownSequenceError(f"target holds no sequence {seq_id!r}") from None

    @staticmethod
    def _check(seq_id: str, seq: _TargetSeq, committed_len: int) -> None:
        if len(seq.tokens) != committed_len:
            raise StaleSequenceError(
                f"sequence {seq_id!r}: target holds committed length {len(seq.tokens)}, "
                f"caller assumed {committed_len}"
            )


def _logprobs(logits: torch.Tensor, tokens: list[int], params: SamplingParams) -> tuple:
    """The committed tokens' log-probabilities when the sequence asked, else ()."""
    if params.logprobs is None:
        return ()
    return token_logprobs(logits, tokens, params.logprobs)


def _fork_sources(rows: Sequence[PrefillRow], work: list[int]) -> dict[int, int]:
    """row index -> the index of the earlier row of this call it forks (same token ids, both
    prefilled now); rows whose source is not there are computed as any other."""
    first: dict[str, int] = {rows[i].seq_id: i for i in work}
    out: dict[int, int] = {}
    for i in work:
        src = first.get(rows[i].fork_of or "")
        if src is not None and src < i and src not in out:
            if list(rows[src].token_ids) == list(rows[i].token_ids):
                out[i] = src
    return out
