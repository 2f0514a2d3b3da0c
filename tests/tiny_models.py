"""Tiny random-weight Llama checkpoints for fast tests, saved to local directories.

A shared byte-level tokenizer is built from a fixed alphabet so the checkpoints are ordinary HF
directories that `AutoTokenizer` and `AutoModelForCausalLM` load, made offline in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 96


def make_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    chars = [chr(c) for c in range(32, 32 + vocab - 2)]
    table = {"<eos>": 0, "<bos>": 1} | {c: i + 2 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(table, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


def make_model(
    path: Path,
    *,
    seed: int,
    layers: int = 2,
    hidden: int = 32,
    max_positions: int = 256,
    tokenizer: PreTrainedTokenizerFast | None = None,
    eos_token_id: int | None = 0,
) -> Path:
    """Save a random Llama (and tokenizer) to `path`; returns it."""
    torch.manual_seed(seed)
    tok = tokenizer or make_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=eos_token_id,
        bos_token_id=1,
    )
    model = LlamaForCausalLM(cfg)
    # Larger logits than the default init so that greedy paths are not near-ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
