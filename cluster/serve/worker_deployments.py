"""The worker deployments: each replica loads one worker and serves the internal worker gRPC API
(protos/worker.proto) on a free port, registers its address (cluster/serve/registry.py) and is
health-checked by Serve.

* `SpecDecodeDraft`: N replicas, each on the draft pool (`ray_actor_options.resources`), loads a
  `DraftWorker`.
* `SpecDecodeTarget`: each replica is one tensor-parallel group of R ranks. R = 1: the replica loads
  a plain `TargetWorker` on the target pool. R > 1: Serve gives the replica a placement group of R
  bundles (`placement_group_bundles`, STRICT_PACK by default) and the replica starts one rank actor
  per bundle (`workers.tp.TensorParallelTarget`: torch.distributed, gloo on CPU / NCCL on GPU,
  transformers' `tp_plan="auto"`), then serves the worker API for the group.

Continuous batching: every target replica also runs the step scheduler of its own batch (a
`cluster.routing.router.Router` whose only target is the replica's own worker, called in-process
on the worker's model thread, with the draft pool from the registry), so exactly one scheduler
drives a target replica and no target ever sees competing batches, however many ingress replicas
forward to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

import grpc
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.config import ClusterConfig
from cluster.observability.recorders import StepRecorder, record_batch, record_worker
from cluster.serve.autoscaling import ROWS_METRIC
from cluster.serve.grpc_errors import grpc_status_for
from cluster.serve.metrics_sink import RaySink
from cluster.serve.registry import DRAFT, TARGET, poll_period, poll_registry

log = logging.getLogger("ray.serve")

METRICS_PERIOD_S = 1.0  # how often a worker replica samples its KV and batch into the metrics


def _worker_load(worker: Any) -> tuple[int, int]:
    return int(worker.live_sequences), int(worker.kv_tokens)


class _WorkerReplica:
    """Shared by the draft and target replicas: serve the worker API, register, health-check."""

    kind = ""

    def _start_serving(
        self, cfg: ClusterConfig, worker: Any, registry: DeploymentHandle, dtype: str
    ) -> None:
        self.cfg = cfg
        self.worker = worker
        self.dtype = dtype  # models.dtype as resolved on this worker's device ("auto" never)
        self.forward = worker.runner.forward  # models.forward as resolved for this model
        self.registry = registry
        host = cfg.workers.host or ray.util.get_node_ip_address()
        self.server, port = self._serve(worker, host)
        self.address = f"{host}:{port}"
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (never in production)
            self.replica_id = f"{self.kind}-{os.getpid()}"
        self._channel: grpc.aio.Channel | None = None
        loop = asyncio.get_running_loop()
        self._heartbeat = loop.create_task(self._heartbeat_loop())
        self.sink = RaySink(cfg.models.model_id())
        self.sequences = 0  # sampled with the metrics: the draft pool's autoscaling signal
        self._sampler = loop.create_task(self._sample_loop())
        log.info(
            "%s worker %s serving on %s (%s, %s forward; models.dtype %s)",
            self.kind,
            self.replica_id,
            self.address,
            dtype,
            self.forward,
            cfg.models.dtype,
        )

    def _serve(self, worker: Any, host: str):
        raise NotImplementedError

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.registry.register.remote(self.kind, self.replica_id, self.address)
            except Exception as exc:  # noqa: BLE001 - the registry may be restarting; retry
                log.warning("%s worker: registry heartbeat failed: %s", self.kind, exc)
            await asyncio.sleep(self.cfg.workers.heartbeat_s)

    async def _sample_loop(self) -> None:
        """Every METRICS_PERIOD_S: the worker's sequences and KV into the metrics."""
        budget = getattr(self.worker, "max_kv_tokens", None)
        while True:
            try:
                seqs, kv = await asyncio.to_thread(_worker_load, self.worker)
                self.sequences = seqs
                record_worker(self.sink, seqs, kv, budget)
                self._sample_more()
            except Exception as exc:  # noqa: BLE001 - metrics never take a replica down
                log.debug("%s worker: metrics sample failed: %s", self.kind, exc)
            await asyncio.sleep(METRICS_PERIOD_S)

    def _sample_more(self) -> None:
        pass

    def _drain(self) -> None:
        """Out of the registry, no scheduler leases this worker to new rows; the rows it holds
        go on until they finish (at most workers.drain_s), then the port closes. (A target
        replica's requests are Serve's: Serve waits for them before this runs.)"""
        deadline = time.monotonic() + self.cfg.workers.drain_s
        try:
            while self.worker.live_sequences > 0 and time.monotonic() < deadline:
                time.sleep(0.2)  # the worker's gRPC server runs on its own threads
        except Exception:  # noqa: BLE001 - a worker already gone has nothing to drain
            pass

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (cluster/serve/autoscaling.py scales on it): the
        rows this replica serves."""
        return {ROWS_METRIC: float(self._rows())}

    def _rows(self) -> int:
        return self.sequences

    async def check_health(self) -> None:
        """The worker API answers on its own port (and, for a TP group, every rank is alive)."""
        from protos import worker_pb2, worker_pb2_grpc

        if self._channel is None:
            tls = self.cfg.workers.tls
            if tls is None:
                self._channel = grpc.aio.insecure_channel(self.address)
            else:  # its own worker asks for a client certificate too
                files = tls.files()
                self._channel = grpc.aio.secure_channel(
                    self.address, files.channel_credentials(), options=files.channel_options()
                )
        stub_cls = (
            worker_pb2_grpc.DraftWorkerStub
            if self.kind == DRAFT
            else worker_pb2_grpc.TargetWorkerStub
        )
        await stub_cls(self._channel).Stats(worker_pb2.StatsRequest(), timeout=10)
        if self._heartbeat.done():  # never expected: the loop swallows its errors
            raise RuntimeError(f"{self.kind} worker: heartbeat loop ended")

    def info(self) -> dict[str, Any]:
        """Where this replica runs and what it holds (for tests, the CLI and operators)."""
        ctx = ray.get_runtime_context()
        return {
            "kind": self.kind,
            "replica_id": self.replica_id,
            "address": self.address,
            "pid": os.getpid(),
            "node_id": ctx.get_node_id(),
            "resources": ctx.get_assigned_resources(),
            "live_sequences": int(self.worker.live_sequences),
            "dtype": self.dtype,
            "forward": self.forward,
        }

    def __del__(self) -> None:
        # Serve calls this on a graceful stop; a killed replica simply expires from the registry.
        try:
            self._heartbeat.cancel()
            self._sampler.cancel()
            self.registry.unregister.remote(self.replica_id)
        except Exception:  # noqa: BLE001
            pass
        self._drain()
        try:
            self.server.stop(grace=1.0)
        except Exception:  # noqa: BLE001
            pass


@serve.deployment(name="SpecDecodeDraft")
class DraftDeployment(_WorkerReplica):
    kind = DRAFT

    async def __init__(self, config: dict[str, Any], registry: DeploymentHandle) -> None:

        from workers.draft_loading import load_draft
        from workers.dtypes import dtype_name
        from workers.model_thread import load_threads

        cfg = ClusterConfig.load(config)
        load_threads()  # the model runs on the servicer's model thread, with the pool's threads
        device = "cuda" if cfg.draft.pool.num_gpus > 0 else "cpu"
        worker = load_draft(
            cfg.models.draft_path(),
            top_m=cfg.draft.top_m,
            confidence_stop=cfg.confidence_stop(),
            dtype=cfg.models.dtype,  # "auto" resolves in the runner, on its device
            forward=cfg.models.forward,
            compile=cfg.models.compile,
            device=device,
            max_kv_tokens=cfg.draft.max_kv_tokens or None,
        )
        self._start_serving(cfg, worker, registry, dtype_name(worker.runner.dtype))

    def _serve(self, worker: Any, host: str):
        from workers.service import serve_draft

        w = self.cfg.workers
        tls = w.tls.files() if w.tls else None
        threads = self.cfg.draft.pool.threads
        return serve_draft(
            worker, host, 0, lease_timeout_s=w.lease_timeout_s, tls=tls, threads=threads
        )


@serve.deployment(name="SpecDecodeTarget")
class TargetDeployment(_WorkerReplica):
    kind = TARGET

    async def __init__(self, config: dict[str, Any], registry: DeploymentHandle) -> None:

        from workers.dtypes import dtype_name
        from workers.grammar import warm as warm_grammar
        from workers.model_thread import load_threads

        cfg = ClusterConfig.load(config)
        t = cfg.target
        load_threads()  # the model runs on the model thread (SerialExecutor), with the pool's
        if t.tp_size == 1:
            from workers.target import TargetWorker

            device = "cuda" if t.pool.num_gpus > 0 else "cpu"
            worker = TargetWorker.from_path(
                cfg.models.target_path(),
                dtype=cfg.models.dtype,  # "auto" resolves in the runner, on its device
                forward=cfg.models.forward,
                compile=cfg.models.compile,
                device=device,
                max_kv_tokens=t.max_kv_tokens or None,
            )
            dtype = dtype_name(worker.runner.dtype)
            # llguidance's one-time tables (~2 s), off the first structured request's path
            threading.Thread(
                target=warm_grammar,
                args=(worker.runner.tokenizer, worker.runner.vocab_size),
                name="grammar-warm-up",
                daemon=True,
            ).start()
        else:
            from workers.tp import RankSpec, TensorParallelTarget

            rank = RankSpec(t.pool.num_cpus, t.pool.num_gpus, ((t.pool.resource, t.pool.amount),))
            # Serve created this replica's placement group (one bundle per rank); the ranks go
            # into it. Loading is blocking work: keep the replica's event loop free meanwhile.
            worker = await asyncio.to_thread(
                TensorParallelTarget,
                cfg.models.target_path(),
                t.tp_size,
                rank=rank,
                dtype=cfg.models.dtype,  # "auto" resolves on each rank, on its device
                backend=t.resolved_backend(),
                strategy=t.placement_strategy,
                timeout_s=t.tp_timeout_s,
                threads=t.pool.threads,
                max_kv_tokens=t.max_kv_tokens or None,
            )
            dtype = worker.rank_info[0]["dtype"]
        self._start_serving(cfg, worker, registry, dtype)
        self._start_scheduling(cfg, registry)

    def _serve(self, worker: Any, host: str):
        from workers.model_thread import SerialExecutor
        from workers.service import serve_target

        # One model thread for both callers: the gRPC API and this replica's own scheduler.
        self.executor = SerialExecutor(worker, self.cfg.target.pool.threads)
        w = self.cfg.workers
        tls = w.tls.files() if w.tls else None
        return serve_target(
            worker, host, 0, executor=self.executor, lease_timeout_s=w.lease_timeout_s, tls=tls
        )

    def _start_scheduling(self, cfg: ClusterConfig, registry: DeploymentHandle) -> None:
        """The step scheduler of this replica's batch: a router whose one target is this
        replica's own worker, called in-process on the worker's model thread (no loopback RPC:
        cluster/transport/same_process.py), with the draft pool from the registry."""
        from cluster.routing.config import RouterConfig
        from cluster.routing.router import Router
        from cluster.transport.grpc_workers import LeaseRenewal, configure_tls
        from cluster.transport.same_process import ServedTarget

        if cfg.workers.tls is not None:  # this scheduler's channels to the draft workers
            configure_tls(cfg.workers.tls.files())
        if cfg.workers.lease_timeout_s:  # the draft workers keep this scheduler's rows
            LeaseRenewal.set_period(min(5.0, cfg.workers.lease_timeout_s / 4))
        own = ServedTarget.factory(self.address, self.worker, self.executor)
        self.router = Router(
            RouterConfig.from_cluster_config(cfg),
            targets=[self.address],
            local_targets={self.address: own},
            observer=StepRecorder(self.sink),
        )
        self._drafts_poll = asyncio.get_running_loop().create_task(
            poll_registry(
                registry,
                poll_period(cfg),
                lambda drafts, _targets: self.router.set_workers(drafts=list(drafts)),
                f"target {self.replica_id} scheduler",
            )
        )

    async def generate(self, request: bytes, every: int = 1):
        """Stream one request through this replica's batch: GenerateResponse bytes, `every`
        tokens to a message after the first (0: a unary call, one message unless the stream
        would be silent longer than its liveness bound), or one error item
        `("error", grpc code name, details)` (cluster/routing/forwarding.py). A caller that goes
        away (Serve cancels the call) frees the sequence at the next step."""
        from cluster.api.response_stream import coalesce
        from cluster.api.validation import RequestError
        from cluster.routing.forwarding import error_item
        from protos import specdec_pb2

        # The ingress gives a replica up after target_timeout_s without a message.
        alive_s = min(1.0, self.router.config.target_timeout_s / 4)
        stream = coalesce(
            self.router.generate_stream(specdec_pb2.GenerateRequest.FromString(request)),
            every,
            alive_s,
        )
        try:
            async for msg in stream:
                yield msg.SerializeToString()
        except RequestError as exc:
            yield error_item(exc)
        except Exception as exc:  # noqa: BLE001 - a clean one-line INTERNAL, never a traceback
            log.exception("target %s: request failed", self.replica_id)
            code, details = grpc_status_for(exc)
            yield error_item(RequestError(code, "", details))
        finally:
            await stream.aclose()

    def batch_status(self) -> dict[str, Any]:
        return {"in_flight": self.router.in_flight, "batch": self.router.batch_status()}

    def _drain(self) -> None:
        pass  # Serve waited for this replica's requests (its rows) before stopping it

    def _sample_more(self) -> None:
        batch = self.router.batch_status()
        record_batch(
            self.sink,
            sum(b["running"] for b in batch.values()),
            sum(b["waiting"] for b in batch.values()),
        )

    def _rows(self) -> int:
        """Requests this replica's scheduler holds (running, waiting, arriving)."""
        return self.router.in_flight

    async def check_health(self) -> None:
        await super().check_health()
        if hasattr(self.worker, "check_health"):  # a TP group: every rank must answer
            await asyncio.to_thread(self.worker.check_health, 10.0)

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["tp_size"] = self.cfg.target.tp_size
        if hasattr(self.worker, "rank_info"):
            out["ranks"] = [
                {k: r[k] for k in ("rank", "pid", "node_id", "resources", "device")}
                for r in self.worker.rank_info
            ]
            pg = ray.util.get_current_placement_group()
            out["placement_group"] = pg.id.hex() if pg is not None else None
        return out

    def __del__(self) -> None:
        try:
            self._drafts_poll.cancel()
            self.router.close()
        except Exception:  # noqa: BLE001
            pass
        super().__del__()
        close = getattr(getattr(self, "worker", None), "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001
                pass
