"""Where a running Serve cluster's time to first token goes, hop by hop, measured in one run.

    specdec bench --cluster 127.0.0.1:9000 --ttft-hops [--prompts 4] [--repeats-cluster 5]

Run on a node of the cluster's Ray (it joins with `ray.init(address="auto")`). Each held-out
prompt asks for one token, greedy, plain (mode OFF), through each entry in turn, interleaved:

  public gRPC      client -> Serve's gRPC proxy -> ingress replica -> target replica
  ingress handle   a Serve handle call of the ingress's GenerateStream (no proxy)
  target handle    a Serve handle call of a target replica's generate (no proxy, no ingress)
  prefill          the target replica's scheduler: admission and the prefill pass that decodes
                   the first token (the growth of its `phase_seconds.admit`, one request at once)

and HF `generate` of one token in one process (the reference, in its faster dtype). The
differences are each hop's share: proxy = public - ingress, ingress = ingress - target handle,
the replica's serving path = target handle - prefill.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

from bench.cluster_stream import HF_DTYPES, _hf_system


def _ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def run_ttft_hops(args, prompts: list[list[int]]) -> int:
    import grpc
    import ray
    from ray import serve

    from cluster.serve.app import APP_NAME
    from protos import specdec_pb2 as pb
    from protos import specdec_pb2_grpc

    def request(ids: list[int]) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            prompt_token_ids=ids,
            max_new_tokens=1,
            temperature=0.0,
            speculation=pb.SpeculationOptions(mode=pb.SPECULATION_MODE_OFF),
        )

    stub = specdec_pb2_grpc.SpecDecodeStub(grpc.insecure_channel(args.cluster))
    ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
    ingress = serve.get_deployment_handle("SpecDecodeIngress", APP_NAME)
    target = serve.get_deployment_handle("SpecDecodeTarget", APP_NAME)

    def public(ids: list[int]) -> float:
        t0 = time.perf_counter()
        for msg in stub.GenerateStream(request(ids), timeout=600):
            if msg.token_ids:
                return time.perf_counter() - t0
        raise RuntimeError("no token")

    async def first(gen) -> float:
        t0, t = time.perf_counter(), None
        async for _ in gen:
            t = time.perf_counter() - t0 if t is None else t
        if t is None:
            raise RuntimeError("no token")
        return t

    def via_ingress(ids: list[int]) -> float:
        handle = ingress.options(stream=True)
        return asyncio.run(first(handle.GenerateStream.remote(request(ids))))

    def via_target(ids: list[int]) -> float:
        handle = target.options(stream=True)
        return asyncio.run(first(handle.generate.remote(request(ids).SerializeToString(), 1)))

    def admit_seconds() -> float:
        status = target.batch_status.remote().result()
        return sum(b["phase_seconds"]["admit"] for b in status["batch"].values())

    prefills: list[float] = []

    def via_target_timed(ids: list[int]) -> float:
        before = admit_seconds()
        t = via_target(ids)
        prefills.append(admit_seconds() - before)
        return t

    hf = min((_hf_system(args.target, d) for d in HF_DTYPES), key=lambda s: _hf_first(s, prompts))
    hops: dict[str, Callable[[list[int]], float]] = {
        f"{hf.name}, one token": lambda ids: hf.run(ids, 1)[2],
        "public gRPC (proxy, ingress, target)": public,
        "ingress handle (ingress, target)": via_ingress,
        "target handle (target replica)": via_target_timed,
    }
    times: dict[str, list[float]] = {name: [] for name in hops}
    for fn in hops.values():
        fn(prompts[0])  # warm-up: connections, first allocations
    prefills.clear()
    for r in range(args.repeats_cluster):
        for ids in prompts:
            for name, fn in hops.items():
                times[name].append(fn(ids))
        print(f"  repeat {r + 1}/{args.repeats_cluster} done", flush=True)
    med = {name: _ms(v) for name, v in times.items()}
    names = list(hops)
    ref, public_ms, ingress_ms, target_ms = (med[n] for n in names)
    prefill_ms = _ms(prefills)
    mean_len = sum(map(len, prompts)) / len(prompts)
    print(
        f"# specdec bench --cluster {args.cluster} --ttft-hops — {time.strftime('%Y-%m-%d')}, "
        f"{len(prompts)} prompts (mean {mean_len:.0f} tokens) x {args.repeats_cluster}, one "
        "token, greedy, plain; medians"
    )
    print(f"{'entry':44s} {'ttft ms':>8s} {'vs hf':>7s}")
    for name in names:
        print(f"{name:44s} {med[name]:8.1f} {med[name] / ref:6.2f}x")
    print("where the public first token's time goes:")
    parts = {
        "Serve's gRPC proxy (public - ingress handle)": public_ms - ingress_ms,
        "the ingress (ingress handle - target handle)": ingress_ms - target_ms,
        "the target replica's serving path (handle - prefill)": target_ms - prefill_ms,
        "admission and the prefill pass (in the scheduler)": prefill_ms,
    }
    for name, ms in parts.items():
        print(f"  {name:56s} {ms:7.1f} ms  {ms / public_ms:5.0%}")
    return 0


def _hf_first(system, prompts: list[list[int]]) -> float:
    """HF's median one-token time over the prompts (to pick its faster dtype)."""
    system.run(prompts[0], 1)
    return statistics.median(system.run(ids, 1)[2] for ids in prompts)
