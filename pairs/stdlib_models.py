"""The stdlib pair's Llama models: their shapes, a fresh target, the draft's initialisation from
the target, and the fp16 checkpoints the recipe writes."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


@dataclass(slots=True, frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int

    def __post_init__(self) -> None:
        # transformers' TP plan shards heads, kv heads and the MLP over 2 ranks.
        for name in ("heads", "kv_heads", "intermediate"):
            if getattr(self, name) % 2:
                raise ValueError(f"{name} must be even for 2-way tensor parallelism")
        if self.hidden % self.heads:
            raise ValueError("hidden must be divisible by heads")


# Real pair: a deep target and a 2-layer draft of the same width. On CPU the decode step is
# dominated by per-layer cost, so 12 vs 2 layers gives the draft a ~1/5 step; the shared
# width lets the draft start from the target's embeddings and layers.
TARGET_SHAPE = Shape(hidden=384, layers=12, heads=6, kv_heads=2, intermediate=1024)
DRAFT_SHAPE = Shape(hidden=384, layers=2, heads=6, kv_heads=2, intermediate=1024)
SMOKE_TARGET_SHAPE = Shape(hidden=64, layers=2, heads=2, kv_heads=2, intermediate=128)
SMOKE_DRAFT_SHAPE = Shape(hidden=64, layers=1, heads=2, kv_heads=2, intermediate=128)


def make_config(
    shape: Shape, tok: PreTrainedTokenizerFast, max_positions: int = 512
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def new_model(shape: Shape, tok: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(make_config(shape, tok))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def draft_from_target(
    target: LlamaForCausalLM, shape: Shape, tok: PreTrainedTokenizerFast, seed: int
) -> LlamaForCausalLM:
    """A draft that starts from the target's embeddings, final norm and first/last layers.

    Same width is required. Starting from the target's own vocabulary geometry and layers
    (a layer-skipping copy of it) gives distillation a far better start than random init.
    """
    draft = new_model(shape, tok, seed)
    t = target.model
    if shape.hidden != target.config.hidden_size:
        return draft
    d = draft.model
    d.embed_tokens.load_state_dict(t.embed_tokens.state_dict())
    d.norm.load_state_dict(t.norm.state_dict())
    n_t = len(t.layers)
    picks = (
        [0]
        if shape.layers == 1
        else [round(i * (n_t - 1) / (shape.layers - 1)) for i in range(shape.layers)]
    )
    same_layer = (
        shape.intermediate == target.config.intermediate_size
        and shape.heads == target.config.num_attention_heads
        and shape.kv_heads == target.config.num_key_value_heads
    )
    if same_layer:
        for i, j in enumerate(picks):
            d.layers[i].load_state_dict(copy.deepcopy(t.layers[j].state_dict()))
    draft.tie_weights()
    return draft


def save_half(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, out: Path) -> None:
    """Save as float16 on disk (half the bytes); loading with dtype=float32 upcasts. Shards stay
    under 24 MB so that no shipped file is a large blob in git."""
    out.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to(torch.float16)
    half.save_pretrained(out, max_shard_size="24MB")
    tok.save_pretrained(out)


def fp16_rounded(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """An fp32 copy with fp16-rounded weights: exactly what loading the saved checkpoint gives."""
    m = copy.deepcopy(model).to(torch.float16).to(torch.float32)
    m.eval()
    return m
