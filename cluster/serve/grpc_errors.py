"""What a client sees when a request fails inside a Serve handler: a gRPC code and one line.

The router's `RequestError` keeps its own code; deadlines give DEADLINE_EXCEEDED; anything
unexpected INTERNAL with an id that finds the logged exception (no type, trace or address goes to
the client). A handler sets code and details on the context and
then raises: Serve turns that into the status the client sees (a streaming handler that only sets
the code would end with OK and an empty stream; an uncaught exception would leak a Ray traceback
as INTERNAL).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from cluster.api.validation import internal_error


def grpc_status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The code and one-line message a client gets for a failure inside a handler."""
    code = getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):  # the router's RequestError (and its kin)
        return code, str(exc)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    err = internal_error(exc, "specdec")
    return err.code, err.details


class HandlerFailed(Exception):
    """Raised after the gRPC code and details are set, so Serve ends the call with them."""


def handler_failure(grpc_context: Any, exc: BaseException) -> HandlerFailed:
    """Set the code and one bounded line for `exc` on the call; returns the exception to raise."""
    code, details = grpc_status_for(exc)
    details = " ".join(details.split())[:2000]  # one line, bounded
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(details)
    return HandlerFailed(details)
