"""The public SpecDecode gRPC service over anything with the router's face (`generate`,
`generate_stream`): a `cluster.routing.router.Router`, or the Serve ingress's forwarding router.

Any grpc.aio server can register it
(`specdec_pb2_grpc.add_SpecDecodeServicer_to_server(SpecDecodeServicer(router), srv)`);
`cluster.routing.grpc_server` runs it as a standalone process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as aio_health

from cluster.api.validation import RequestError
from protos import specdec_pb2, specdec_pb2_grpc


class GenerateBackend(Protocol):
    """The router's face, all the service calls: a `cluster.routing.router.Router` or the Serve
    ingress's `cluster.routing.forwarding.ForwardingRouter` (this room may not import them)."""

    async def generate(
        self, request: specdec_pb2.GenerateRequest
    ) -> specdec_pb2.GenerateResponse: ...

    def generate_stream(
        self, request: specdec_pb2.GenerateRequest
    ) -> AsyncIterator[specdec_pb2.GenerateResponse]: ...


class SpecDecodeServicer(specdec_pb2_grpc.SpecDecodeServicer):
    """Maps RequestError to its status code and details; a client that cancels or runs past its
    deadline cancels the handler task, which releases the sequence on the workers."""

    def __init__(self, router: GenerateBackend) -> None:
        self.router = router

    async def Generate(
        self, request: specdec_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> specdec_pb2.GenerateResponse:
        try:
            return await self.router.generate(request)
        except RequestError as exc:
            await context.abort(exc.code, exc.details)

    async def GenerateStream(
        self, request: specdec_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[specdec_pb2.GenerateResponse]:
        stream = self.router.generate_stream(request)
        try:
            async for msg in stream:
                yield msg
        except RequestError as exc:
            await context.abort(exc.code, exc.details)
        finally:
            await stream.aclose()


async def serve(router: GenerateBackend, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server with the service on host:port (0: any free port); returns it and
    the bound port. Not Ray Serve: the standalone router process runs it."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    specdec_pb2_grpc.add_SpecDecodeServicer_to_server(SpecDecodeServicer(router), server)
    # grpc.health.v1: this process starts only once its workers checked out, so it serves.
    health = aio_health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"SpecDecode gRPC server: cannot bind {host}:{port}")
    await server.start()
    for service in ("", specdec_pb2.DESCRIPTOR.services_by_name["SpecDecode"].full_name):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
