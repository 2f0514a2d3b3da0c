"""The draft side for a feature head (workers/checkpoints/feature_head.py): drafts from the
target's own features, which arrive over the wire with each row's commits.

Per sequence it keeps the committed tokens x[0..c-1], the target's features f[0..] as they came
(packed in ProposeRow.commit_features, appended in order), and the head's KV cache over the
pairs (x[j], f[j-1]), j = 1.. . The target's cache holds every committed token but the last, so
it has handed out c - 1 features exactly when the row is in step: after its prefill (n prompt
features, c = n + 1 with the first token) and after every verify (accepted + 1 more) or plain
step (1 more). Drafting needs that: a row whose features lag is refused (ValueError naming
commit_features) and the caller falls back to another drafter or a plain step.

A draft of k tokens feeds the pairs not in the cache yet (true features), reads the head's f'
at the last committed position, and proposes d1 from it; then (d1, f') -> d2, and so on: the
head's own features stand in for the target's, which has not seen the draft yet (EAGLE). Those
speculative entries are cut from the cache at the next propose, so the cache only ever holds
pairs with the target's features: a rollback is a crop, and a draft after it equals a draft
from scratch. It drafts from its committed length only: drafting further ahead (pipelining)
would need features of tokens nobody verified.

Rows run one after another through the one-layer head (no batched cache yet): a head step is
a few ms on a CPU. Sampling and the confidence stop are the model draft's (workers/draft.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from workers.batch import PrefillRow, Proposal, ProposeRow
from workers.checkpoints.feature_head import FeatureHead, load_feature_head
from workers.draft import DRAFT_STREAM, check_draft_options, confidence, draw_token
from workers.errors import StaleSequenceError, UnknownSequenceError
from workers.sampling import PositionalRng
from workers.token_range import check_length, check_token_ids
from workers.types import SamplingParams, SparseQ
from workers.wire import unpack_features


@dataclass(slots=True)
class FeatureRunnerInfo:
    """What a worker's `runner` tells Stats and the deployments (workers/protocols.RunnerInfo)."""

    path: str
    vocab_size: int
    max_context: int
    eos_token_ids: set[int]
    tokenizer: object
    dtype: torch.dtype
    forward: str = "feature"


@dataclass(slots=True)
class _FeatSeq:
    tokens: list[int]  # committed tokens (a feature draft keeps no speculative tail)
    committed_len: int
    params: SamplingParams
    rng: PositionalRng
    # The target's features not fed to the head yet ([n_i, d] chunks, in order): positions
    # fed .. n_feats - 1. Fed ones are never needed again (a rollback keeps every fed pair).
    pending: list[torch.Tensor] = field(default_factory=list)
    n_feats: int = 0  # features received in all
    cache: DynamicCache = field(default_factory=DynamicCache)
    fed: int = 0  # pairs in the cache with the target's features: positions 1..fed
    last: torch.Tensor | None = None  # the head's f' at position `fed` (drafts d1 from it)


class FeatureDraftWorker:
    """Drafts for many sequences from one feature head. Callers serialize access."""

    def __init__(
        self,
        head: FeatureHead,
        info: FeatureRunnerInfo,
        top_m: int = 64,
        confidence_stop: float = 0.0,
    ) -> None:
        check_draft_options(top_m, confidence_stop)
        self.head = head
        self.runner = info
        self.top_m = top_m
        self.confidence_stop = confidence_stop
        self.hidden = int(head.config.hidden_size)
        self._seqs: dict[str, _FeatSeq] = {}

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        target: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        top_m: int = 64,
        confidence_stop: float = 0.0,
    ) -> FeatureDraftWorker:
        """A saved head, completed by its target's checkpoint (embeddings, norm, output rows;
        the tokenizer and context come from there too)."""
        from transformers import AutoConfig

        from workers.model_runner import load_tokenizer

        target = Path(target)
        head = load_feature_head(Path(path), target, dtype=dtype)
        cfg = AutoConfig.from_pretrained(target)
        eos = cfg.eos_token_id
        info = FeatureRunnerInfo(
            path=str(path),
            vocab_size=int(cfg.vocab_size),
            max_context=int(getattr(cfg, "max_position_embeddings", 2048)),
            eos_token_ids=set(eos) if isinstance(eos, list) else {int(eos)},
            tokenizer=load_tokenizer(target),
            dtype=dtype,
        )
        return cls(head, info, top_m=top_m, confidence_stop=confidence_stop)

    @property
    def live_sequences(self) -> int:
        return len(self._seqs)

    @property
    def kv_tokens(self) -> int:
        return sum(s.cache.get_seq_length() for s in self._seqs.values())

    @property
    def max_kv_tokens(self) -> int | None:
        return None

    def committed_len(self, seq_id: str) -> int:
        return self._get(seq_id).committed_len

    def release(self, seq_id: str) -> bool:
        return self._seqs.pop(seq_id, None) is not None

    def prefill_batch(self, rows: list[PrefillRow]) -> list[object]:
        """Per row: None, or the row's error. Only the tokens: the prompt's features come
        with the row's first propose (the target hands them out with its own prefill)."""
        out: list[object] = [None] * len(rows)
        for i, r in enumerate(rows):
            try:
                check_token_ids("token_ids", r.token_ids, self.runner.vocab_size)
                check_length("prompt", len(r.token_ids), self.runner.max_context)
            except ValueError as exc:
                out[i] = exc
                continue
            rng = PositionalRng(r.params.seed, DRAFT_STREAM)
            self._seqs[r.seq_id] = _FeatSeq(list(r.token_ids), len(r.token_ids), r.params, rng)
        return out

    @torch.inference_mode()
    def propose_batch(self, rows: list[ProposeRow]) -> list[object]:
        """Per row: a Proposal of up to k tokens after the committed ones, or the row's error.
        The row's commit and commit_features are applied first (a row refused after that
        keeps them)."""
        out: list[object] = [None] * len(rows)
        for i, r in enumerate(rows):
            try:
                out[i] = self._propose(r)
            except Exception as exc:  # noqa: BLE001 - a refused row fails alone
                out[i] = exc
        return out

    def _propose(self, r: ProposeRow) -> Proposal:
        commit = check_token_ids("commit", r.commit, self.runner.vocab_size)
        seq = self._get(r.seq_id)
        if seq.committed_len != r.committed_len:
            applied = seq.committed_len == r.committed_len + len(commit)
            if not (applied and seq.tokens[r.committed_len :] == list(commit)):
                raise StaleSequenceError(
                    f"sequence {r.seq_id!r}: draft holds committed length {seq.committed_len}, "
                    f"caller assumed {r.committed_len}"
                )
        else:  # not applied yet (a retry finds it applied: the same tokens and features)
            feats = unpack_features(r.commit_features, self.hidden, "commit_features")
            c = seq.committed_len + len(commit)
            if seq.n_feats + len(feats) > c - 1:
                raise ValueError(
                    f"commit_features: {seq.n_feats + len(feats)} features for committed "
                    f"length {c}; at most {c - 1}"
                )
            seq.tokens.extend(commit)
            seq.committed_len = c
            if len(feats):
                seq.pending.append(feats.to(self.head.fc.weight.dtype))
                seq.n_feats += len(feats)
        if r.k < 1:
            raise ValueError(f"k must be >= 1, got {r.k}")
        if r.start is not None and r.start != seq.committed_len:
            raise ValueError(
                f"start: a feature draft drafts from its committed length only "
                f"({seq.committed_len}), got {r.start}"
            )
        c = seq.committed_len
        if seq.n_feats != c - 1:
            raise ValueError(
                f"commit_features: the draft holds {seq.n_feats} of the target's features for "
                f"committed length {c}; drafting needs {c - 1}"
            )
        k = max(0, min(r.k, self.runner.max_context - c))
        self._catch_up(seq)
        return self._draft(seq, k)

    def _catch_up(self, seq: _FeatSeq) -> None:
        """Cut the last draft's speculative pairs, then feed the committed ones not in the
        cache yet: (x[j], f[j-1]) for j = fed+1 .. c-1."""
        cached = seq.cache.get_seq_length()
        if cached > seq.fed:
            seq.cache.crop(seq.fed - cached)
        c = seq.committed_len
        if seq.fed == c - 1:
            return
        feats = torch.cat(seq.pending) if len(seq.pending) > 1 else seq.pending[0]
        seq.pending = []
        lo, hi = seq.fed + 1, c  # positions of the tokens to feed
        ids = torch.tensor([seq.tokens[lo:hi]])
        pos = torch.arange(lo, hi)[None]
        f_out = self.head(ids, feats[None], pos, past=seq.cache)  # f[fed .. c-2]
        seq.fed = c - 1
        seq.last = f_out[:, -1:]

    def _draft(self, seq: _FeatSeq, k: int) -> Proposal:
        start = seq.committed_len
        drafted: list[int] = []
        idx: list[torch.Tensor] = []
        prob: list[torch.Tensor] = []
        unsure = False
        f = seq.last
        for j in range(k):
            if j:  # feed the previous draft token with the head's own feature
                ids = torch.tensor([[drafted[-1]]])
                f = self.head(ids, f, torch.tensor([[start + j - 1]]), past=seq.cache)
            logits = self._full_logits(f[0, -1])
            tok = draw_token(seq.params, seq.rng.at(start + j), logits, self.top_m, idx, prob)
            drafted.append(tok)
            if self.confidence_stop and confidence(seq.params, logits, tok, idx, prob) < (
                self.confidence_stop
            ):
                unsure = True
                break
        q = SparseQ(torch.stack(idx), torch.stack(prob)) if idx else None
        return Proposal(start, drafted, q, unsure_last=unsure, drafter="feature")

    def _full_logits(self, feat: torch.Tensor) -> torch.Tensor:
        """The head's scores scattered into the full vocabulary (-inf outside its words)."""
        sub = self.head.logits(feat).float()
        full = torch.full((self.runner.vocab_size,), float("-inf"))
        return full.index_copy_(0, self.head.head_ids, sub)

    def _get(self, seq_id: str) -> _FeatSeq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise UnknownSequenceError(f"draft holds no sequence {seq_id!r}") from None
