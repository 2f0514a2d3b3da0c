"""A draft that reads the target's features (EAGLE-style): one decoder layer over
[token embedding ; the target's last-layer hidden state], and a reduced-vocabulary head.

Why: a separate small draft sees only tokens. The target's own last hidden state already holds
most of what the next token depends on, so one layer over it predicts the target's next
feature, and through the target's own final norm and output rows, its next token, far better
than a stand-alone model of the same cost (EAGLE, arXiv 2401.15077).

Shapes: at position t the head reads the token x[t+1] and the target's feature f[t] (the last
decoder layer's output at t, before the final norm: what predicts x[t+1]) and writes f'[t+1],
its guess of the target's feature at t+1; `logits(f')` scores x[t+2]. Drafting more than one
token feeds the head's own f' back in place of the target's (no target pass has seen them yet).

Only the fusion layer (`fc`), the decoder layer and the head's vocabulary (`head_ids`) are
trained and saved; the embeddings, the final norm and the output rows are the target's, read
from its checkpoint at load time (frozen), so the head ships in a few MB.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from workers.checkpoints.subset_draft import read_tensor

MODEL_TYPE = "specdec_feature_head"
WEIGHTS = "model.safetensors"


class FeatureHead(nn.Module):
    """fc([embed(x[t+1]) ; f[t]]) -> one Llama decoder layer -> f'[t+1]; `logits` scores the
    head's vocabulary with the target's final norm and output rows."""

    def __init__(self, config: LlamaConfig, head_ids: torch.Tensor) -> None:
        super().__init__()
        cfg = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 1})
        cfg._attn_implementation = "sdpa"
        self.config = cfg
        d = cfg.hidden_size
        self.fc = nn.Linear(2 * d, d, bias=True)
        self.layer = LlamaDecoderLayer(cfg, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(cfg)
        self.register_buffer("head_ids", head_ids.long().clone())
        # The target's, borrowed (not saved): set by `borrow`.
        self.register_buffer("embed", torch.zeros(cfg.vocab_size, d), persistent=False)
        self.register_buffer("norm", torch.ones(d), persistent=False)
        self.register_buffer("out_rows", torch.zeros(len(head_ids), d), persistent=False)
        self.eps = float(cfg.rms_norm_eps)

    def borrow(self, embed: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor) -> None:
        """Take the target's embeddings, final norm weight and output matrix (full vocab)."""
        self.embed = embed.detach().to(self.fc.weight.dtype).clone()
        self.norm = norm.detach().to(self.fc.weight.dtype).clone()
        self.out_rows = lm_head.detach()[self.head_ids].to(self.fc.weight.dtype).clone()

    def forward(
        self,
        ids: torch.Tensor,
        feats: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        past=None,
    ) -> torch.Tensor:
        """f' [rows, width, d] for tokens `ids` [rows, width] read with features `feats`
        [rows, width, d] at `positions`; `mask` (bool, True attends) or None for causal;
        `past` a transformers cache holding earlier positions' keys and values."""
        x = self.fc(torch.cat([F.embedding(ids, self.embed), feats.to(self.embed.dtype)], -1))
        width = ids.shape[1]
        done = past.get_seq_length() if past is not None else 0
        if mask is None and width > 1 and done:
            # SDPA's is_causal aligns the triangle top-left; after cached positions it must
            # end bottom-right: each new position sees every cached one and its own past.
            mask = torch.ones(width, done + width, dtype=torch.bool, device=ids.device)
            mask = mask.tril(done)[None, None]
        pos_emb = self.rotary(x, positions)
        out = self.layer(
            x,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past,
            use_cache=past is not None,
            position_embeddings=pos_emb,
        )
        return out[0] if isinstance(out, tuple) else out

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Scores over the head's vocabulary [.., head_size] (full ids: `head_ids`)."""
        x = feats.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return F.linear(x.to(self.out_rows.dtype) * self.norm, self.out_rows)

    def save(self, out: Path, target: str) -> None:
        """Weights (bfloat16 safetensors, the trained part only) and a config naming the target
        whose embeddings, norm and output rows complete it."""
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.detach().to(torch.bfloat16).contiguous() if v.is_floating_point() else v
            for k, v in self.state_dict().items()
        }
        save_file(state, str(out / WEIGHTS))
        meta = {"model_type": MODEL_TYPE, "target": target, "head_size": len(self.head_ids)}
        meta["target_config"] = self.config.to_dict()
        (out / "config.json").write_text(json.dumps(meta, indent=1, default=str))


def target_parts(target: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embeddings, final norm weight, output matrix) read from a target checkpoint."""
    embed = read_tensor(target, "model.embed_tokens.weight")
    norm = read_tensor(target, "model.norm.weight")
    try:
        head = read_tensor(target, "lm_head.weight")
    except Exception:  # tied embeddings (SmolLM2): no matrix of its own
        head = embed
    return embed, norm, head


def load_feature_head(path: Path, target: Path, dtype: torch.dtype = torch.float32) -> FeatureHead:
    """A saved head, completed with its target's embeddings, norm and output rows."""
    from safetensors.torch import load_file

    meta = json.loads((path / "config.json").read_text())
    if meta.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{path} is not a feature head (model_type {meta.get('model_type')!r})")
    cfg = LlamaConfig(**meta["target_config"])
    state = load_file(str(path / WEIGHTS))
    head = FeatureHead(cfg, state["head_ids"]).to(dtype)
    head.load_state_dict(state, strict=False)
    head.borrow(*target_parts(target))
    return head.eval()


def is_feature_head(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == MODEL_TYPE


__all__ = ["FeatureHead", "is_feature_head", "load_feature_head", "target_parts"]
