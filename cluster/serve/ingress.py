"""The ingress deployment: the public API of the application, stateless.

`SpecDecodeIngress` serves the public `specdec.v1.SpecDecode` API and grpc.health.v1 through
Serve's gRPC proxy (`grpc_options.grpc_servicer_functions`: cluster.serve.app.GRPC_SERVICERS),
and an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models) plus GET
/specdec (status JSON), /health, /ready and /version through Serve's HTTP proxy
(cluster/api/http_app.py; the application's route_prefix is "/"). It validates and tokenizes,
then streams the request from a target replica (Serve picks the least loaded one), and moves it
to another replica when its replica dies (cluster/routing/forwarding.py). Every failure reaches
the client as a gRPC code and one line (cluster/serve/grpc_errors.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.api.auth import APIKeys, check_metadata, key_in_flight
from cluster.api.grpc_service import keyed_stream, parsed
from cluster.config import ClusterConfig
from cluster.observability.recorders import RequestRecorder
from cluster.serve.grpc_errors import handler_failure
from cluster.serve.metrics_sink import RaySink
from cluster.serve.registry import DRAFT, poll_period, poll_registry

# grpc.health.v1 service names the ingress answers for ("" = the server as a whole).
HEALTH_SERVICES = ("", "specdec.v1.SpecDecode")


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
        self.model_id = self.cfg.models.model_id()
        self.api_keys = APIKeys.from_env(  # None: open
            self.cfg.security.api_key_env, self.cfg.limits.max_in_flight_per_key
        )
        self.recorder = RequestRecorder(RaySink(self.model_id))
        self.router = make_router(self.cfg, targets, self.recorder)
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
            key = check_metadata(_metadata(grpc_context), self.api_keys)
            with key_in_flight(self.api_keys, key):
                return await self.router.generate(parsed(request))
        except Exception as exc:  # noqa: BLE001 - every failure gets a code and a clean message
            raise handler_failure(grpc_context, exc) from None

    async def GenerateStream(self, request, grpc_context=None):  # noqa: N802
        try:
            metadata = _metadata(grpc_context)
            async for msg in keyed_stream(self.router, request, metadata, self.api_keys):
                yield msg
        except Exception as exc:  # noqa: BLE001
            raise handler_failure(grpc_context, exc) from None

    # -- grpc.health.v1 on the public port (Serve's proxy routes Check / Watch here) -----------

    async def Check(self, request, grpc_context=None):  # noqa: N802
        from grpc_health.v1 import health_pb2

        if request.service not in HEALTH_SERVICES:
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=self._health_status())

    async def Watch(self, request, grpc_context=None):  # noqa: N802
        """The status now and at every change (the health protocol's stream)."""
        from grpc_health.v1 import health_pb2

        unknown = request.service not in HEALTH_SERVICES
        last = None
        while True:
            status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if not unknown:
                status = self._health_status()
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            await asyncio.sleep(poll_period(self.cfg))

    def _health_status(self) -> int:
        from grpc_health.v1 import health_pb2

        response = health_pb2.HealthCheckResponse
        return response.SERVING if self.serving() else response.NOT_SERVING

    def serving(self) -> bool:
        """Ready for requests: a target replica and, with a draft pool, a draft replica have
        loaded their models and are alive (registered and heart-beating; a replica that dies
        leaves the registry within workers.registry_ttl_s)."""
        drafts, targets = self._workers
        return bool(targets) and (bool(drafts) or not self.cfg.draft.replicas)

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
            # every configured replica is up (what `specdec up` waits for) ...
            "ready": len(targets) >= self.cfg.target.replicas
            and len(drafts) >= self.cfg.draft.replicas,
            # ... and at least one of each pool is (what /ready and grpc.health.v1 answer)
            "serving": self.serving(),
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


def _metadata(grpc_context) -> list[tuple[str, str]]:
    return list(grpc_context.invocation_metadata()) if grpc_context is not None else []


def make_router(
    cfg: ClusterConfig, targets: DeploymentHandle | None, recorder: RequestRecorder | None = None
):
    """The ingress side of one ingress replica: it forwards requests to the target replicas'
    schedulers through the target deployment's handle (Serve routes by load)."""
    from cluster.routing.config import RouterConfig
    from cluster.routing.forwarding import ForwardingRouter

    if targets is None:
        raise ValueError("the ingress needs the target deployment's handle")
    handle = targets.options(stream=True)

    def submit(request: bytes, every: int):
        return handle.generate.remote(request, every)

    return ForwardingRouter(RouterConfig.from_cluster_config(cfg), submit, recorder=recorder)
