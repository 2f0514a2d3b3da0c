"""A Llama draft with a reduced-vocabulary head and embeddings borrowed from its target.

Why: on SmolLM2-135M (vocab 49152, width 576) the vocabulary projection dominates a small
draft's step (2 layers + full head ~9 ms, 2 layers + an 8192-row head ~4 ms on 2 cores). Like
FR-Spec, the head scores only the target's most frequent tokens; `forward` scatters them into
full-vocabulary logits with -inf elsewhere, so every consumer (the draft worker's argmax and
top-m sampling, HF assisted generation) works unchanged. The draft's q is then sparse over the
subset, which lossless verification handles (a token outside the subset is never proposed).

The input embedding matrix (28 M of the draft's parameters) is the target's own: it is not
saved with the draft, but read from the target's checkpoint at load time (`embeddings_from`: a
pair name or a checkpoint directory), so it is shipped once, by the target.

Importing this module registers the model type with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(path)` loads such a draft like any checkpoint. Without this
package, a saved draft carries this very file as its modeling code and an `auto_map` in its
config (the Hub's convention, `write_remote_code`): `AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True, embeddings_from=TARGET_DIR)` loads it offline, for HF assisted
generation. This module must therefore import nothing of ours at module level.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

MODEL_TYPE = "specdec_subset_llama"
EMBED_KEY = "model.embed_tokens.weight"
MODELING_FILE = "modeling_specdec_subset_llama.py"  # this file, as a checkpoint carries it
AUTO_MAP = {
    "AutoConfig": f"{MODELING_FILE[:-3]}.SubsetDraftConfig",
    "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.SubsetDraftForCausalLM",
}


class SubsetDraftConfig(LlamaConfig):
    model_type = MODEL_TYPE

    def __init__(
        self, head_size: int = 8192, embeddings_from: str | None = None, **kwargs: Any
    ) -> None:
        self.head_size = head_size
        self.embeddings_from = embeddings_from
        kwargs["tie_word_embeddings"] = False  # the head is its own (reduced) matrix
        super().__init__(**kwargs)


class SubsetDraftForCausalLM(LlamaForCausalLM):
    config_class = SubsetDraftConfig
    _tied_weights_keys: dict[str, str] = {}
    # The borrowed embeddings are absent from the draft's own files by design.
    _keys_to_ignore_on_load_missing = [r"model\.embed_tokens\.weight"]
    _keys_to_ignore_on_save = [EMBED_KEY]

    def __init__(self, config: SubsetDraftConfig) -> None:
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.head_size, bias=False)
        # Full-vocabulary id of each head row (a buffer: saved with the draft).
        self.register_buffer("head_ids", torch.arange(config.head_size, dtype=torch.long))
        self.post_init()

    def subset_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        sub = self.subset_logits(hidden)
        full = sub.new_full((*sub.shape[:-1], self.config.vocab_size), float("-inf"))
        full.index_copy_(-1, self.head_ids, sub)
        return CausalLMOutputWithPast(logits=full, past_key_values=out.past_key_values)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        source = model.config.embeddings_from
        if source:
            embed = read_tensor(resolve_embeddings_source(source), EMBED_KEY)
            with torch.no_grad():
                model.model.embed_tokens.weight.copy_(embed.to(model.model.embed_tokens.weight))
        return model


def resolve_embeddings_source(source: str) -> Path:
    """A pair name (its target, converted if needed) or a checkpoint directory."""
    try:
        from workers.checkpoints.registry import resolve_checkpoint
    except ImportError:  # loaded as a checkpoint's remote code, without this package
        path = Path(source).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(
                f"embeddings_from: {source!r} is not a checkpoint directory; pass the target's "
                "path, e.g. from_pretrained(draft, trust_remote_code=True, "
                "embeddings_from='/path/to/target')"
            ) from None
        return path
    return resolve_checkpoint(source, "target")


def write_remote_code(checkpoint: Path) -> None:
    """Ship this module with a saved draft and point its config's `auto_map` at it, so plain
    transformers loads the draft with trust_remote_code=True (no import of this package)."""
    checkpoint = Path(checkpoint)
    (checkpoint / MODELING_FILE).write_text(Path(__file__).read_text())
    cfg_path = checkpoint / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = AUTO_MAP
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def read_tensor(checkpoint: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors checkpoint (sharded or not), without loading the rest."""
    from safetensors import safe_open

    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        name = json.loads(index.read_text())["weight_map"][key]
    else:
        name = "model.safetensors"
    with safe_open(str(checkpoint / name), framework="pt") as fh:
        return fh.get_tensor(key)


AutoConfig.register(MODEL_TYPE, SubsetDraftConfig, exist_ok=True)
AutoModelForCausalLM.register(SubsetDraftConfig, SubsetDraftForCausalLM, exist_ok=True)
