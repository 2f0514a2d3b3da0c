"""One stream against a running cluster's public gRPC API, beside HF `generate` in one process.

    specdec up                                   # or serve deploy deploy/cluster.yaml
    specdec bench --cluster 127.0.0.1:9000       # the default pair's held-out chat prompts

What a user of one stream sees: greedy, the same prompt token ids for every system, new tokens
per second of wall time (the first token included) and the median time to the first token
(streamed; for HF, which does not stream, a one-token generation timed apart). The systems run
in turn, prompt set by prompt set, `--repeats-cluster` times (a shared machine drifts), and the
medians are printed with each system's ratio to HF `generate` in its faster dtype on this
machine (what a one-process user would pick). HF runs in this process with the bench's torch
threads; the cluster runs as deployed (its dtype and threads are its own).
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.hf import hf_greedy

HF_DTYPES = (torch.bfloat16, torch.float32)


@dataclass
class _System:
    name: str
    # (prompt ids, new tokens) -> (tokens, seconds of the generation, seconds to the first token
    # or None: a unary call)
    run: Callable[[list[int], int], tuple[list[int], float, float | None]]
    rates: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)


# HF's prompt lookup (`generate(prompt_lookup_num_tokens=...)`), the one-process anchor for
# drafting without a model; 10 is the value HF's documentation uses.
PROMPT_LOOKUP_TOKENS = 10


def _hf_system(
    target: str, dtype: torch.dtype, lookup: bool = False, assistant: str | None = None
) -> _System:
    from transformers import AutoModelForCausalLM

    import workers.checkpoints.subset_draft  # noqa: F401 - the pair's draft type, for HF

    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).eval()
    kw: dict = {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS} if lookup else {}
    if assistant is not None:  # HF assisted generation with the pair's draft model
        kw["assistant_model"] = AutoModelForCausalLM.from_pretrained(assistant, dtype=dtype).eval()

    def run(ids: list[int], n: int) -> tuple[list[int], float, float]:
        # HF does not stream: its time to first token is a one-token generation, timed apart.
        t0 = time.perf_counter()
        hf_greedy(model, ids, 1)
        t1 = time.perf_counter()
        out = hf_greedy(model, ids, n, **kw)
        return out, time.perf_counter() - t1, t1 - t0

    kind = "prompt lookup" if lookup else "assisted" if assistant else "generate"
    return _System(f"hf {kind} {str(dtype).removeprefix('torch.')}", run)


def _cluster_system(
    address: str, mode_name: str, mode: int, drafter: int = 0, unary: bool = False
) -> _System:
    """A streamed generation (what a streaming client sees: its time to the first token, the
    deployment's `ingress.stream_interval`), or with `unary` one Generate call (what a client
    that wants the whole answer sees, as HF's `generate` gives it: no time to first token)."""
    import grpc

    from protos import specdec_pb2 as pb
    from protos import specdec_pb2_grpc

    stub = specdec_pb2_grpc.SpecDecodeStub(grpc.insecure_channel(address))

    def run(ids: list[int], n: int) -> tuple[list[int], float, float | None]:
        req = pb.GenerateRequest(
            prompt_token_ids=ids,
            max_new_tokens=n,
            temperature=0.0,
            speculation=pb.SpeculationOptions(mode=mode, drafter=drafter),
        )
        t0 = time.perf_counter()
        if unary:
            out = list(stub.Generate(req, timeout=600).token_ids)
            return out, time.perf_counter() - t0, None
        tokens: list[int] = []
        first = None
        for msg in stub.GenerateStream(req, timeout=600):
            if first is None and msg.token_ids:
                first = time.perf_counter() - t0
            tokens.extend(msg.token_ids)
        seconds = time.perf_counter() - t0
        return tokens, seconds, seconds if first is None else first

    return _System(f"cluster {mode_name}{', unary' if unary else ''}", run)


def bench_cluster_stream(
    address: str,
    target: str,
    draft: str | None,
    prompts: list[list[int]],
    new_tokens: int,
    repeats: int,
    only: re.Pattern | None = None,
) -> list[_System]:
    """Every system's tok/s per repeat, median TTFTs and last outputs (progress lines). The
    cluster's AUTO runs with the deployment's drafter and with each drafter alone."""
    from protos import specdec_pb2 as pb

    auto = pb.SPECULATION_MODE_AUTO
    systems = [_hf_system(target, d) for d in HF_DTYPES]
    systems += [_hf_system(target, d, lookup=True) for d in HF_DTYPES]
    if draft:
        systems += [_hf_system(target, d, assistant=draft) for d in HF_DTYPES]
    systems += [
        _cluster_system(address, "plain (mode OFF)", pb.SPECULATION_MODE_OFF),
        _cluster_system(address, "plain (mode OFF)", pb.SPECULATION_MODE_OFF, unary=True),
        _cluster_system(address, "AUTO", auto),
        _cluster_system(address, "AUTO", auto, unary=True),
        _cluster_system(address, "AUTO, draft model only", auto, pb.DRAFTER_MODEL),
        _cluster_system(address, "AUTO, lookup only", auto, pb.DRAFTER_LOOKUP),
    ]
    if only is not None:  # HF generate stays: the ratios are to it
        systems = [s for s in systems if s.name.startswith("hf generate") or only.search(s.name)]
    for s in systems:
        s.run(prompts[0], 4)  # warm-up: connections, first allocations
    for r in range(repeats):
        for s in systems:
            outputs, seconds, firsts = [], 0.0, []
            for ids in prompts:
                out, spent, first = s.run(ids, new_tokens)
                outputs.append(out)
                seconds += spent
                firsts.append(first)
            s.rates.append(sum(map(len, outputs)) / seconds)
            s.outputs = outputs
            if None not in firsts:
                s.ttfts.append(statistics.median(firsts))
            print(f"  repeat {r + 1}/{repeats} {s.name}: {s.rates[-1]:.1f} tok/s", flush=True)
    return systems


def run_cluster_stream(args, prompts: list[list[int]]) -> int:
    only = re.compile(args.only) if args.only else None
    systems = bench_cluster_stream(
        args.cluster,
        args.target,
        args.draft,
        prompts,
        args.max_new_tokens,
        args.repeats_cluster,
        only,
    )
    hf = systems[: len(HF_DTYPES)]
    best = max(hf, key=lambda s: statistics.median(s.rates))
    ref = statistics.median(best.rates)
    print(
        f"# specdec bench --cluster {args.cluster} — {time.strftime('%Y-%m-%d')}, one stream, "
        f"workload {args.workload}, "
        f"{len(prompts)} prompts x {args.max_new_tokens} new tokens, greedy, median of "
        f"{args.repeats_cluster}; hf: {args.threads} torch threads"
    )
    print(f"{'system':35s} {'tok/s':>7s} {'vs ' + best.name:>24s} {'ttft ms':>8s}  same as")
    for s in systems:
        rate = statistics.median(s.rates)
        ttft = f"{1e3 * statistics.median(s.ttfts):8.0f}" if s.ttfts else f"{'-':>8s}"
        same = [h.name.split()[-1] for h in hf if h.outputs == s.outputs and h is not s]
        print(f"{s.name:35s} {rate:7.1f} {rate / ref:23.2f}x {ttft}  {', '.join(same) or '-'}")
    return 0
