"""Benchmark: speculative vs plain decoding vs HF assisted generation, measured in one run.

    specdec bench [--prompts 20] [--max-new-tokens 64] [--no-grpc]   (or: python -m bench.run)
    specdec bench --concurrency 1,4,16,64 --plot sweep.png           (bench/concurrency.py)
    specdec bench --profile [--prompts 5] [--max-new-tokens 32]      (bench/profile.py)
    specdec bench --structured [--prompts 6] [--max-new-tokens 96]   (bench/structured.py)

Every system decodes the same held-out prompts greedily with the shipped pair (or --target/--draft),
so the outputs must be identical token for token; the benchmark checks that before it reports, and
prints tokens/s and each system's ratio to plain HF `generate` on the target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.hf import hf_greedy
from bench.policies import bench_policy

# A draft that stops a block after a token it gave less than this (HF assisted generation's
# default assistant_confidence_threshold).
CONFIDENCE_STOP = 0.4
FALLBACK_PROMPTS = ["fibonacci", "parse_args", "read_config", "__init__", "main", "walk"]


@dataclass
class Measured:
    name: str
    seconds: float
    tokens: int
    outputs: list[list[int]]
    extra: dict

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


# --only REGEX: run the systems whose name matches (and always the HF baseline).
ONLY: re.Pattern | None = None


def _timed(
    name: str,
    prompts: list[list[int]],
    run: Callable[[list[int]], list[int]],
    extra: Callable[[], dict] = dict,
) -> Measured | None:
    if ONLY is not None and not ONLY.search(name) and not name.startswith("hf generate"):
        return None
    print(f"  {name} ...", end="", flush=True)  # progress: a run takes minutes
    run(prompts[0])  # warm-up: first-call allocations and lazy init are not what we measure
    outputs = []
    t0 = time.perf_counter()
    for ids in prompts:
        outputs.append(run(ids))
    seconds = time.perf_counter() - t0
    tokens = sum(len(o) for o in outputs)
    print(f" {tokens / seconds:.1f} tok/s", flush=True)
    return Measured(name, seconds, tokens, outputs, extra())


def bench_hf(
    target_path: str, draft_path: str, prompts: list[list[int]], max_new: int
) -> list[Measured]:
    from transformers import AutoModelForCausalLM

    from workers.model_runner import load_tokenizer

    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_path, dtype=torch.float32).eval()
    # Stop where the engine stops: the generation config's EOS, else the tokenizer's.
    eos = target.generation_config.eos_token_id
    if eos is None:
        eos = load_tokenizer(target_path).eos_token_id

    def gen(ids: list[int], **kw) -> list[int]:
        pad = eos if isinstance(eos, int) else None
        return hf_greedy(target, ids, max_new, eos_token_id=eos, pad_token_id=pad, **kw)

    return [
        _timed("hf generate (target only)", prompts, gen),
        _timed("hf assisted generation", prompts, lambda ids: gen(ids, assistant_model=draft)),
    ]


def bench_engine(
    target_path: str, draft_path: str, prompts: list[list[int]], max_new: int
) -> list[Measured]:
    from cluster.engine import SpecEngine
    from cluster.scheduling.policy import SpecMode

    engine = SpecEngine.from_paths(target_path, draft_path, policy=bench_policy())
    results = []
    stats: list = []

    def runner(**kw) -> Callable[[list[int]], list[int]]:
        def run(ids: list[int]) -> list[int]:
            r = engine.generate(ids, max_new_tokens=max_new, **kw)
            stats.append(r.stats)
            return r.token_ids

        return run

    def summary() -> dict:
        s = stats[1:]  # skip warm-up
        stats.clear()
        proposed = sum(x.draft_tokens for x in s)
        passes = sum(x.rounds + x.plain_steps for x in s)
        return {
            "alpha": round(sum(x.accepted_tokens for x in s) / proposed, 3) if proposed else None,
            "tau": round(sum(sum(r.committed for r in x.records) for x in s) / passes, 2),
            "pipeline_hits": sum(x.pipeline_hits for x in s),
            "plain_steps": sum(x.plain_steps for x in s),
        }

    for name, kw in [
        ("engine plain (mode OFF)", {"mode": SpecMode.OFF}),
        ("engine spec k=4, not pipelined", {"mode": SpecMode.ON, "k": 4, "pipelined": False}),
        ("engine spec k=4, pipelined", {"mode": SpecMode.ON, "k": 4, "pipelined": True}),
        ("engine spec adaptive (AUTO), pipelined", {"mode": SpecMode.AUTO, "pipelined": True}),
        (
            "engine spec adaptive (AUTO), pipelining auto",
            {"mode": SpecMode.AUTO, "pipelined": "auto"},
        ),
    ]:
        results.append(_timed(name, prompts, runner(**kw), summary))
    # The draft stops a block at a token it is unsure of (HF assisted generation's default
    # policy: up to 20 tokens, stop below 0.4), so a block is as long as the draft is sure.
    engine.draft.worker.confidence_stop = CONFIDENCE_STOP
    for name, kw in [
        (
            f"engine spec k=8, draft stops below p={CONFIDENCE_STOP}, not pipelined",
            {"mode": SpecMode.ON, "k": 8, "pipelined": False},
        ),
        (
            f"engine spec adaptive (AUTO), draft stops below p={CONFIDENCE_STOP}, not pipelined",
            {"mode": SpecMode.AUTO, "pipelined": False},
        ),
    ]:
        results.append(_timed(name, prompts, runner(**kw), summary))
    engine.close()
    return results


def bench_grpc(
    target_path: str, draft_path: str, prompts: list[list[int]], max_new: int, threads: int
) -> list[Measured]:
    """The disaggregated path: draft and target as separate gRPC worker processes, the router in
    this process. The target gets `threads` torch threads, the draft one."""
    import asyncio

    from cluster.routing.config import RouterConfig
    from cluster.routing.router import Router
    from cluster.routing.worker_processes import start_all, stop_all, worker_process
    from protos import specdec_pb2 as pb

    stop = ["--confidence-stop", str(CONFIDENCE_STOP)]
    procs = start_all(
        worker_process("target", target_path, threads=threads),
        worker_process("draft", draft_path, threads=1),
        worker_process("draft", draft_path, threads=1, extra=stop),
    )
    loop = asyncio.new_event_loop()
    results = []
    try:
        # (pipelining, the draft process, what its rows are called): the last two drafts end a
        # block after a token they gave less than CONFIDENCE_STOP.
        runs = [(False, 1, ""), (True, 1, ""), ("auto", 1, "")]
        runs += [(p, 2, f", draft stops below p={CONFIDENCE_STOP}") for p in (False, "auto")]
        for pipelined, draft, stops in runs:
            router = Router(
                RouterConfig(
                    target_model_path=target_path, pipelined=pipelined, policy=bench_policy()
                )
            )
            router.set_workers(drafts=[procs[draft].address], targets=[procs[0].address])
            stats: list = []

            def runner(mode: int, k: int, router=router, stats=stats):
                def run(ids: list[int]) -> list[int]:
                    req = pb.GenerateRequest(
                        prompt_token_ids=ids,
                        max_new_tokens=max_new,
                        speculation=pb.SpeculationOptions(mode=mode, num_draft_tokens=k),
                    )
                    resp = loop.run_until_complete(router.generate(req))
                    stats.append(resp.stats)
                    return list(resp.token_ids)

                return run

            def summary(stats=stats) -> dict:
                s = stats[1:]
                stats.clear()
                proposed = sum(x.draft_tokens for x in s)
                accepted = sum(x.accepted_tokens for x in s)
                return {
                    "alpha": round(accepted / proposed, 3) if proposed else None,
                    "pipeline_hits": sum(x.pipeline_hits for x in s),
                    "plain_steps": sum(x.plain_steps for x in s),
                }

            tag = {False: "not pipelined", True: "pipelined", "auto": "pipelining auto"}[pipelined]
            tag += stops
            systems = [(f"grpc spec adaptive (AUTO), {tag}", pb.SPECULATION_MODE_AUTO, 0)]
            if pipelined != "auto":
                k = 8 if stops else 4
                systems.insert(0, (f"grpc spec k={k}, {tag}", pb.SPECULATION_MODE_ON, k))
            if pipelined is False and not stops:
                systems.insert(0, ("grpc plain (mode OFF)", pb.SPECULATION_MODE_OFF, 0))
            for name, mode, k in systems:
                results.append(_timed(name, prompts, runner(mode, k), summary))
            router.close()
    finally:
        loop.close()
        stop_all(procs)
    return results


def main(argv: list[str] | None = None) -> int:
    global ONLY
    ap = argparse.ArgumentParser(prog="specdec bench", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--pair",
        help="a named pair (specdec models); overrides --target/--draft; neither given: the "
        "default pair",
    )
    ap.add_argument("--target", help="a checkpoint directory (with --draft)")
    ap.add_argument("--draft")
    ap.add_argument("--only", help="regex: run only the systems whose name matches")
    ap.add_argument("--prompts", type=int, help="default 20 (--profile: 5)")
    ap.add_argument("--max-new-tokens", type=int, help="default 64 (--profile: 32)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-grpc", action="store_true", help="skip the gRPC worker processes")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--concurrency",
        help="comma-separated stream counts: run the concurrency sweep through the cluster instead",
    )
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument(
        "--repeats", type=int, default=1, help="sweep: run every cell this many times (pooled)"
    )
    ap.add_argument("--plot", type=Path, help="sweep: write the PNG plot here")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="instead: where one greedy stream's decode step goes, layer by layer",
    )
    ap.add_argument(
        "--structured",
        action="store_true",
        help="instead: JSON-schema outputs in one process, plain vs AUTO (bench/structured.py)",
    )
    ap.add_argument(
        "--dtype",
        default="auto",
        help="--structured and --concurrency: the models' dtype (auto: bf16 where the CPU has "
        "it, as served; float32: greedy outputs exact, checked)",
    )
    ap.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="instead: one stream against a running cluster's gRPC API, beside HF generate",
    )
    ap.add_argument(
        "--repeats-cluster", type=int, default=3, help="--cluster: interleaved repeats (median)"
    )
    ap.add_argument(
        "--ttft-hops",
        action="store_true",
        help="--cluster: where the time to first token goes, hop by hop (run on a Ray node of "
        "the cluster)",
    )
    ap.add_argument(
        "--workload",
        choices=("default", "grounded"),
        default="default",
        help="the prompts: the pair's held-out ones (chat and code for a chat pair), or grounded "
        "requests whose answer repeats the prompt (edit a given function, quote a passage)",
    )
    ap.add_argument(
        "--confidence-stop",
        type=float,
        help="sweep: the draft's confidence stop (default: the pair's, 0 for checkpoint paths)",
    )
    args = ap.parse_args(argv)
    if args.structured:
        from bench.structured import run_structured

        args.prompts = args.prompts or 6
        args.max_new_tokens = args.max_new_tokens or 96
        torch.set_num_threads(args.threads)
        return run_structured(args)
    if bool(args.target) != bool(args.draft):
        ap.error("--target and --draft go together (or name a --pair)")
    from bench import profile

    args.prompts = args.prompts or (profile.PROMPTS if args.profile else 20)
    args.max_new_tokens = args.max_new_tokens or (profile.NEW_TOKENS if args.profile else 64)
    torch.set_num_threads(args.threads)
    ONLY = re.compile(args.only) if args.only else None

    from pairs.heldout import heldout_code_prompts, heldout_instruct_prompts, heldout_texts
    from workers.checkpoints.registry import get_pair
    from workers.model_runner import load_tokenizer

    pair = get_pair(args.pair) if args.pair or not args.target else None
    if pair is not None:
        args.target, args.draft = str(pair.target()), str(pair.draft())
    if args.confidence_stop is None:
        args.confidence_stop = pair.confidence_stop if pair is not None else 0.0
    tok = load_tokenizer(args.target)
    pair_dir = Path(args.target).parent
    if pair is not None and pair.chat:
        # Held-out chat requests (through the chat template) and code: what eval-pair uses.
        split = Path(args.draft) / "split.json"
        prompts = [ids for _, ids in heldout_instruct_prompts(tok, args.prompts, split)]
    elif (pair_dir / "split.json").is_file():
        # The first lines of held-out functions: the same prompts `specdec eval-pair` uses.
        prompts = heldout_code_prompts(tok, heldout_texts(pair_dir), args.prompts)
    else:  # a pair trained elsewhere: fixed prompts
        texts = [f"def {name}(" for name in FALLBACK_PROMPTS]
        prompts = [tok.encode(t, add_special_tokens=False) for t in texts][: args.prompts]
    if args.workload == "grounded":
        from pairs.grounded import grounded_prompts

        split = Path(args.draft) / "split.json"
        if not split.is_file():
            split = pair_dir / "split.json"
        chat = pair is not None and pair.chat
        prompts = grounded_prompts(tok, split, args.prompts, chat)
    if args.profile:
        return profile.run_profile(args, prompts)
    if args.cluster and args.ttft_hops:
        from bench.ttft_hops import run_ttft_hops

        return run_ttft_hops(args, prompts)
    if args.cluster:
        from bench.cluster_stream import run_cluster_stream

        return run_cluster_stream(args, prompts)
    if args.concurrency:
        return run_sweep(args, prompts)
    results = bench_hf(args.target, args.draft, prompts, args.max_new_tokens)
    results += bench_engine(args.target, args.draft, prompts, args.max_new_tokens)
    if not args.no_grpc:
        results += bench_grpc(args.target, args.draft, prompts, args.max_new_tokens, args.threads)
    results = [m for m in results if m is not None]
    ttft = {}
    if ONLY is None or ONLY.search("ttft"):
        from bench.ttft import bench_ttft

        print("  time to first token ...", flush=True)
        ttft = bench_ttft(args.target, args.draft, prompts)
    base = results[0]
    mismatched = [m.name for m in results if m.outputs != base.outputs]
    print(
        f"# specdec bench — {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{os.cpu_count()} cores, torch threads {args.threads}, {len(prompts)} prompts x "
        f"{args.max_new_tokens} new tokens, greedy"
    )
    print(f"{'system':36s} {'tok/s':>8s} {'vs hf':>7s}  notes")
    for m in results:
        note = " ".join(f"{k}={v}" for k, v in m.extra.items())
        print(
            f"{m.name:36s} {m.tokens_per_s:8.1f} {m.tokens_per_s / base.tokens_per_s:6.2f}x  {note}"
        )
    if ttft:
        mean_len = sum(map(len, prompts)) / len(prompts)
        print(f"time to first token, median over the prompts (mean {mean_len:.0f} tokens):")
        for name, ms in ttft.items():
            print(f"  {name:52s} {ms:8.1f} ms")
    print(
        "greedy outputs identical to hf generate:", "yes" if not mismatched else f"NO: {mismatched}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "name": m.name,
                        "tokens_per_s": m.tokens_per_s,
                        "seconds": m.seconds,
                        "tokens": m.tokens,
                        **m.extra,
                    }
                    for m in results
                ]
                + [{"name": name, "ms": ms} for name, ms in ttft.items()],
                indent=2,
            )
        )
    return 1 if mismatched else 0


def run_sweep(args: argparse.Namespace, prompts: list[list[int]]) -> int:
    from bench import concurrency as sweep

    counts = [int(x) for x in args.concurrency.split(",") if x.strip()]
    head = (
        f"# specdec bench --concurrency — {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{os.cpu_count()} cores, target torch threads {args.threads}, {len(prompts)} prompts x "
        f"{args.max_new_tokens} new tokens, greedy, {args.requests_per_stream} requests per stream "
        f"(at least {sweep.MIN_REQUESTS} per cell), {args.repeats} repeat(s), modes in turn, "
        f"draft confidence stop {args.confidence_stop}"
    )
    print(head, flush=True)
    cells = sweep.sweep(
        args.target,
        args.draft,
        prompts,
        concurrency=counts,
        per_stream=args.requests_per_stream,
        max_new=args.max_new_tokens,
        threads=args.threads,
        modes=[m for m in sweep.MODES if re.search(args.only, m)] if args.only else None,
        repeats=args.repeats,
        confidence_stop=args.confidence_stop,
        dtype=args.dtype,
    )
    bad = sweep.check_outputs(cells)
    print(sweep.markdown(cells))
    print("greedy outputs identical to plain decoding:", "yes" if not bad else f"NO: {bad}")
    if bad and args.dtype != "float32":  # batch shapes round bf16 differently: near-ties
        print("  (not float32: rounding differs with the batch, so near-ties may tip; pass "
              "--dtype float32 for the exactness check)")  # fmt: skip
        bad = []
    if args.plot and sweep.plot(cells, args.plot, head.lstrip("# ")[:110]):
        print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps([c.row() for c in cells], indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
