"""Where one greedy stream's decode step goes, layer by layer, measured in one run.

    specdec bench --profile [--pair NAME | --target DIR --draft DIR] [--prompts 5]
                            [--max-new-tokens 32] [--threads N]

The same held-out prompts go through every layer (bench/profile_layers.py), from the bare model
forward to the router over gRPC worker processes, prompt by prompt with the layers in turn (a
shared machine drifts). Two chains are printed, each layer with its ms per decode step (its mean
over a prompt's steps, the median over the prompts), its share of the full path's step and what
it adds to the layer below:

  plain step          forward of 1 token -> TargetWorker.verify_batch -> over gRPC -> Router OFF
  speculative step    the draft's k forwards + the target's forward of k + 1 tokens ->
                      propose_batch + verify_batch -> over gRPC -> Router ON k (not pipelined)

then the scheduler's phases per step (mode OFF, ON k and AUTO as served), the draft alone against
the draft in the serving path, a verify of k against a one-token step, HF `generate` per token as
the reference, and torch.profiler's top operators of one forward. Threads are set as the worker
processes get them: the target `--threads` (`workers.server --threads`, OMP_NUM_THREADS), the draft
one; the in-process layers switch torch's threads to the model they run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import platform
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from bench.profile_layers import (
    InProcess,
    OverGrpc,
    Tally,
    forward_steps,
    hf_steps,
    plain_steps,
    router_request,
    spec_steps,
    top_ops,
)

K = 4  # draft tokens per speculative step (the bench's fixed k)
PROMPTS, NEW_TOKENS = 5, 32  # the profile's defaults for --prompts and --max-new-tokens
DRAFT_THREADS = 1  # as `specdec bench` starts its draft worker process
PHASES = ("draft", "send", "verify", "commit", "ahead")
PARTS = (("worker draft", "worker verify"), ("grpc draft", "grpc verify"))  # one layer, two calls


def run_profile(args: argparse.Namespace, prompts: list[list[int]]) -> int:
    from cluster.routing.worker_processes import start_all, stop_all, worker_process
    from workers.draft import DraftWorker
    from workers.target import TargetWorker

    print(header(args, prompts), flush=True)
    print("  starting the worker processes, loading the models ...", flush=True)
    stop = ["--confidence-stop"]
    procs = start_all(
        worker_process("target", args.target, threads=args.threads),
        # Fixed shapes for the speculative chain: every block drafts k tokens.
        worker_process("draft", args.draft, threads=DRAFT_THREADS, extra=[*stop, "0"]),
        # AUTO as served: the pair's confidence stop.
        worker_process(
            "draft", args.draft, threads=DRAFT_THREADS, extra=[*stop, str(args.confidence_stop)]
        ),
    )
    remote = OverGrpc(procs[0].address, procs[1].address)
    loop = asyncio.new_event_loop()
    routers: list = []
    try:
        target, draft = TargetWorker.from_path(args.target), DraftWorker.from_path(args.draft)
        layers = _layers(args, target, draft, remote, procs, loop, routers)
        print("  warm-up (every layer once, not counted) ...", flush=True)
        for run in layers.values():
            run(prompts[0], 2, collections.defaultdict(Tally))
        per_prompt: list[dict[str, Tally]] = []
        for i, ids in enumerate(prompts):
            per_prompt.append(collections.defaultdict(Tally))
            for name, run in layers.items():
                t0 = time.perf_counter()
                run(ids, args.max_new_tokens, per_prompt[-1])
                print(
                    f"  [{i + 1}/{len(prompts)}] {name:22s} {time.perf_counter() - t0:6.1f} s",
                    flush=True,
                )
        ops = top_ops(target.runner, prompts[0], args.threads)
    finally:
        for router in routers:
            router.close()
        remote.close()
        loop.close()
        stop_all(procs)
    print(report(typical(per_prompt), args.threads))
    print(f"torch.profiler, one target forward of 1 token, top operators by self CPU time:\n{ops}")
    return 0


# run(prompt ids, new tokens, tallies by name)
Layer = Callable[[list[int], int, dict[str, Tally]], None]


def _layers(
    args: argparse.Namespace,
    target,
    draft,
    remote: OverGrpc,
    procs: list,
    loop: asyncio.AbstractEventLoop,
    routers: list,
) -> dict[str, Layer]:
    """Layer name -> run(prompt ids, new tokens, tallies); `routers` collects what to close."""
    from bench.policies import bench_policy
    from cluster.routing.config import RouterConfig
    from cluster.routing.router import Router
    from cluster.scheduling.policy import Drafter
    from protos import specdec_pb2 as pb

    local = InProcess(target, draft, args.threads, DRAFT_THREADS)
    ids_ = (f"profile-{i}" for i in itertools.count())
    thr = args.threads

    def router(pipelined: bool | str | None, draft_proc: int) -> Router:
        kw = {} if pipelined is None else {"pipelined": pipelined}
        # The draft model's layers are what this profiles: no lookup blocks in between.
        policy = replace(bench_policy(), drafter=Drafter.MODEL)
        r = Router(RouterConfig(target_model_path=args.target, policy=policy, **kw))
        r.set_workers(drafts=[procs[draft_proc].address], targets=[procs[0].address])
        routers.append(r)
        return r

    off, on, auto = router(False, 1), router(False, 1), router(None, 2)  # None: the default
    return {
        "forward target 1": lambda ids, n, t: forward_steps(
            target.runner, next(ids_), ids, n, 1, thr, t["fwd 1"]
        ),
        f"forward target {K + 1}": lambda ids, n, t: forward_steps(
            target.runner, next(ids_), ids, n, K + 1, thr, t["fwd k+1"]
        ),
        "forward draft 1": lambda ids, n, t: forward_steps(
            draft.runner, next(ids_), ids, n, 1, DRAFT_THREADS, t["fwd draft"]
        ),
        "worker plain": lambda ids, n, t: plain_steps(local, next(ids_), ids, n, t["worker"]),
        "worker spec": lambda ids, n, t: spec_steps(
            local, next(ids_), ids, n, K, t["worker draft"], t["worker verify"]
        ),
        "grpc plain": lambda ids, n, t: plain_steps(remote, next(ids_), ids, n, t["grpc"]),
        "grpc spec": lambda ids, n, t: spec_steps(
            remote, next(ids_), ids, n, K, t["grpc draft"], t["grpc verify"]
        ),
        "router OFF": lambda ids, n, t: router_request(
            loop, off, ids, pb.SPECULATION_MODE_OFF, 0, n, t["router OFF"]
        ),
        f"router ON k={K}": lambda ids, n, t: router_request(
            loop, on, ids, pb.SPECULATION_MODE_ON, K, n, t["router ON"]
        ),
        "router AUTO": lambda ids, n, t: router_request(
            loop, auto, ids, pb.SPECULATION_MODE_AUTO, 0, n, t["router AUTO"]
        ),
        "hf generate": lambda ids, n, t: hf_steps(target.runner.model, ids, n, thr, t["hf"]),
    }


def header(args: argparse.Namespace, prompts: list[list[int]]) -> str:
    mean = sum(map(len, prompts)) / len(prompts)
    return (
        f"# specdec bench --profile — {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{os.cpu_count()} cores, {len(prompts)} prompts (mean {mean:.0f} tokens) x "
        f"{args.max_new_tokens} new tokens, greedy, k={K}; ms per step: a prompt's mean, the "
        f"median over the prompts\n"
        f"# target {args.target}\n# draft {args.draft}\n"
        f"# torch threads: target {args.threads}, draft {DRAFT_THREADS} (worker processes: "
        f"workers.server --threads N with OMP_NUM_THREADS=N; in-process layers: "
        f"torch.set_num_threads per model), inter-op {torch.get_num_interop_threads()}; "
        f"draft confidence stop: off in the speculative chain (k tokens per block), "
        f"{args.confidence_stop} for AUTO"
    )


def typical(per_prompt: list[dict[str, Tally]]) -> dict[str, Tally]:
    """Per layer, its run on the prompt where its ms per step is the median: a burst of load from
    elsewhere on a shared machine slows a whole run of a layer several times over, and the median
    leaves it out. A layer timed in parts (draft + verify) keeps both parts of one prompt."""
    out: dict[str, Tally] = {}
    grouped = {k for g in PARTS for k in g}
    singles = sorted(set().union(*per_prompt) - grouped)
    for group in [*PARTS, *((k,) for k in singles)]:
        runs = sorted(per_prompt, key=lambda t, g=group: sum(t[k].ms for k in g))
        out.update({k: runs[(len(runs) - 1) // 2][k] for k in group})
    return out


def chain(title: str, rows: list[tuple[str, float]]) -> list[str]:
    """A chain of layers: ms per step, share of the last (the full path), what each adds (the
    difference of the printed figures, so the columns add up as printed)."""
    full = round(rows[-1][1], 2)
    out = [title, f"  {'layer':58s} {'ms/step':>9s} {'share':>6s} {'adds ms':>9s}"]
    prev = 0.0
    for name, ms in rows:
        ms = round(ms, 2)
        share = ms / full if full else 0.0
        out.append(f"  {name:58s} {ms:9.2f} {share:6.1%} {ms - prev:+9.2f}")
        prev = ms
    return out


def report(t: dict[str, Tally], threads: int) -> str:
    fwd1, fwdk, fwd_d = t["fwd 1"].ms, t["fwd k+1"].ms, t["fwd draft"].ms
    on, off, hf = t["router ON"], t["router OFF"], t["hf"].ms
    lines = chain(
        "plain step (one token):",
        [
            ("forward: ModelRunner.extend_batch, 1 token", fwd1),
            ("worker in-process: TargetWorker.verify_batch", t["worker"].ms),
            ("worker over gRPC: GrpcTarget.verify_batch", t["grpc"].ms),
            ("router, mode OFF: Router.generate, per step", off.ms),
        ],
    )
    lines += chain(
        f"speculative step (k={K}, not pipelined):",
        [
            (f"forward: draft {K} x 1 token + target {K + 1} tokens", K * fwd_d + fwdk),
            (
                "worker in-process: propose_batch + verify_batch",
                t["worker draft"].ms + t["worker verify"].ms,
            ),
            (
                "worker over gRPC: propose_batch + verify_batch",
                t["grpc draft"].ms + t["grpc verify"].ms,
            ),
            (f"router, mode ON k={K}: Router.generate, per step", on.ms),
        ],
    )
    lines += ["router phases, ms per step (other: outside the phases, waking and streaming):"]
    lines.append(
        f"  {'mode':10s}"
        + "".join(f"{p:>8s}" for p in (*PHASES, "other", "step"))
        + f"{'tokens/step':>12s}{'ms/token':>9s}"
    )
    for name, r in (("OFF", off), (f"ON k={K}", on), ("AUTO", t["router AUTO"])):
        phases = [r.phase_ms(p) for p in PHASES]
        per_token = 1e3 * r.seconds / r.tokens if r.tokens else 0.0
        lines.append(
            f"  {name:10s}"
            + "".join(f"{x:8.2f}" for x in (*phases, r.ms - sum(phases), r.ms))
            + f"{r.tokens / r.steps if r.steps else 0:12.2f}{per_token:9.2f}"
        )
    lines.append(
        f"draft, {K} tokens a block: forward alone {K} x {fwd_d:.2f} = {K * fwd_d:.2f} ms; "
        f"propose_batch in-process {t['worker draft'].ms:.2f} ms, over gRPC "
        f"{t['grpc draft'].ms:.2f} ms, in the router (phase draft, ON k={K}) "
        f"{on.phase_ms('draft'):.2f} ms"
    )
    lines.append(
        f"verify of k={K} ({K + 1} tokens) vs a one-token step: forward {fwdk:.2f} / {fwd1:.2f} ms"
        f" = {_ratio(fwdk, fwd1)}; in-process {t['worker verify'].ms:.2f} / {t['worker'].ms:.2f}"
        f" = {_ratio(t['worker verify'].ms, t['worker'].ms)}; over gRPC {t['grpc verify'].ms:.2f}"
        f" / {t['grpc'].ms:.2f} = {_ratio(t['grpc verify'].ms, t['grpc'].ms)}; router (phase "
        f"verify, ON / OFF) {on.phase_ms('verify'):.2f} / {off.phase_ms('verify'):.2f} = "
        f"{_ratio(on.phase_ms('verify'), off.phase_ms('verify'))}"
    )
    lines.append(
        f"reference: HF generate {hf:.2f} ms per token (the target's model object, torch "
        f"threads {threads}): router mode OFF step / HF = {_ratio(off.ms, hf)}, forward alone / "
        f"HF = {_ratio(fwd1, hf)}"
    )
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"
