"""The target side: verifies a draft block in one forward pass, or decodes one plain step.

Per sequence the worker keeps the committed tokens; its KV cache holds all of them but the last,
which is fed together with the draft block, so verifying k tokens is one forward over k+1 positions
and its logits are exactly p_1..p_{k+1}. After every call the cache is rolled back to the new
committed length minus one: rejected draft positions never survive a round.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from workers.batch import PrefillRow, VerifyRow, plain_verdict, run_row
from workers.errors import StaleSequenceError, UnknownSequenceError
from workers.model_runner import ModelRunner
from workers.sampling import PositionalRng, SamplingParams, next_token, warp_probs
from workers.verification import SparseQ, Verdict, verify_greedy, verify_sampled

TARGET_STREAM = 0


@dataclass(slots=True)
class _TargetSeq:
    tokens: list[int]  # committed tokens; the KV cache holds tokens[:-1]
    params: SamplingParams
    rng: PositionalRng
    last_call: tuple | None = None  # (key, result) of the last verify/plain step, for retries


class TargetWorker:
    """Verifies and decodes for many sequences on one model (or one tensor-parallel rank)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._seqs: dict[str, _TargetSeq] = {}

    @classmethod
    def from_path(cls, path: str | os.PathLike, **kw) -> TargetWorker:
        return cls(ModelRunner(path, **kw))

    @property
    def max_context(self) -> int:
        return self.runner.max_context

    @property
    def live_sequences(self) -> int:
        return len(self._seqs)

    def prefill(self, seq_id: str, token_ids: list[int], params: SamplingParams) -> None:
        """(Re)start a sequence from its committed tokens; replaces any earlier state."""
        if not token_ids:
            raise ValueError("prompt: must contain at least one token")
        if len(token_ids) > self.runner.max_context:
            raise ValueError(
                f"prompt: {len(token_ids)} tokens exceed the target context of "
                f"{self.runner.max_context}"
            )
        self.release(seq_id)
        self.runner.extend(seq_id, list(token_ids[:-1]))
        self._seqs[seq_id] = _TargetSeq(
            list(token_ids), params, PositionalRng(params.seed, TARGET_STREAM)
        )

    def committed_len(self, seq_id: str) -> int:
        return len(self._get(seq_id).tokens)

    def committed_tokens(self, seq_id: str) -> list[int]:
        return list(self._get(seq_id).tokens)

    def verify(
        self, seq_id: str, committed_len: int, draft_tokens: list[int], q: SparseQ | None = None
    ) -> Verdict:
        """Accept a prefix of draft_tokens and add one recovered or bonus token; commits both."""
        seq = self._get(seq_id)
        key = ("verify", committed_len, tuple(draft_tokens))
        if seq.last_call is not None and seq.last_call[0] == key:
            return seq.last_call[1]  # a retry of the call that was just applied
        self._check(seq_id, seq, committed_len)
        if not draft_tokens:
            raise ValueError("draft_tokens: must contain at least one token")
        if committed_len + len(draft_tokens) > self.runner.max_context:
            raise ValueError(f"draft_tokens: block would pass the context of {self.max_context}")
        if not seq.params.greedy and (q is None or q.indices.shape[0] != len(draft_tokens)):
            raise ValueError("q: sampling needs one draft distribution per draft token")
        logits = self.runner.extend(seq_id, [seq.tokens[-1], *draft_tokens])
        drafted = torch.tensor(draft_tokens, dtype=torch.long)
        if seq.params.greedy:
            verdict = verify_greedy(logits, drafted)
        else:
            verdict = verify_sampled(
                warp_probs(logits, seq.params), drafted, q, seq.rng, committed_len
            )
        seq.tokens.extend(verdict.committed(draft_tokens))
        self.runner.rollback(seq_id, len(seq.tokens) - 1)
        seq.last_call = (key, verdict)
        return verdict

    def plain_step(self, seq_id: str, committed_len: int) -> int:
        """One ordinary decoding step (the fallback path), with the same sampler as verify."""
        seq = self._get(seq_id)
        key = ("plain", committed_len)
        if seq.last_call is not None and seq.last_call[0] == key:
            return seq.last_call[1]
        self._check(seq_id, seq, committed_len)
        logits = self.runner.extend(seq_id, [seq.tokens[-1]])[-1]
        token = next_token(logits, seq.params, seq.rng.at(committed_len))
        seq.tokens.append(token)
        seq.last_call = (key, token)
        return token

    def release(self, seq_id: str) -> bool:
        self.runner.release(seq_id)
        return self._seqs.pop(seq_id, None) is not None

    # -- batched (one call, many rows; each row answered on its own) --------------------------

    def prefill_batch(self, rows: list[PrefillRow]) -> list[object]:
        """Per row: None, or the exception that refused that row."""
        return [run_row(self.prefill, r.seq_id, list(r.token_ids), r.params) for r in rows]

    def verify_batch(self, rows: list[VerifyRow]) -> list[object]:
        """Per row: a Verdict (a plain row: accepted 0 and the next token), or the row's error.

        Reference semantics: exactly what each row's own verify / plain_step answers.
        """
        out: list[object] = []
        for r in rows:
            if r.plain:
                res = run_row(self.plain_step, r.seq_id, r.committed_len)
                out.append(res if isinstance(res, BaseException) else plain_verdict(res))
            else:
                args = (r.seq_id, r.committed_len, list(r.draft_tokens), r.q)
                out.append(run_row(self.verify, *args))
        return out

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

