"""What a router knows of the target model, read once from its checkpoint: the tokenizer, the
vocabulary size, the context length and the EOS ids, and the request validation against them.

Both routers hold one: `Router` (a target replica's schedulers) and `ForwardingRouter` (the
stateless ingress), so they tokenize, validate and stop alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, GenerationConfig

from cluster.api.validation import Limits, ValidRequest, validate_request
from protos import specdec_pb2
from workers.model_runner import load_tokenizer


@dataclass(frozen=True, slots=True)
class TargetModel:
    path: str
    tokenizer: Any
    vocab_size: int
    max_context: int
    eos_token_ids: frozenset[int]

    @classmethod
    def load(cls, path: str) -> TargetModel:
        """From the checkpoint directory `path` (local files only; no weights are read)."""
        tokenizer = load_tokenizer(path)
        model_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        return cls(
            path=path,
            tokenizer=tokenizer,
            vocab_size=int(model_cfg.vocab_size),
            max_context=int(getattr(model_cfg, "max_position_embeddings", 2048)),
            eos_token_ids=frozenset(_eos_ids(path, model_cfg, tokenizer)),
        )

    def validate(self, request: specdec_pb2.GenerateRequest, limits: Limits) -> ValidRequest:
        """Check a request and tokenize it; RequestError(INVALID_ARGUMENT, field, ...) if bad."""
        return validate_request(
            request,
            tokenizer=self.tokenizer,
            vocab_size=self.vocab_size,
            max_context=self.max_context,
            limits=limits,
        )


def _eos_ids(path: str, model_cfg: Any, tokenizer: Any) -> set[int]:
    """The EOS ids the target worker stops on (as `ModelRunner.eos_token_ids` reads them)."""
    try:
        eos = GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
    except (OSError, ValueError):
        eos = getattr(model_cfg, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, list | tuple) else {int(eos)}
