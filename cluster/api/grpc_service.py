"""The public SpecDecode gRPC service over anything with the router's face (`generate`,
`generate_stream`): a `cluster.routing.router.Router`, or the Serve ingress's forwarding router.

Any grpc.aio server can register it
(`specdec_pb2_grpc.add_SpecDecodeServicer_to_server(SpecDecodeServicer(router), srv)`);
`cluster.routing.grpc_server` runs it as a standalone process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from cluster.api.validation import RequestError
from protos import specdec_pb2, specdec_pb2_grpc


class SpecDecodeServicer(specdec_pb2_grpc.SpecDecodeServicer):
    """Maps RequestError to its status code and details; a client that cancels or runs past its
    deadline cancels the handler task, which releases the sequence on the workers."""

    def __init__(self, router) -> None:  # cluster.routing.router.Router
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


async def serve(router, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    specdec_pb2_grpc.add_SpecDecodeServicer_to_server(SpecDecodeServicer(router), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"ingress: cannot bind {host}:{port}")
    await server.start()
    return server, bound
