"""What a client sees when a request fails inside a Serve handler: a gRPC code and one line.

The router's `RequestError` keeps its own code; deadlines give DEADLINE_EXCEEDED; anything
unexpected INTERNAL with its type and message. A handler sets code and details on the context and
then raises: Serve turns that into the status the client sees (a streaming handler that only sets
the code would end with OK and an empty stream; an uncaught exception would leak a Ray traceback
as INTERNAL).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

log = logging.getLogger("ray.serve")


def grpc_status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The code and one-line message a client gets for a failure inside a handler."""
    code = getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):  # the router's RequestError (and its kin)
        return code, str(exc)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded: {exc}".rstrip(": ")
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


class HandlerFailed(Exception):
    """Raised after the gRPC code and details are set, so Serve ends the call with them."""


def handler_failure(grpc_context: Any, exc: BaseException) -> HandlerFailed:
    """Set the code and one bounded line for `exc` on the call; returns the exception to raise."""
    code, details = grpc_status_for(exc)
    details = " ".join(details.split())[:2000]  # one line, bounded
    if code == grpc.StatusCode.INTERNAL:
        log.error("specdec ingress: request failed", exc_info=exc)
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(details)
    return HandlerFailed(details)
