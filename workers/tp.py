"""Tensor-parallel target: one Ray actor per rank, every rank runs the same `TargetWorker` op.

A target replica of tensor-parallel size R is one Ray placement group of R bundles (Serve creates
it for the replica from `placement_group_bundles`). `TensorParallelTarget` starts one `TargetRank`
actor in each bundle, joins them into one `torch.distributed` process group (gloo on CPU, NCCL on
GPU) and loads the target on every rank with transformers' own TP plan (`tp_plan="auto"`): nothing
is sharded by hand here.

Lock-step rule: every call (prefill_batch, verify_batch, release) goes to *all* ranks with the
same arguments, in the same order, so each rank holds the same sequences, the same committed tokens
and the same random streams; the collectives inside the forward pass then line up, and every rank
computes the same full logits (a batched call is one batched forward on every rank). The result of
rank 0 is returned: its per-row slots, a refused row's error among them. Submission is serialized
by a lock (Ray runs an actor's tasks in the order one caller submitted them), so concurrent callers
can never interleave two ops differently on two ranks. A request without a seed gets one drawn
here, before the fan-out, so that the ranks' samplers agree.

Only this adapter knows about Ray and torch.distributed; the worker it runs on each rank is the
plain `workers.target.TargetWorker`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import ray
import torch
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers.batch import PrefillRow, VerifyRow
from workers.model_runner import load_tokenizer
from workers.types import SamplingParams


class TensorParallelError(RuntimeError):
    """A rank of the tensor-parallel group is gone or failed outside the worker's own checks."""


@dataclass(frozen=True, slots=True)
class RankSpec:
    """Resources of one rank (one placement-group bundle)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: tuple[tuple[str, float], ...] = ()

    def bundle(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.num_cpus:
            out["CPU"] = float(self.num_cpus)
        if self.num_gpus:
            out["GPU"] = float(self.num_gpus)
        out.update({k: float(v) for k, v in self.resources})
        return out


class TargetRank:
    """One rank: a process-group member holding a full `TargetWorker` over its shard."""

    def __init__(self, rank: int, world_size: int, device: str, threads: int | None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.worker = None
        self._store = None
        # Each rank actor sees its own accelerator(s) only (Ray sets CUDA_VISIBLE_DEVICES per
        # actor), so its local device index is 0; transformers binds the device from LOCAL_RANK.
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0"})
        if threads:
            torch.set_num_threads(int(threads))

    # -- set-up -----------------------------------------------------------------------------

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0 only: host a TCPStore on a free port; returns (host, port) for the others."""
        from torch.distributed import TCPStore

        host = ray.util.get_node_ip_address()
        self._store = TCPStore(
            host,
            0,
            self.world_size,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=300),
        )
        return host, int(self._store.port)

    def init(
        self,
        host: str,
        port: int,
        backend: str,
        path: str,
        dtype: str,
        timeout_s: float,
        max_kv_tokens: int | None = None,
    ) -> dict[str, Any]:
        """Join the process group and load this rank's shard of the target."""
        import torch.distributed as dist
        from torch.distributed import TCPStore

        from workers.dtypes import dtype_name, resolve_dtype
        from workers.model_runner import ModelRunner
        from workers.target import TargetWorker

        store = self._store
        if store is None:
            store = TCPStore(
                host, port, self.world_size, is_master=False, timeout=timedelta(seconds=300)
            )
        os.environ.update({"MASTER_ADDR": host, "MASTER_PORT": str(port)})
        kw: dict[str, Any] = {}
        if backend == "nccl":
            torch.cuda.set_device(0)
            kw["device_id"] = torch.device("cuda", 0)
        dist.init_process_group(
            backend,
            store=store,
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
            **kw,
        )
        # `auto` resolves here, on the rank's own device (GPU ranks: bf16 where it is native).
        device = "cuda" if backend == "nccl" else "cpu"
        runner = ModelRunner(
            path,
            dtype=resolve_dtype(dtype, device),
            tp_plan="auto",
            max_kv_tokens=max_kv_tokens,
        )
        self.worker = TargetWorker(runner)
        return {
            "rank": self.rank,
            "max_context": runner.max_context,
            "vocab_size": runner.vocab_size,
            "eos_token_ids": sorted(runner.eos_token_ids),
            "device": str(runner.device),
            "dtype": dtype_name(runner.dtype),
            "forward": runner.forward,
            "resources": ray.get_runtime_context().get_assigned_resources(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }

    # -- ops --------------------------------------------------------------------------------

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.worker, method)(*args, **kwargs)

    def get(self, attr: str) -> Any:
        return getattr(self.worker, attr)

    @ray.method(concurrency_group="health")
    def ping(self) -> int:
        """Answers even while a long op runs (its own thread), so health checks never queue."""
        return self.rank

    def assigned_resources(self) -> dict[str, float]:
        return ray.get_runtime_context().get_assigned_resources()

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# Ops run one at a time, in submission order (the default group); pings have their own thread.
RemoteTargetRank = ray.remote(concurrency_groups={"health": 1})(TargetRank)


class RunnerInfo:
    """What callers read from `TargetWorker.runner`, for a target whose model lives on the ranks."""

    def __init__(self, path: str, info: dict[str, Any]) -> None:
        self.path = path
        self.tokenizer = load_tokenizer(path)
        self.max_context = int(info["max_context"])
        self.vocab_size = int(info["vocab_size"])
        self.eos_token_ids = set(info["eos_token_ids"])
        self.device = info["device"]
        self.forward = str(info["forward"])  # transformers' modules: the weights are sharded


def default_backend(num_gpus: float) -> str:
    return "nccl" if num_gpus > 0 else "gloo"


class TensorParallelTarget:
    """The `TargetWorker` interface over R rank actors (R >= 2) in one placement group.

    Inside a Serve replica created with `placement_group_bundles`, the replica's own placement
    group is used (bundle i holds rank i). Elsewhere (tests, scripts) a placement group is created
    here and removed by `close()`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tp_size: int,
        *,
        rank: RankSpec = RankSpec(),
        dtype: str = "float32",
        backend: str | None = None,
        strategy: str = "STRICT_PACK",
        pg: PlacementGroup | None = None,
        timeout_s: float = 120.0,
        threads: int | None = None,
        max_kv_tokens: int | None = None,
    ) -> None:
        if tp_size < 2:
            raise ValueError(f"tp_size must be >= 2 for a tensor-parallel group, got {tp_size}")
        self.path = str(path)
        self.tp_size = tp_size
        self.timeout_s = timeout_s
        backend = backend or default_backend(rank.num_gpus)
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        self._own_pg = None
        if pg is None:
            pg = get_current_placement_group()
        if pg is None:
            pg = placement_group([rank.bundle() for _ in range(tp_size)], strategy=strategy)
            self._own_pg = pg
            if not pg.wait(timeout_seconds=timeout_s):
                remove_placement_group(pg)
                raise TensorParallelError(
                    f"no room for a placement group of {tp_size} x {rank.bundle()} "
                    f"({strategy}) within {timeout_s:.0f}s"
                )
        if pg.bundle_count < tp_size:
            raise ValueError(
                f"placement group has {pg.bundle_count} bundles, tensor parallelism needs {tp_size}"
            )
        device = "cuda" if backend == "nccl" else "cpu"
        self.ranks = [
            RemoteTargetRank.options(
                num_cpus=rank.num_cpus,
                num_gpus=rank.num_gpus,
                resources=dict(rank.resources),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=i
                ),
            ).remote(i, tp_size, device, threads)
            for i in range(tp_size)
        ]
        self._lock = threading.Lock()
        self._broken: str | None = None
        try:
            host, port = ray.get(self.ranks[0].rendezvous.remote(), timeout=timeout_s)
            infos = self._get(
                [
                    r.init.remote(host, port, backend, self.path, dtype, timeout_s, max_kv_tokens)
                    for r in self.ranks
                ]
            )
        except BaseException:
            self.close()
            raise
        self.rank_info = infos
        self.runner = RunnerInfo(self.path, infos[0])

    # -- the TargetWorker interface ---------------------------------------------------------

    @property
    def max_context(self) -> int:
        return self.runner.max_context

    @property
    def live_sequences(self) -> int:
        return int(self._get([self.ranks[0].get.remote("live_sequences")])[0])

    @property
    def kv_tokens(self) -> int:
        return int(self._get([self.ranks[0].get.remote("kv_tokens")])[0])

    @property
    def max_kv_tokens(self) -> int | None:
        return self._get([self.ranks[0].get.remote("max_kv_tokens")])[0]

    def prefill_batch(self, rows: Sequence[PrefillRow]) -> list[object]:
        """Per row: the next token or the row's error (as TargetWorker.prefill_batch), from rank
        0 (every rank samples it alike: the params are seeded)."""
        rows = [replace(r, token_ids=list(r.token_ids), params=_seeded(r.params)) for r in rows]
        return self._all("prefill_batch", rows)

    def verify_batch(self, rows: Sequence[VerifyRow]) -> list[object]:
        """Per row: a Verdict or the row's error (as TargetWorker.verify_batch), from rank 0."""
        return self._all(
            "verify_batch", [replace(r, draft_tokens=list(r.draft_tokens)) for r in rows]
        )

    def release(self, seq_id: str) -> bool:
        return self._all("release", seq_id)

    # -- group management -------------------------------------------------------------------

    def check_health(self, timeout_s: float = 10.0) -> None:
        """Raise TensorParallelError unless every rank answers and no call broke the group."""
        self._get([r.ping.remote() for r in self.ranks], timeout=timeout_s)

    def assigned_resources(self) -> list[dict[str, float]]:
        return self._get([r.assigned_resources.remote() for r in self.ranks])

    def close(self) -> None:
        for r in getattr(self, "ranks", []):
            try:
                ray.kill(r)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.ranks = []
        if self._own_pg is not None:
            try:
                remove_placement_group(self._own_pg)
            except Exception:  # noqa: BLE001
                pass
            self._own_pg = None

    # -- fan-out ----------------------------------------------------------------------------

    def _all(self, method: str, *args: Any) -> Any:
        with self._lock:  # one submission order for every rank
            refs = [r.call.remote(method, args, {}) for r in self.ranks]
        return self._get(refs)[0]

    def _get(self, refs: list, timeout: float | None = None) -> list:
        """Every rank's result, or one error for the call.

        Each ref is fetched (after a failure, briefly) so that no rank's error is left
        unretrieved. The worker's own refusals (stale or unknown sequence, bad input, KV budget)
        are slots of a batched call's result, the same on every rank, never failures. A failure
        (a dead rank, a failed collective) breaks the group for good: this and every later call
        raise TensorParallelError, health checks fail, and Serve replaces the replica.
        """
        if self._broken:
            raise TensorParallelError(self._broken)
        # Wait on every rank at once, not rank by rank: a dead rank's ref fails at once, while
        # a live rank waits in a collective for its dead peer until the backend's own timeout
        # (minutes), and a call that waited on rank 0 first hung that long.
        deadline = None if timeout is None else time.monotonic() + timeout
        slot = {ref: i for i, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        failures: list[BaseException] = []
        pending = list(refs)
        while pending and not failures:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                break  # out of time: what is left fails below
            try:
                results[slot[ready[0]]] = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                failures.append(exc)
        for ref in pending:  # after a failure, each briefly: no rank's error left unretrieved
            try:
                results[slot[ref]] = ray.get(ref, timeout=5.0 if failures else 0.0)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
                failures.append(exc)
        if failures:
            self._raise(failures)
        return results

    def _raise(self, failures: list[BaseException]):
        # A rank that is gone (not an exception inside a task) says most about what broke.
        tasks = ray.exceptions.RayTaskError
        first = next((f for f in failures if not isinstance(f, tasks)), failures[0])
        self._broken = (
            f"target tensor-parallel group of {self.tp_size} ranks is broken: "
            f"{type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''}"
        )[:500]
        raise TensorParallelError(self._broken) from first


def _seeded(params: SamplingParams) -> SamplingParams:
    """Every rank must draw the same random stream: a request without a seed gets one here,
    before the fan-out."""
    if params.seed is None:
        return replace(params, seed=int(torch.randint(0, 2**62, (1,)).item()))
    return params
