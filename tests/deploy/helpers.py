"""Shared helpers for the Ray / Serve tests: one small local Ray per module, free ports, models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cluster.serve.ports import pick_free_port
from tests.tiny_models import make_model, make_tokenizer

# Logical resources of the test Ray: enough for 2 draft replicas, 2 target ranks, the ingress.
RAY_CPUS = 6
POOLS = {"draft_pool": 2.0, "target_pool": 2.0}


def free_port() -> int:
    return pick_free_port()


def init_ray(
    num_cpus: int = RAY_CPUS, resources: dict | None = None, metrics_port: int | None = None
) -> None:
    """A fresh local Ray (never an engineer's running cluster), small and dashboard-less;
    `metrics_port`: Ray's Prometheus endpoint there, reporting every half second."""
    import ray

    metrics: dict = {}
    if metrics_port is not None:
        metrics = {
            "_metrics_export_port": metrics_port,
            "_system_config": {"metrics_report_interval_ms": 500},
        }
    ray.init(
        address="local",
        num_cpus=num_cpus,
        resources=dict(POOLS if resources is None else resources),
        include_dashboard=False,
        object_store_memory=100 * 1024 * 1024,
        log_to_driver=False,
        **metrics,
    )


def tiny_pair(root: Path) -> tuple[Path, Path]:
    """A tiny random target (heads/kv-heads/MLP divisible by 2) and a tiny draft, one tokenizer."""
    tok = make_tokenizer()
    target = make_model(root / "target", seed=1, layers=2, hidden=32, tokenizer=tok)
    draft = make_model(root / "draft", seed=2, layers=1, hidden=32, tokenizer=tok)
    return target, draft


def tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("TMPDIR", "/tmp")))


def noisy_copy(src: Path, dst: Path, *, std: float, seed: int = 0) -> Path:
    """A draft that agrees with the target only partly: the target with noise on its weights
    (`std` relative to each tensor's own spread)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std * (p.std() if p.numel() > 1 else 1.0))
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(dst)
    return dst


def hf_greedy(path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The oracle: transformers' own greedy decoding of the target."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, len(prompt_ids) :].tolist()


def wait_registered(app_name: str, timeout: float = 90.0) -> None:
    """Until every configured worker replica of a Serve app has registered (its ingress says)."""
    import time

    from ray import serve

    handle = serve.get_app_handle(app_name)
    deadline = time.monotonic() + timeout
    while not handle.status.remote().result()["ready"]:
        assert time.monotonic() < deadline, "workers never registered"
        time.sleep(0.5)
