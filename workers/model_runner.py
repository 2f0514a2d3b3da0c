"""Runs one local Hugging Face causal LM over many sequences, each with its own KV cache.

The runner knows nothing about drafting or verification: it extends a sequence's cache by n tokens
and returns their logits, rolls a cache back, and releases it. Models load from local paths only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import workers.pair.subset_draft  # noqa: F401 - registers the reduced-vocabulary draft type
from workers.kv_cache import KVStore


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
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        tp_plan: str | None = None,
    ) -> None:
        kwargs: dict = {"dtype": dtype, "local_files_only": True}
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
        self.tokenizer = load_tokenizer(path)
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.kv = KVStore()

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, list) else {int(eos)}

    def length(self, seq_id: str) -> int:
        return self.kv.get(seq_id).length

    @torch.inference_mode()
    def extend(self, seq_id: str, token_ids: list[int]) -> torch.Tensor:
        """Append tokens to the sequence's cache (created if new); returns their logits [n, V]."""
        held = self.kv.get(seq_id).length if seq_id in self.kv else 0
        if held + len(token_ids) > self.max_context:  # checked first: a refusal changes nothing
            raise ValueError(
                f"sequence {seq_id!r} would exceed the model context of {self.max_context} tokens"
            )
        kv = self.kv.get(seq_id) if seq_id in self.kv else self.kv.create(seq_id)
        if not token_ids:
            return torch.empty(0, self.vocab_size)
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=kv.cache, use_cache=True)
        kv.advanced(len(token_ids))
        return out.logits[0].float().cpu()

    def rollback(self, seq_id: str, length: int) -> None:
        self.kv.get(seq_id).rollback(length)

    def release(self, seq_id: str) -> bool:
        return self.kv.release(seq_id)

    @property
    def live_sequences(self) -> int:
        return len(self.kv)
