"""The stdlib recipe's wall-clock-budgeted training loops: the target's LM loss and the draft's
distillation, and the held-out loss both report."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from pairs.token_stream import StreamSampler


def lr_at(frac: float, step: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup, then cosine to floor*peak over the *time* budget (runs stop by clock)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(max(frac, 0.0), 1.0)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def eval_loss(model: LlamaForCausalLM, windows: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token cross-entropy over the windows; the model's train/eval mode is kept (an
    evaluation borrows a serving engine's model, a training loop its model in training)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = model(w[:, :-1]).logits.float()
        total += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="sum"
        ).item()
        n += w[:, 1:].numel()
    model.train(was_training)
    return total / max(n, 1)


def _autocast(enabled: bool):
    # bf16 autocast is ~3x faster than fp32 on this CPU (avx512_bf16); master weights stay fp32.
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def train_lm(
    model: LlamaForCausalLM,
    sampler: StreamSampler,
    *,
    minutes: float,
    lr: float,
    warmup: int,
    val: torch.Tensor,
    log: Callable[[dict], None],
    checkpoint: Callable[[], None],
    ckpt_minutes: float,
    bf16: bool = True,
    max_steps: int | None = None,
) -> dict:
    """Next-token training until the wall-clock budget (or max_steps) is spent."""
    opt = make_optimizer(model, lr)
    model.train()
    t0 = last_ckpt = time.monotonic()
    budget = minutes * 60
    step, tokens, ema = 0, 0, None
    while True:
        elapsed = time.monotonic() - t0
        if elapsed >= budget or (max_steps is not None and step >= max_steps):
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(elapsed / budget, step, lr, warmup)
        batch = sampler.next()
        with _autocast(bf16):
            logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += batch[:, 1:].numel()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            log(
                {
                    "phase": "lm",
                    "step": step,
                    "loss_ema": round(ema, 4),
                    "lr": opt.param_groups[0]["lr"],
                    "min": round(elapsed / 60, 2),
                    "tok_per_s": round(tokens / max(elapsed, 1e-6)),
                }
            )
        if time.monotonic() - last_ckpt >= ckpt_minutes * 60:
            log({"phase": "lm", "step": step, "val_loss": round(eval_loss(model, val), 4)})
            checkpoint()
            last_ckpt = time.monotonic()
    model.eval()
    return {
        "steps": step,
        "tokens": tokens,
        "minutes": round((time.monotonic() - t0) / 60, 2),
        "train_loss_ema": ema,
        "val_loss": eval_loss(model, val),
    }


def distill(
    draft: LlamaForCausalLM,
    teacher: LlamaForCausalLM,
    traj: torch.Tensor,
    prompt_len: int,
    corpus: StreamSampler,
    *,
    minutes: float,
    lr: float,
    warmup: int,
    traj_batch: int,
    kl_weight: float,
    seed: int,
    log: Callable[[dict], None],
    checkpoint: Callable[[], None],
    ckpt_minutes: float,
    bf16: bool = True,
    max_steps: int | None = None,
) -> dict:
    """Train the draft to agree with the target.

    Two losses per step: cross-entropy on the target's own greedy continuations (labels are
    exactly the target's argmax along trajectories it produces: what acceptance measures), and
    KL(target || draft) on corpus windows, so the draft also matches the target off-trajectory.
    """
    opt = make_optimizer(draft, lr)
    gen = torch.Generator().manual_seed(seed)
    teacher.eval()
    draft.train()
    t0 = last_ckpt = time.monotonic()
    budget = minutes * 60
    step, ema_ce, ema_kl = 0, None, None
    while True:
        elapsed = time.monotonic() - t0
        if elapsed >= budget or (max_steps is not None and step >= max_steps):
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(elapsed / budget, step, lr, warmup)
        rows = torch.randint(0, len(traj), (traj_batch,), generator=gen)
        seq = traj[rows].long()
        with _autocast(bf16):
            logits = draft(seq[:, :-1]).logits[:, prompt_len - 1 :]
        ce = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), seq[:, prompt_len:].reshape(-1)
        )
        loss = ce
        if kl_weight > 0:
            win = corpus.next()[:, :-1]
            with torch.no_grad(), _autocast(bf16):
                t_logp = F.log_softmax(teacher(win).logits.float(), dim=-1)
            with _autocast(bf16):
                d_logits = draft(win).logits
            d_logp = F.log_softmax(d_logits.float(), dim=-1)
            kl = (t_logp.exp() * (t_logp - d_logp)).sum(-1).mean()
            loss = loss + kl_weight * kl
            ema_kl = kl.item() if ema_kl is None else 0.98 * ema_kl + 0.02 * kl.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ema_ce = ce.item() if ema_ce is None else 0.98 * ema_ce + 0.02 * ce.item()
        if step % 25 == 0:
            log(
                {
                    "phase": "distill",
                    "step": step,
                    "traj_ce_ema": round(ema_ce, 4),
                    "kl_ema": None if ema_kl is None else round(ema_kl, 4),
                    "lr": opt.param_groups[0]["lr"],
                    "min": round(elapsed / 60, 2),
                }
            )
        if time.monotonic() - last_ckpt >= ckpt_minutes * 60:
            checkpoint()
            last_ckpt = time.monotonic()
    draft.eval()
    return {
        "steps": step,
        "minutes": round((time.monotonic() - t0) / 60, 2),
        "traj_ce_ema": ema_ce,
        "kl_ema": ema_kl,
    }
