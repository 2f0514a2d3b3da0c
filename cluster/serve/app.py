"""The Ray Serve application: draft and target deployments on their own pools, the router ingress.

    serve deploy deploy/cluster.yaml    # import_path: cluster.serve.app:build_app, args: the config
    serve.run(build_app({...}))               # the same from Python (what `specdec up` does)

Deployments (one application, named in the Serve config):

* `SpecDecodeDraft`: N replicas, each on the draft pool (`ray_actor_options.resources`), loads a
  `DraftWorker` and serves the internal worker gRPC API (protos/worker.proto) on a free port.
* `SpecDecodeTarget`: each replica is one tensor-parallel group of R ranks. R = 1: the replica loads
  a plain `TargetWorker` on the target pool. R > 1: Serve gives the replica a placement group of R
  bundles (`placement_group_bundles`, STRICT_PACK by default) and the replica starts one rank actor
  per bundle (`workers.tp.TensorParallelTarget`: torch.distributed, gloo on CPU / NCCL on GPU,
  transformers' `tp_plan="auto"`), then serves the worker API for the group.
* `SpecDecodeRegistry`: one small replica that knows the worker addresses (see below).
* `SpecDecodeIngress`: serves the public `specdec.v1.SpecDecode` API through Serve's gRPC proxy
  (`grpc_options.grpc_servicer_functions:
  [protos.specdec_pb2_grpc.add_SpecDecodeServicer_to_server]`), and an OpenAI-compatible HTTP API
  (/v1/completions, /v1/chat/completions, /v1/models) plus GET /specdec (status JSON) through
  Serve's HTTP proxy (cluster/api/http_app.py; the application's route_prefix is "/"). It is
  stateless: it validates and tokenizes, then streams the request from a target replica (Serve
  picks the least loaded one), and moves it to another replica when its replica dies
  (cluster/routing/forwarding.py).

Continuous batching: every target replica runs the step scheduler of its own batch (a
`cluster.routing.router.Router` whose only target is the replica's own worker server, driven over
gRPC, with the draft pool from the registry), so exactly one scheduler drives a target replica and
no target ever sees competing batches, however many ingress replicas there are.

How the router finds the workers: Serve routes requests to *a* replica, but the router must talk
to each worker replica directly (a sequence's KV lives on one draft and one target). So every
worker replica registers `kind, replica id, host:port` with the registry deployment when it starts
and again every `workers.heartbeat_s` (a heartbeat), and unregisters when Serve stops it. An address
not renewed for `workers.registry_ttl_s` expires (a killed replica never unregisters). The ingress
polls the registry and hands the live addresses to `Router.set_workers`; the router itself drops an
address whose calls fail and takes it back when the registry lists it again. A replica that Serve
restarts comes back on a new port and is picked up by the next poll. A restarted registry starts
empty: until it has seen one TTL of heartbeats its snapshot is marked cold and the ingress only
adds addresses, never removes them.

Errors: every public handler maps failures to a gRPC code and a one-line message (the router's
`RequestError` keeps its own code; deadlines give DEADLINE_EXCEEDED; anything unexpected INTERNAL
with its type and message). It sets code and details on the context and then raises: Serve turns
that into the status the client sees (a streaming handler that only sets the code would end with OK
and an empty stream; an uncaught exception would leak a Ray traceback as INTERNAL).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import grpc
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.api.openai import default_model_id
from cluster.config import ClusterConfig

log = logging.getLogger("ray.serve")

APP_NAME = "specdec"
GRPC_SERVICER = "protos.specdec_pb2_grpc.add_SpecDecodeServicer_to_server"
DRAFT, TARGET = "draft", "target"


# -- registry ---------------------------------------------------------------------------------


class Registry:
    """Worker addresses by replica id, renewed by heartbeats, expired after a TTL."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = float(ttl_s)
        self.started = time.monotonic()
        self._entries: dict[str, tuple[str, str, float]] = {}  # id -> (kind, address, seen)
        self.version = 0

    def register(self, kind: str, replica_id: str, address: str) -> int:
        if kind not in (DRAFT, TARGET):
            raise ValueError(f"kind must be {DRAFT!r} or {TARGET!r}, got {kind!r}")
        old = self._entries.get(replica_id)
        self._entries[replica_id] = (kind, address, time.monotonic())
        if old is None or old[:2] != (kind, address):
            self.version += 1
        return self.version

    def unregister(self, replica_id: str) -> int:
        if self._entries.pop(replica_id, None) is not None:
            self.version += 1
        return self.version

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        expired = [r for r, (_, _, seen) in self._entries.items() if now - seen > self.ttl_s]
        for r in expired:
            del self._entries[r]
            self.version += 1
        by_kind: dict[str, list[str]] = {DRAFT: [], TARGET: []}
        for kind, address, _ in self._entries.values():
            by_kind[kind].append(address)
        return {
            "drafts": sorted(by_kind[DRAFT]),
            "targets": sorted(by_kind[TARGET]),
            "version": self.version,
            "warm": now - self.started >= self.ttl_s,
        }


@serve.deployment(name="SpecDecodeRegistry", num_replicas=1, ray_actor_options={"num_cpus": 0})
class RegistryDeployment(Registry):
    async def check_health(self) -> None:  # nothing can go wrong that a restart would fix
        return None


async def poll_registry(registry: DeploymentHandle, period_s: float, apply, what: str) -> None:
    """Forever: read the registry's snapshot and hand the live addresses to `apply(drafts,
    targets)` when they change. A restarted registry starts empty: until it has seen one TTL of
    heartbeats its snapshot is marked cold and addresses are only added, never removed."""
    known: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    while True:
        try:
            snap = await registry.snapshot.remote()
            drafts, targets = tuple(snap["drafts"]), tuple(snap["targets"])
            if not snap["warm"]:
                drafts = tuple(sorted(set(drafts) | set(known[0])))
                targets = tuple(sorted(set(targets) | set(known[1])))
            if (drafts, targets) != known:
                known = (drafts, targets)
                apply(drafts, targets)
                log.info("%s: workers drafts=%s targets=%s", what, drafts, targets)
        except Exception as exc:  # noqa: BLE001 - registry restarting; keep the old list
            log.warning("%s: registry poll failed: %s", what, exc)
        await asyncio.sleep(period_s)


def poll_period(cfg: ClusterConfig) -> float:
    return max(0.2, min(1.0, cfg.workers.heartbeat_s / 2))


# -- workers ----------------------------------------------------------------------------------


class _WorkerReplica:
    """Shared by the draft and target replicas: serve the worker API, register, health-check."""

    kind = ""

    def _start_serving(self, cfg: ClusterConfig, worker: Any, registry: DeploymentHandle) -> None:
        self.cfg = cfg
        self.worker = worker
        self.registry = registry
        host = cfg.workers.host or ray.util.get_node_ip_address()
        self.server, port = self._serve(worker, host)
        self.address = f"{host}:{port}"
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (never in production)
            self.replica_id = f"{self.kind}-{os.getpid()}"
        self._channel: grpc.aio.Channel | None = None
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())
        log.info("%s worker %s serving on %s", self.kind, self.replica_id, self.address)

    def _serve(self, worker: Any, host: str):
        raise NotImplementedError

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.registry.register.remote(self.kind, self.replica_id, self.address)
            except Exception as exc:  # noqa: BLE001 - the registry may be restarting; retry
                log.warning("%s worker: registry heartbeat failed: %s", self.kind, exc)
            await asyncio.sleep(self.cfg.workers.heartbeat_s)

    async def check_health(self) -> None:
        """The worker API answers on its own port (and, for a TP group, every rank is alive)."""
        from protos import worker_pb2, worker_pb2_grpc

        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
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
        }

    def __del__(self) -> None:
        # Serve calls this on a graceful stop; a killed replica simply expires from the registry.
        try:
            self._heartbeat.cancel()
            self.registry.unregister.remote(self.replica_id)
        except Exception:  # noqa: BLE001
            pass
        try:
            self.server.stop(grace=1.0)
        except Exception:  # noqa: BLE001
            pass


@serve.deployment(name="SpecDecodeDraft")
class DraftDeployment(_WorkerReplica):
    kind = DRAFT

    async def __init__(self, config: dict[str, Any], registry: DeploymentHandle) -> None:
        import torch

        from workers.draft import DraftWorker

        cfg = ClusterConfig.load(config)
        torch.set_num_threads(cfg.draft.pool.threads)
        device = "cuda" if cfg.draft.pool.num_gpus > 0 else "cpu"
        worker = DraftWorker.from_path(
            cfg.models.draft_path(),
            top_m=cfg.draft.top_m,
            confidence_stop=cfg.confidence_stop(),
            dtype=getattr(torch, cfg.models.dtype),
            device=device,
            max_kv_tokens=cfg.draft.max_kv_tokens or None,
        )
        self._start_serving(cfg, worker, registry)

    def _serve(self, worker: Any, host: str):
        from workers.service import serve_draft

        return serve_draft(worker, host, 0)


@serve.deployment(name="SpecDecodeTarget")
class TargetDeployment(_WorkerReplica):
    kind = TARGET

    async def __init__(self, config: dict[str, Any], registry: DeploymentHandle) -> None:
        import torch

        cfg = ClusterConfig.load(config)
        t = cfg.target
        torch.set_num_threads(t.pool.threads)
        if t.tp_size == 1:
            from workers.target import TargetWorker

            device = "cuda" if t.pool.num_gpus > 0 else "cpu"
            worker = TargetWorker.from_path(
                cfg.models.target_path(),
                dtype=getattr(torch, cfg.models.dtype),
                device=device,
                max_kv_tokens=t.max_kv_tokens or None,
            )
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
                dtype=cfg.models.dtype,
                backend=t.resolved_backend(),
                strategy=t.placement_strategy,
                timeout_s=t.tp_timeout_s,
                threads=t.pool.threads,
                max_kv_tokens=t.max_kv_tokens or None,
            )
        self._start_serving(cfg, worker, registry)
        self._start_scheduling(cfg, registry)

    def _serve(self, worker: Any, host: str):
        from workers.service import serve_target

        return serve_target(worker, host, 0)

    def _start_scheduling(self, cfg: ClusterConfig, registry: DeploymentHandle) -> None:
        """The step scheduler of this replica's batch: a router whose one target is this
        replica's own worker server (over gRPC), with the draft pool from the registry."""
        from cluster.routing.router import Router, RouterConfig

        self.router = Router(RouterConfig.from_cluster_config(cfg), targets=[self.address])
        self._drafts_poll = asyncio.get_running_loop().create_task(
            poll_registry(
                registry,
                poll_period(cfg),
                lambda drafts, _targets: self.router.set_workers(drafts=list(drafts)),
                f"target {self.replica_id} scheduler",
            )
        )

    async def generate(self, request: bytes):
        """Stream one request through this replica's batch: GenerateResponse bytes, or one
        error item `("error", grpc code name, details)` (cluster/routing/forwarding.py). A caller
        that goes away (Serve cancels the call) frees the sequence at the next step."""
        from cluster.api.validation import RequestError
        from cluster.routing.forwarding import error_item
        from protos import specdec_pb2

        stream = self.router.generate_stream(specdec_pb2.GenerateRequest.FromString(request))
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


# -- ingress ----------------------------------------------------------------------------------


def grpc_status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The code and one-line message a client gets for a failure inside a handler."""
    code = getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):  # the router's RequestError (and its kin)
        return code, str(exc)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded: {exc}".rstrip(": ")
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


class _HandlerFailed(Exception):
    """Raised after the gRPC code and details are set, so Serve ends the call with them."""


def _fail(grpc_context: Any, exc: BaseException) -> _HandlerFailed:
    code, details = grpc_status_for(exc)
    details = " ".join(details.split())[:2000]  # one line, bounded
    if code == grpc.StatusCode.INTERNAL:
        log.error("specdec ingress: request failed", exc_info=exc)
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(details)
    return _HandlerFailed(details)


@serve.deployment(name="SpecDecodeIngress")
@serve.ingress()  # the HTTP app is built per replica: __serve_build_asgi_app__
class IngressDeployment:
    """The router behind Serve's gRPC proxy (`specdec.v1.SpecDecode` Generate / GenerateStream)
    and behind Serve's HTTP proxy (the OpenAI-compatible /v1 API and GET /specdec, see
    cluster/api/http_app.py): one router, one validation, for both."""

    async def __init__(
        self,
        config: dict[str, Any],
        registry: DeploymentHandle,
        drafts: DeploymentHandle | None = None,
        targets: DeploymentHandle | None = None,
    ) -> None:
        self.cfg = ClusterConfig.load(config)
        self.registry = registry
        self.drafts = drafts  # held so that `status` can ask the worker replicas where they run
        self.targets = targets
        self.router = make_router(self.cfg, targets)
        # A pair's target dir is named "target": its pair's name says which model it is.
        self.model_id = (
            self.cfg.models.served_model_name
            or self.cfg.models.pair_name("target")
            or default_model_id(self.cfg.models.target_path())
        )
        self.started = time.time()
        self._workers: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self._poll = asyncio.get_running_loop().create_task(
            poll_registry(registry, poll_period(self.cfg), self._set_workers, "specdec ingress")
        )

    # -- worker discovery (for status: the schedulers in the target replicas use it) ----------

    def _set_workers(self, drafts: tuple[str, ...], targets: tuple[str, ...]) -> None:
        self._workers = (drafts, targets)

    # -- public API -------------------------------------------------------------------------

    async def Generate(self, request, grpc_context=None):  # noqa: N802 - the gRPC method name
        try:
            return await self.router.generate(request)
        except Exception as exc:  # noqa: BLE001 - every failure gets a code and a clean message
            raise _fail(grpc_context, exc) from None

    async def GenerateStream(self, request, grpc_context=None):  # noqa: N802
        stream = self.router.generate_stream(request)
        try:
            async for msg in stream:
                yield msg
        except Exception as exc:  # noqa: BLE001
            raise _fail(grpc_context, exc) from None
        finally:
            await stream.aclose()  # a cancelled client frees the sequence on the workers

    def __serve_build_asgi_app__(self):  # noqa: N807 - Serve's hook for a late-bound ASGI app
        from cluster.api.http_app import build_http_app

        return build_http_app(self)

    # -- operations -------------------------------------------------------------------------

    async def check_health(self) -> None:
        if self._poll.done():
            raise RuntimeError("specdec ingress: registry poll loop ended")

    async def status(self) -> dict[str, Any]:
        """Known worker addresses (as handed to the router) and the configured counts."""
        drafts, targets = self._workers
        return {
            "drafts": list(drafts),
            "targets": list(targets),
            "in_flight": self.router.in_flight,
            "resources": ray.get_runtime_context().get_assigned_resources(),
            "model": self.model_id,  # the OpenAI API's model id
            "want_drafts": self.cfg.draft.replicas,
            "want_targets": self.cfg.target.replicas,
            "ready": len(targets) >= self.cfg.target.replicas
            and len(drafts) >= self.cfg.draft.replicas,
        }

    def __del__(self) -> None:
        try:
            self._poll.cancel()
            self.router.close()
        except Exception:  # noqa: BLE001
            pass

    async def worker_info(self, kind: str) -> dict[str, Any]:
        """`info()` of one replica of a worker deployment (Serve picks which)."""
        handle = self.drafts if kind == DRAFT else self.targets
        if handle is None:
            raise ValueError(f"no {kind} deployment in this application")
        return await handle.info.remote()


def make_router(cfg: ClusterConfig, targets: DeploymentHandle | None):
    """The ingress side of one ingress replica: it forwards requests to the target replicas'
    schedulers through the target deployment's handle (Serve routes by load)."""
    from cluster.routing.forwarding import ForwardingRouter
    from cluster.routing.router import RouterConfig

    if targets is None:
        raise ValueError("the ingress needs the target deployment's handle")
    handle = targets.options(stream=True)

    def submit(request: bytes):
        return handle.generate.remote(request)

    return ForwardingRouter(RouterConfig.from_cluster_config(cfg), submit)


# -- the builder ------------------------------------------------------------------------------


def deployment_options(cfg: ClusterConfig) -> dict[str, dict[str, Any]]:
    """Serve options of each deployment, derived from the config (pools, TP placement, health)."""
    w = cfg.workers
    health = {
        "health_check_period_s": w.health_check_period_s,
        "health_check_timeout_s": w.health_check_timeout_s,
    }
    t = cfg.target
    if t.tp_size == 1:
        target: dict[str, Any] = {"ray_actor_options": t.pool.actor_options()}
    else:
        # The replica only coordinates; each rank actor takes one bundle's resources.
        target = {
            "ray_actor_options": {"num_cpus": 0, "num_gpus": 0},
            "placement_group_bundles": [t.pool.bundle() for _ in range(t.tp_size)],
            "placement_group_strategy": t.placement_strategy,
        }
    target.update(num_replicas=t.replicas, max_ongoing_requests=t.max_ongoing_requests, **health)
    return {
        "registry": {"ray_actor_options": {"num_cpus": 0}, "num_replicas": 1, **health},
        "draft": {
            "num_replicas": cfg.draft.replicas,
            "ray_actor_options": cfg.draft.pool.actor_options(),
            "max_ongoing_requests": cfg.draft.max_ongoing_requests,
            **health,
        },
        "target": target,
        "ingress": {
            "num_replicas": cfg.ingress.replicas,
            "ray_actor_options": {"num_cpus": cfg.ingress.num_cpus},
            "max_ongoing_requests": cfg.limits.max_in_flight,
            "max_queued_requests": cfg.limits.max_queued,
            # Serve's own rejection past max_queued: 429 over HTTP, as overload is for the
            # OpenAI API (gRPC gets RESOURCE_EXHAUSTED either way).
            "backpressure_config": {"status_code": 429, "retry_after_s": 1},
            **health,
        },
    }


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application builder (`import_path: cluster.serve.app:build_app`).

    `args` is the cluster config (see cluster/config.py); unknown keys are an error that names
    them. Model paths are checked here so a bad path fails the deploy at once.
    """
    cfg = ClusterConfig.load(args)
    cfg.check_models()
    opts = deployment_options(cfg)
    conf = cfg.to_args()
    registry = RegistryDeployment.options(**opts["registry"]).bind(cfg.workers.registry_ttl_s)
    targets = TargetDeployment.options(**opts["target"]).bind(conf, registry)
    drafts = None
    if cfg.draft.replicas:
        drafts = DraftDeployment.options(**opts["draft"]).bind(conf, registry)
    return IngressDeployment.options(**opts["ingress"]).bind(conf, registry, drafts, targets)
