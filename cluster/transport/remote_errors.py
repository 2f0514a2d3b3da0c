"""What a failed gRPC call to a worker means, as the scheduler's exceptions.

A refused row's status becomes the worker's own exception (FAILED_PRECONDITION ->
StaleSequenceError, NOT_FOUND -> UnknownSequenceError, INVALID_ARGUMENT -> ValueError,
RESOURCE_EXHAUSTED -> KVBudgetExceeded). A failed whole call becomes `RemoteUnavailable` (a
`WorkerUnavailable`) where the worker is gone or too slow (UNAVAILABLE, DEADLINE_EXCEEDED,
CANCELLED), `RemoteBusy` (a `WorkerBusy`) where a worker that is there refused it for now
(RESOURCE_EXHAUSTED, ABORTED), or `RemoteWorkerError` (anything else: its own failure).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from cluster.scheduling.worker_api import WorkerBusy, WorkerUnavailable
from protos import worker_pb2
from workers.errors import KVBudgetExceeded, StaleSequenceError, UnknownSequenceError

# Codes that mean "this worker is gone or too slow" rather than "this call was wrong". CANCELLED
# is one: nobody but a stopping server (or our own closed channel) cancels a worker call.
_UNAVAILABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
# Codes of a whole call refused for now by a worker that is there: retried, rows stay put.
_BUSY_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})
# Of those, the ones after which the address leaves the rotation until a recheck.
_DOWN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class RemoteUnavailable(WorkerUnavailable):
    def __init__(self, address: str, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(f"{address}: {code.name if code else 'no call'}: {details}")
        self.address = address
        self.code = code


class RemoteBusy(WorkerBusy):
    def __init__(self, address: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{address}: {code.name}: {details}")
        self.address = address
        self.code = code


class RemoteWorkerError(RuntimeError):
    """The worker failed the call in a way that is neither a refusal nor unavailability."""

    def __init__(self, address: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{address}: {code.name}: {details}")
        self.address = address
        self.code = code


def map_rpc_error(exc: grpc.RpcError, address: str) -> Exception:
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return StaleSequenceError(f"{address}: {details}")
    if code is grpc.StatusCode.NOT_FOUND:
        return UnknownSequenceError(f"{address}: {details}")
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(details)
    if code is None or code in _UNAVAILABLE_CODES:
        return RemoteUnavailable(address, code, details)
    if code in _BUSY_CODES:
        return RemoteBusy(address, code, details)
    return RemoteWorkerError(address, code, details)


# Row status codes of the batched RPCs -> the worker's own exceptions (one row, not the worker).
_ROW_ERRORS: dict[grpc.StatusCode, Callable[[str], Exception]] = {
    grpc.StatusCode.FAILED_PRECONDITION: StaleSequenceError,
    grpc.StatusCode.NOT_FOUND: UnknownSequenceError,
    grpc.StatusCode.INVALID_ARGUMENT: ValueError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: KVBudgetExceeded,
}
_CODES = {c.value[0]: c for c in grpc.StatusCode}


def row_result(status: worker_pb2.RowStatus, value: Callable[[], Any], address: str) -> object:
    """One row of a batched answer: `value()` when OK, else the row's exception."""
    if status.code == 0:
        return value()
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    make = _ROW_ERRORS.get(code)
    if make is None:
        return RemoteWorkerError(address, code, status.message)
    return make(f"{address}: {status.message}" if make is not ValueError else status.message)


def takes_down(err: BaseException) -> bool:
    """Whether the error takes its address out of the rotation until a recheck."""
    return isinstance(err, RemoteUnavailable) and (err.code is None or err.code in _DOWN_CODES)
