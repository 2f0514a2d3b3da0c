"""Helpers for the gRPC tests: tiny checkpoints, worker and ingress processes on loopback, oracles.

Worker servers run as real subprocesses (`python -m workers.server ... --port 0`); each prints its
bound port when ready.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import grpc
import torch

from cluster.routing.worker_processes import (  # noqa: F401 - re-exported for the test modules
    ServerProcess,
    server_env,
    start_all,
    stop_all,
    worker_process,
)
from protos import worker_pb2, worker_pb2_grpc
from tests.tiny_models import make_model

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0


def make_checkpoints(base: Path) -> dict[str, Path]:
    """target (seed 0); near: the target plus noise (partial acceptance); bad: unrelated weights
    (acceptance ~0)."""
    target = make_model(base / "target", seed=0)
    bad = make_model(base / "bad", seed=1)
    near = base / "near"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(target, local_files_only=True)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.005 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(near)
    AutoTokenizer.from_pretrained(target, local_files_only=True).save_pretrained(near)
    return {"target": target, "near": near, "bad": bad}


# Server processes come from the package's own launcher (also used by the benchmark).
Proc = ServerProcess


def worker(role: str, model: Path) -> ServerProcess:
    """Start (not wait for) a worker server on a free port, one torch thread."""
    return worker_process(role, model, threads=1)


def stats(address: str, role: str) -> worker_pb2.StatsResponse:
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as ch:
        stub = (
            worker_pb2_grpc.DraftWorkerStub(ch)
            if role == "draft"
            else worker_pb2_grpc.TargetWorkerStub(ch)
        )
        return stub.Stats(worker_pb2.StatsRequest(), timeout=10)


def wait_live_zero(workers: list[tuple[str, str]], timeout: float = 30.0) -> dict[str, int]:
    """Poll Stats until every (address, role) holds no sequence; returns the last counts."""
    deadline = time.monotonic() + timeout
    while True:
        live = {addr: stats(addr, role).live_sequences for addr, role in workers}
        if not any(live.values()) or time.monotonic() > deadline:
            return live
        time.sleep(0.1)


@functools.lru_cache(maxsize=4)
def _hf_model(model_path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True).eval()


def hf_greedy(model_path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding on the target: the oracle."""
    model = _hf_model(Path(model_path))
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt_ids) :].tolist()
