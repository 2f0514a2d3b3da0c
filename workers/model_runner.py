"""Runs one local Hugging Face causal LM over many sequences in one batched KV cache.

The runner knows nothing about drafting or verification: it extends sequences by n_i tokens each
in ONE forward and returns their logits, rolls a sequence back, and releases it (the rows, holes
and masks are workers/batch_kv.py's). Models load from local paths only.

transformers 5.x renames the forward's `past_key_values=` to `cache=` (the old name goes in
5.40); the runner passes whichever the loaded model's forward declares.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import workers.checkpoints.subset_draft  # noqa: F401 - registers the reduced-vocabulary draft type
from workers.batch_kv import BatchedKV, Step
from workers.dtypes import resolve_dtype
from workers.lean_forward import COMPILES, FORWARDS, KVWindow, LeanForward, unsupported

log = logging.getLogger(__name__)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(_local_dir(path), local_files_only=True)


def _local_dir(path: str | os.PathLike) -> str:
    p = Path(path)
    if not (p / "config.json").is_file() and not (p / "tokenizer.json").is_file():
        raise ValueError(
            f"model path {str(path)!r} is not a local Hugging Face checkpoint directory"
        )
    return str(p)


def check_same_tokenizer(draft: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase) -> None:
    """Draft and target must map text to the same ids, or the draft's tokens mean nothing."""
    if draft.get_vocab() != target.get_vocab() or draft.eos_token_id != target.eos_token_id:
        raise ValueError(
            "tokenizer: draft and target tokenizers differ (vocabulary or EOS); "
            "speculative decoding needs a shared tokenizer"
        )


class ModelRunner:
    """One model, many sequences. Not thread-safe: callers serialize access."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: str = "cpu",
        tp_plan: str | None = None,
        max_kv_tokens: int | None = None,
        forward: str = "auto",
        compile: str = "off",
    ) -> None:
        # A name (`models.dtype`, "auto" included) resolves here, on the device that runs it;
        # the default stays float32, where greedy decoding equals HF `generate` token for token.
        kwargs: dict = {"dtype": resolve_dtype(dtype, device), "local_files_only": True}
        if tp_plan is not None:
            # transformers shards the model over the process group the caller initialized.
            from torch import distributed as dist
            from transformers.distributed import DistributedConfig

            kwargs["distributed_config"] = DistributedConfig(
                tp_plan=tp_plan, tp_size=dist.get_world_size()
            )
        self.path = str(path)
        self.model = AutoModelForCausalLM.from_pretrained(_local_dir(path), **kwargs).eval()
        if tp_plan is None:
            self.model.to(device)
        self.device = self.model.device
        self.dtype: torch.dtype = self.model.dtype
        self.tokenizer = load_tokenizer(path)
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        cfg = self.model.config
        # Which forward runs the model: the lean one (workers/lean_forward.py) where it supports
        # the architecture, else transformers' modules ("auto"); or one of them, by name.
        if forward not in FORWARDS:
            raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
        why = unsupported(self.model) if tp_plan is None else "tensor-parallel weights"
        if forward == "lean" and why is not None:
            raise ValueError(f"forward: lean cannot run {self.path!r}: {why}")
        if compile not in COMPILES:
            raise ValueError(f"compile must be one of {COMPILES}, got {compile!r}")
        lean = forward != "hf" and why is None
        if compile == "on" and not lean:
            raise ValueError(f"compile: on needs the lean forward; {self.path!r} runs hf")
        # auto: where it pays at once. On a GPU a small model's step is kernel launches, which
        # CUDA graphs remove; on this CPU it took SmolLM2's one-token step from 23 to 18 ms, but
        # each new shape class compiles for ~30 s while requests wait: on a CPU it is opt-in.
        compiled = compile == "on" or (compile == "auto" and lean and self.device.type == "cuda")
        self.lean: LeanForward | None = LeanForward(self.model, compile=compiled) if lean else None
        self.forward = "hf" if self.lean is None else self.lean.name
        self.kv = BatchedKV(
            int(cfg.num_hidden_layers),
            device=self.device,
            additive_mask=self.lean is None and cfg._attn_implementation != "sdpa",
            max_positions=self.max_context,
            max_kv_tokens=max_kv_tokens,
        )
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # A prefill needs no logits: the head over every prompt position (49 152 words for
        # SmolLM2) is wasted work, so only one position is kept (time to first token 327.5 ->
        # 277.6 ms for 118-token prompts: `specdec bench`'s ttft rows).
        self._keep_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.packed_steps = 0  # forwards that ran on the real tokens of ragged rows only
        self._warming = True
        self.compile_seconds = self._warm_up() if compiled else 0.0
        self._warming = False

    def _warm_up(self) -> float:
        """Compile the step shapes one stream meets (a one-token step, a block after a
        prefix, both again over holes after a rollback) before any request waits on them;
        returns the seconds it took, also logged. Rows > 1 compile on first use."""
        t0 = time.perf_counter()
        sid = "__compile_warm_up__"
        self.extend_batch([(sid, [1] * 6)], logits=False)
        self.extend(sid, [1])  # one token, no mask
        self.extend(sid, [1] * 3)  # a verify-sized block, causal after the prefix
        self.rollback(sid, self.length(sid) - 2)  # holes: masks from here on
        self.extend(sid, [1])
        self.extend(sid, [1] * 3)
        self.release(sid)
        seconds = time.perf_counter() - t0
        log.info("compiled %s's step forward in %.1f s", self.path, seconds)
        return seconds

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, list) else {int(eos)}

    def length(self, seq_id: str) -> int:
        return self.kv.length(seq_id)

    def held(self, seq_id: str) -> int:
        """Tokens the sequence holds in the cache (0 when unknown)."""
        return self.kv.held(seq_id)

    @property
    def kv_tokens(self) -> int:
        return self.kv.kv_tokens

    @property
    def max_kv_tokens(self) -> int | None:
        return self.kv.max_kv_tokens

    def check_extend(self, seq_id: str, n: int) -> None:
        """ValueError if n more tokens would pass the model context (nothing is changed)."""
        if self.kv.held(seq_id) + n > self.max_context:
            raise ValueError(
                f"sequence {seq_id!r} would exceed the model context of {self.max_context} tokens"
            )

    def extend(self, seq_id: str, token_ids: Sequence[int]) -> torch.Tensor:
        """Append tokens to the sequence's cache (created if new); returns their logits [n, V]."""
        return self.extend_batch([(seq_id, token_ids)])[0]

    def extend_batch_features(
        self, items: Sequence[tuple[str, Sequence[int]]], last: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """As extend_batch, and also each item's features: the last decoder layer's output
        (before the final norm) at every new token, [n_i, hidden] in the model's dtype (what a
        feature draft reads). Runs eager: a compiled step does not hand them out."""
        sink: list[torch.Tensor] = []
        logits = self.extend_batch(items, last=last, _sink=sink)
        if not sink:
            return logits, [torch.empty(0, self.hidden_size) for _ in items]
        hidden, rows = sink
        # Views of this call's own hidden states: the caller packs them at once, no copy here.
        return logits, [
            hidden[rows[sid], : len(toks)] if toks else hidden[:0, 0] for sid, toks in items
        ]

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def extend_batch(
        self,
        items: Sequence[tuple[str, Sequence[int]]],
        logits: bool = True,
        last: bool = False,
        _sink: list | None = None,
    ) -> list[torch.Tensor]:
        """Append tokens_i to each sequence (created if new) in one forward; returns logits [n_i, V]
        per item (with `logits=False`, a prefill that needs none: empty tensors; with `last=True`,
        only the last token's, [1, V]: a prefill that decodes the first token). Checked first,
        for all items (a refusal changes nothing): distinct ids, the context, and the KV budget
        for new sequences (KVBudgetExceeded)."""
        seen: set[str] = set()
        fresh = 0
        for sid, toks in items:
            if sid in seen:
                raise ValueError(f"sequence {sid!r} appears twice in one batch")
            seen.add(sid)
            self.check_extend(sid, len(toks))
            if sid not in self.kv:
                fresh += len(toks)
        self.kv.check_admit(fresh)
        for sid, _ in items:
            if sid not in self.kv:
                self.kv.create(sid)
        work = [(sid, list(toks)) for sid, toks in items if toks]
        out: dict[str, torch.Tensor] = {}
        if work:
            step = self.kv.begin([(sid, len(toks)) for sid, toks in work])
            width = step.end - step.start
            place = step.place()
            rows = {sid: place[self.kv.row(sid)] for sid, _ in work}
            ids = torch.zeros(len(step.rows), width, dtype=torch.long)
            for sid, toks in work:
                ids[rows[sid], : len(toks)] = torch.tensor(toks)
            # Where the head runs: nowhere useful (a prefill that needs no logits: one column),
            # at each row's last column (`last`: the columns the rows need, shared), or everywhere.
            keep: int | torch.Tensor | None = 0 if not logits else None
            ends: list[int] = []
            packed, offset = self._packing(step, width)
            if packed is not None:  # ragged rows: the head where wanted, in packed order
                if logits and last:
                    keep = torch.tensor([offset[rows[sid]] + len(t) - 1 for sid, t in work])
            elif logits and last and (self._keep_kw or self.lean is not None):
                ends = sorted({len(toks) - 1 for _, toks in work})
                keep = torch.tensor(ends)
            try:
                lg = self._forward(ids.to(self.device), step, keep, _sink, packed)
            except BaseException:
                self.kv.abort()
                raise
            if _sink:  # [hidden] -> [hidden on the CPU, each item's row]
                _sink[:] = [_sink[0].cpu(), rows]
            self.kv.finish(step)
            if logits:
                lg = lg.float()
                if lg.device.type != "cpu":
                    lg = lg.cpu()
                if packed is not None and last:
                    out = {sid: lg[i][None] for i, (sid, _) in enumerate(work)}
                elif packed is not None:
                    first = {sid: offset[rows[sid]] for sid, _ in work}
                    out = {sid: lg[first[sid] : first[sid] + len(t)] for sid, t in work}
                elif ends:
                    col = {end: i for i, end in enumerate(ends)}
                    out = {sid: lg[rows[sid], col[len(t) - 1]][None] for sid, t in work}
                elif last:
                    out = {sid: lg[rows[sid], len(t) - 1][None] for sid, t in work}
                else:
                    out = {sid: lg[rows[sid], : len(toks)] for sid, toks in work}
        empty = torch.empty(0, self.vocab_size)
        return [out.get(sid, empty) for sid, _ in items]

    def _packing(self, step: Step, width: int) -> tuple[torch.Tensor | None, list[int]]:
        """For a step whose rows bring unequal numbers of tokens, on the eager lean forward: the
        flat indices of the real tokens in [rows * width] and each view row's first packed index
        (the forward then runs its projections and MLP on those tokens only: a batch that
        verifies a 16-token lookup block beside 1-token rows, or admits prompts of unequal
        lengths, no longer pays for every row as wide as the widest). None otherwise: a
        compiled forward keeps its recurring padded shapes, and float32 keeps transformers'
        padded matmuls (equal bit for bit: a matmul over fewer rows may sum in another order)."""
        counts = step.counts
        eager_lean = self.lean is not None and self.lean.compiled is None
        if not eager_lean or self.dtype == torch.float32 or sum(counts) == len(counts) * width:
            return None, []
        self.packed_steps += 1
        offset, total = [], 0
        for c in counts:
            offset.append(total)
            total += c
        real = torch.arange(width)[None, :] < torch.tensor(counts)[:, None]
        return real.flatten().nonzero().flatten().to(self.device), offset

    def _forward(
        self,
        ids: torch.Tensor,
        step: Step,
        keep: int | torch.Tensor | None,
        sink: list | None = None,
        packed: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Logits of the step's new tokens (`keep` as LeanForward's: None all, 0 none, a
        tensor of columns, or of packed indices with `packed`); the cache's layers take the new
        keys and values. With a `sink`, the last layer's output at every column is appended."""
        if sink is not None:
            return self._forward_capturing(ids, step, keep, sink, packed)
        if packed is not None:
            return self.lean(ids, step.position_ids, step.mask, self.kv.cache.layers, keep, packed)
        if self.lean is not None:
            bufs = self.kv.window(step) if self.lean.compiled is not None else None
            if bufs is not None and keep is None:  # decode and verify steps: shapes that recur
                lo, hi = step.sel.start, step.sel.stop
                win = KVWindow(*bufs, lo, hi, step.start, step.end)
                # After the warm-up, a shape class it did not meet runs eager instead of
                # compiling for ~30 s under a request (that outlived the target's timeout).
                stance = "default" if self._warming else "eager_on_recompile"
                with torch.compiler.set_stance(stance):
                    return self.lean.compiled(ids, step.position_ids, step.mask, win, None)
            layers = self.kv.cache.layers
            return self.lean(ids, step.position_ids, step.mask, layers, keep)
        if keep is None:
            kw: dict = {}
        elif isinstance(keep, int):  # no logits wanted: transformers' head runs on one column
            kw = self._keep_kw
        else:
            kw = {"logits_to_keep": keep}
        res = self.model(
            input_ids=ids,
            attention_mask=step.mask,
            position_ids=step.position_ids,
            use_cache=True,
            **{self._cache_kw: self.kv.cache},
            **kw,
        )
        return res.logits

    def _forward_capturing(
        self,
        ids: torch.Tensor,
        step: Step,
        keep: int | torch.Tensor | None,
        sink: list,
        packed: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        if self.lean is not None:
            self.lean.capture = sink
            try:
                layers = self.kv.cache.layers
                return self.lean(ids, step.position_ids, step.mask, layers, keep, packed)
            finally:
                self.lean.capture = None

        def hook(_mod, _inp, out) -> None:
            sink.append(out[0] if isinstance(out, tuple) else out)

        handle = self.model.model.layers[-1].register_forward_hook(hook)
        try:
            return self._forward(ids, step, keep)
        finally:
            handle.remove()

    def fork(self, source: str, seq_id: str, length: int) -> None:
        """seq_id starts with a copy of source's first `length` cached positions."""
        self.kv.fork(source, seq_id, length)

    def rollback(self, seq_id: str, length: int) -> None:
        self.kv.rollback(seq_id, length)

    def release(self, seq_id: str) -> bool:
        return self.kv.release(seq_id)

    @property
    def live_sequences(self) -> int:
        return self.kv.live_sequences
