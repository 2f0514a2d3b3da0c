"""The public SpecDecode gRPC service over anything with the router's face (`generate`,
`generate_stream`): a `cluster.routing.router.Router`, or the Serve ingress's forwarding router.

Any grpc.aio server can register it (`add_SpecDecodeServicer_to_server(SpecDecodeServicer(router),
srv)`); `cluster.routing.grpc_server` runs it as a standalone process, and Serve's gRPC proxy
registers the same function for the ingress (`grpc_servicer_functions`).

Request bytes that do not parse as a `GenerateRequest` are the client's mistake, not ours: the
registration here (the generated one's, with our own deserializer) hands the handler an
`UnparsableRequest` instead of failing inside gRPC (UNKNOWN / INTERNAL), and the handler answers
INVALID_ARGUMENT naming `request` (`parsed`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as aio_health

from cluster.api.auth import APIKeys, check_metadata, key_in_flight
from cluster.api.validation import RequestError
from protos import specdec_pb2, specdec_pb2_grpc

SERVICE = specdec_pb2.DESCRIPTOR.services_by_name["SpecDecode"].full_name


@dataclass(frozen=True, slots=True)
class UnparsableRequest:
    """What the handler gets for bytes that are no GenerateRequest (picklable: Serve's proxy
    sends it on to the ingress replica)."""

    size: int


def parse_request(data: bytes) -> specdec_pb2.GenerateRequest | UnparsableRequest:
    try:
        return specdec_pb2.GenerateRequest.FromString(data)
    except Exception:  # noqa: BLE001 - DecodeError, or anything the parser raises on garbage
        return UnparsableRequest(len(data))


def parsed(request: specdec_pb2.GenerateRequest | UnparsableRequest) -> specdec_pb2.GenerateRequest:
    """The request, or RequestError(INVALID_ARGUMENT, "request") for bytes that did not parse."""
    if isinstance(request, UnparsableRequest):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "request",
            f"{request.size} bytes that do not parse as a specdec.v1.GenerateRequest",
        )
    return request


def add_SpecDecodeServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 - gRPC's
    """The generated registration with our request deserializer (see the module's doc)."""
    serialize = specdec_pb2.GenerateResponse.SerializeToString
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=parse_request, response_serializer=serialize
        ),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream,
            request_deserializer=parse_request,
            response_serializer=serialize,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    add_registered = getattr(server, "add_registered_method_handlers", None)
    if add_registered is not None:
        add_registered(SERVICE, handlers)


async def keyed_stream(
    router: GenerateBackend,
    request: specdec_pb2.GenerateRequest | UnparsableRequest,
    metadata: Any,
    keys: APIKeys | None,
) -> AsyncIterator[specdec_pb2.GenerateResponse]:
    """GenerateStream's messages for a call whose metadata carries a key (when keys are set),
    the key counted in flight to the end; a client that leaves closes the router's stream,
    which frees the sequence on the workers. Raises RequestError."""
    key = check_metadata(metadata, keys)
    with key_in_flight(keys, key):
        stream = router.generate_stream(parsed(request))
        try:
            async for msg in stream:
                yield msg
        finally:
            await stream.aclose()


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

    def __init__(self, router: GenerateBackend, api_keys: APIKeys | None = None) -> None:
        self.router = router
        self.api_keys = api_keys  # None: no key required (cluster/api/auth.py)

    async def Generate(
        self, request: specdec_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> specdec_pb2.GenerateResponse:
        try:
            key = check_metadata(context.invocation_metadata(), self.api_keys)
            with key_in_flight(self.api_keys, key):
                return await self.router.generate(parsed(request))
        except RequestError as exc:
            await context.abort(exc.code, exc.details)

    async def GenerateStream(
        self, request: specdec_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[specdec_pb2.GenerateResponse]:
        try:
            metadata = context.invocation_metadata()
            async for msg in keyed_stream(self.router, request, metadata, self.api_keys):
                yield msg
        except RequestError as exc:
            await context.abort(exc.code, exc.details)


async def serve(
    router: GenerateBackend, host: str, port: int, api_keys: APIKeys | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server with the service on host:port (0: any free port); returns it and
    the bound port. Not Ray Serve: the standalone router process runs it."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    add_SpecDecodeServicer_to_server(SpecDecodeServicer(router, api_keys), server)
    # grpc.health.v1: this process starts only once its workers checked out, so it serves.
    health = aio_health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"SpecDecode gRPC server: cannot bind {host}:{port}")
    await server.start()
    for service in ("", SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
