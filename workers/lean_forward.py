"""A Llama-family decoder's forward as plain torch calls over the worker's batched KV cache.

Why: a one-token step of SmolLM2-135M through transformers' modules costs ~36 ms on this
2-core CPU in float32 (HF's faster dtype here), while reading its weights once costs ~11 ms in
bfloat16. Two things stand between: the modules' per-call Python (masks, kwargs, output
classes: ~6 ms a step), and bfloat16 matmuls that run no faster than float32 because
`F.linear` does not use the CPU's AMX/avx512_bf16 units for one-row inputs. This forward calls
the same torch operators as transformers' Llama (so float32 logits stay HF's, bit for bit),
and, in bfloat16 on a CPU that has the units, runs every projection through oneDNN with the
weights reordered once at load (`torch.ops.mkldnn`, the kernels torch's own compiler uses for
frozen CPU graphs): 23 ms a token in bfloat16 against HF's 36 (fp32) and 40 (bf16).

What it supports: `LlamaForCausalLM` and models of the same block (no biases, SiLU MLP, RoPE of
any `rope_type` through the model's own rotary module, tied or untied head), one device, no
tensor parallelism. `unsupported(model)` says why another model keeps transformers' forward.

The attention dispatch mirrors transformers' sdpa integration (GQA through `enable_gqa` when
there is no mask, one-token queries packed per KV head when there is, KV heads repeated
otherwise) so that float32 results equal the modules' own. No ray, no grpc.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

# The subset draft (workers/checkpoints/subset_draft.py) is a Llama whose head scores a subset
# of the vocabulary (`head_ids`), scattered into full-vocabulary logits with -inf elsewhere.
_ARCHITECTURES = {"LlamaForCausalLM", "SubsetDraftForCausalLM"}

# The names `models.forward` accepts (cluster/config.py spells the same list without torch).
FORWARDS = ("auto", "lean", "hf")
COMPILES = ("auto", "on", "off")  # `models.compile`


def unsupported(model: torch.nn.Module) -> str | None:
    """Why this forward cannot run `model` (None: it can)."""
    cfg = model.config
    if type(model).__name__ not in _ARCHITECTURES:
        return f"architecture {type(model).__name__} (lean forward: {sorted(_ARCHITECTURES)})"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "biased projections"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act}"
    if getattr(model, "_tp_plan", None) and _is_sharded(model):
        return "tensor-parallel weights"
    if any(p.device.type not in ("cpu", "cuda") for p in model.parameters()):
        return "device"
    return None


def _is_sharded(model: torch.nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def onednn_bf16_available() -> bool:
    """oneDNN can run bfloat16 matmuls natively on this CPU (avx512_bf16 or AMX)."""
    try:
        mkldnn = torch.ops.mkldnn
        return bool(torch.backends.mkldnn.is_available() and mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class _Linear(torch.nn.Module):
    """y = x W^T, by `F.linear`, or by oneDNN over a weight reordered once (CPU bfloat16).

    A plain weight is a buffer, so that a compiled forward (`compile=True`) sees it as a
    constant of the module and torch's CPU compiler can fold and prepack it ("freezing")."""

    def __init__(self, weight: torch.Tensor, pack: bool) -> None:
        super().__init__()
        self.packed = pack
        w = weight.detach().contiguous()
        if pack:
            self.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        else:
            self.register_buffer("weight", w, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.onednn_weight, None, "none", [], "")
        return F.linear(x, self.weight)


class _Block(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module, pack: bool, fuse: bool) -> None:
        super().__init__()
        att, mlp = layer.self_attn, layer.mlp
        q, k, v = att.q_proj.weight, att.k_proj.weight, att.v_proj.weight
        gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
        # Fused projections only where exactness is not the point (oneDNN, compiled): a float32
        # matmul of another width may sum in another order than transformers' three.
        if fuse:
            self.qkv = torch.nn.ModuleList([_Linear(torch.cat([q, k, v]), pack)])
            self.gate_up = torch.nn.ModuleList([_Linear(torch.cat([gate, up]), pack)])
        else:
            self.qkv = torch.nn.ModuleList(_Linear(w, pack) for w in (q, k, v))
            self.gate_up = torch.nn.ModuleList(_Linear(w, pack) for w in (gate, up))
        self.split = [q.shape[0], k.shape[0], v.shape[0]]
        self.inter = gate.shape[0]
        self.o = _Linear(att.o_proj.weight, pack)
        self.down = _Linear(mlp.down_proj.weight, pack)
        self.register_buffer("norm1", layer.input_layernorm.weight.detach(), persistent=False)
        self.register_buffer("norm2", layer.post_attention_layernorm.weight.detach(), False)
        self.eps1 = layer.input_layernorm.variance_epsilon
        self.eps2 = layer.post_attention_layernorm.variance_epsilon


def _padded(y: torch.Tensor, packed: torch.Tensor | None, rows: int, width: int) -> torch.Tensor:
    """[T, C] packed rows back to [rows, width, C], zeros at the pads (their K/V are holes after
    the forward, and a zero key is never a NaN); as it is without `packed`."""
    if packed is None:
        return y
    out = y.new_zeros(rows * width, y.shape[-1])
    return out.index_copy_(0, packed, y).view(rows, width, -1)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: the variance in float32, the scale in the input's dtype.
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVWindow(NamedTuple):
    """The batched cache's buffers as a compiled forward takes them: rows [lo, hi) of every
    layer's K and V buffer, new tokens written at columns [start, end), attention over [0, end).
    (workers/batch_kv.py's `_write` does the same through its layers, for eager forwards.)"""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lo: int
    hi: int
    start: int
    end: int


class LeanForward(torch.nn.Module):
    """The forward of one loaded Llama-family model, over caller-owned KV.

    `forward(ids, positions, mask, kv, keep)`: ids and positions [rows, width]; mask a bool
    [rows, 1, width, end] (True: attend) or None (every row's new tokens follow columns
    [0, start) of its own, all valid). `kv`: the cache's layers (`kv[i].update(k, v)` stores
    layer i's new keys and values and returns those to attend over: workers/batch_kv.py's
    layers do), or a KVWindow. `keep`: None for every position's logits, an int n for the last
    n, a 1-D tensor of columns, or 0 for none (a prefill that needs no head: returns None).

    `compile=True` adds `compiled`: the same forward through `torch.compile` (dynamic shapes;
    on a CPU with the weights frozen, so the compiler prepacks them for oneDNN itself), for
    KVWindow calls. Each new shape class (rows 1 or more, width 1 or more, mask or none)
    compiles once, ~30 s for SmolLM2 on 2 cores: the runner's warm-up pays for the ones one
    stream meets at load, and after it a call of any other class runs eager.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pack: bool | None = None,
        compile: bool = False,
        fuse: bool | None = None,
    ) -> None:
        super().__init__()
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"lean forward: unsupported model ({why})")
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        if pack is None:
            pack = device.type == "cpu" and dtype == torch.bfloat16 and onednn_bf16_available()
        self.packed = pack
        self.name = "lean+compiled" if compile else "lean+onednn" if pack else "lean"
        cfg = model.config
        inner = model.model
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.groups = self.heads // self.kv_heads
        self.scaling = self.head_dim**-0.5
        self.register_buffer("embed", inner.embed_tokens.weight.detach(), persistent=False)
        self.rotary = inner.rotary_emb
        self.blocks = torch.nn.ModuleList(
            _Block(layer, pack, fuse=pack or compile if fuse is None else fuse)
            for layer in inner.layers
        )
        self.register_buffer("norm", inner.norm.weight.detach(), persistent=False)
        self.norm_eps = inner.norm.variance_epsilon
        self.head = _Linear(model.lm_head.weight, pack)
        head_ids = getattr(model, "head_ids", None)
        self.register_buffer("head_ids", head_ids, persistent=False)
        self.vocab_size = int(cfg.vocab_size)
        self._tril: dict[tuple[int, int], torch.Tensor] = {}
        # Set to a list, `forward` appends the last layer's output (before the final norm).
        self.capture: list[torch.Tensor] | None = None
        self.eval()
        self.compiled = None
        if compile:
            # oneDNN's packed weights cannot be traced, so the compiled steps run a sibling over
            # plain weights (the compiler prepacks its own) and this module stays packed for
            # what runs eager: prefills, gathered rows, shape classes the warm-up did not meet.
            traced = LeanForward(model, pack=False, fuse=True) if pack else self
            options = {"freezing": True} if device.type == "cpu" else {}
            mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs
            self.compiled = torch.compile(traced, dynamic=True, mode=mode, options=options or None)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        kv: Sequence | KVWindow,
        keep: int | torch.Tensor | None = None,
        packed: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Logits of the new tokens [rows, width, V] (`keep`: None all, 0 none, an int the last
        columns, a tensor those columns). `packed` (ragged rows): the flat indices, in
        [rows * width], of the real tokens; then every projection, norm and the MLP run on those
        T tokens only, not on the pads (attention alone takes the padded layout, the KV cache's),
        and the logits are [T, V], with `keep` a tensor of packed indices."""
        rows, width = ids.shape
        x = F.embedding(ids, self.embed)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        hd = self.head_dim
        if packed is not None:
            x = x.flatten(0, 1).index_select(0, packed)
        if mask is None and width > 1:
            end = kv.end if isinstance(kv, KVWindow) else None
            if end is not None and end > width:
                mask = self._offset_causal(width, end, ids.device)
        for i, blk in enumerate(self.blocks):
            h = _rms(x, blk.norm1, blk.eps1)
            if len(blk.qkv) == 1:
                q, k, v = _padded(blk.qkv[0](h), packed, rows, width).split(blk.split, dim=-1)
            else:
                q, k, v = (_padded(lin(h), packed, rows, width) for lin in blk.qkv)
            q = q.view(rows, width, self.heads, hd).transpose(1, 2)
            k = k.view(rows, width, self.kv_heads, hd).transpose(1, 2)
            v = v.view(rows, width, self.kv_heads, hd).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if isinstance(kv, KVWindow):
                kb, vb = kv.keys[i], kv.values[i]
                kb[kv.lo : kv.hi, :, kv.start : kv.end] = k
                vb[kv.lo : kv.hi, :, kv.start : kv.end] = v
                keys, values = kb[kv.lo : kv.hi, :, : kv.end], vb[kv.lo : kv.hi, :, : kv.end]
            else:
                keys, values = kv[i].update(k, v)
            a = self._attend(q, keys, values, mask)
            if packed is not None:
                a = a.flatten(0, 1).index_select(0, packed)
            x = x + blk.o(a)
            h = _rms(x, blk.norm2, blk.eps2)
            if len(blk.gate_up) == 1:
                g, u = blk.gate_up[0](h).split([blk.inter, blk.inter], dim=-1)
            else:
                g, u = (lin(h) for lin in blk.gate_up)
            x = x + blk.down(F.silu(g) * u)
        if self.capture is not None:  # the target's features, for a draft that reads them
            self.capture.append(x if packed is None else _padded(x, packed, rows, width))
        if isinstance(keep, int) and keep == 0:
            return None
        if keep is None:
            pass
        elif packed is not None:
            x = x.index_select(0, keep.to(x.device))
        elif isinstance(keep, int):
            x = x[:, -keep:]
        else:
            x = x[:, keep.to(x.device)]
        logits = self.head(_rms(x, self.norm, self.norm_eps))
        if self.head_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.head_ids, logits)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        rows, _, width, hd = q.shape
        end = k.shape[2]
        if mask is None and width > 1 and end > width:
            # New tokens after a shared prefix: causal with an offset (transformers builds the
            # same mask for this case).
            mask = self._offset_causal(width, end, q.device)
        if mask is None:
            out = F.scaled_dot_product_attention(
                q, k, v, scale=self.scaling, is_causal=width > 1, enable_gqa=self.groups > 1
            )
        elif width == 1 and self.groups > 1:
            # One query per row: its heads become queries of their KV head (no copy of K/V).
            qp = q.reshape(rows, self.kv_heads, self.groups, hd)
            out = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=self.scaling)
        else:
            if self.groups > 1:
                k = k.repeat_interleave(self.groups, dim=1)
                v = v.repeat_interleave(self.groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        out = out.reshape(rows, -1, width, hd).transpose(1, 2)
        return out.reshape(rows, width, self.heads * hd)

    def _offset_causal(self, width: int, end: int, device: torch.device) -> torch.Tensor:
        """[1, 1, width, end]: query i sees columns up to end - width + i."""
        if torch.compiler.is_compiling():  # no Python-side cache inside a traced graph
            return torch.ones(width, end, dtype=torch.bool, device=device).tril(end - width)[
                None, None
            ]
        key = (width, end)
        m = self._tril.get(key)
        if m is None:
            m = torch.ones(width, end, dtype=torch.bool, device=device).tril_(end - width)
            m = m[None, None]
            if width <= 64:
                if len(self._tril) > 256:
                    self._tril.clear()
                self._tril[key] = m
        return m
