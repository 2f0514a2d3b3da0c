"""The target worker that this process also serves over gRPC, called without the RPC.

A target replica (cluster/serve/worker_deployments.py) runs its own step scheduler beside the
worker it serves. Over loopback gRPC every step crossed five threads and two protobuf encodings
each way (the scheduler, a call thread, grpc's poller, a server thread, the model thread), on
cores the forward needs: one stream ran 55 ms a token through the cluster where the same forward
alone takes 46. `ServedTarget` hands the scheduler's batched calls straight to the worker's own
model thread (`workers.service.SerialExecutor`, the one the gRPC servicer uses too, so remote
callers and the scheduler still never run the model at once) and answers with the same per-row
slots as `GrpcTarget`: a Verdict, a next token, or the row's own exception.

    executor = SerialExecutor(worker)
    server, port = serve_target(worker, host, 0, executor=executor)
    router = Router(cfg, targets=[address], local_targets={address: ServedTarget.factory(
        address, worker, executor)})
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import grpc

from cluster.transport.pools import OnUnavailable
from cluster.transport.remote_errors import RemoteUnavailable
from protos import worker_pb2
from workers.batch import PrefillRow, VerifyRow
from workers.model_thread import Call, Executor
from workers.service import model_info, stats_response, unavailable_types


class ServedTarget:
    """`BatchTarget` over a target worker served by this process (see the module's text)."""

    def __init__(
        self,
        address: str,
        worker: Any,
        executor: Executor,
        *,
        on_unavailable: OnUnavailable | None = None,
        unavailable_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.address = address
        self.worker = worker
        self.executor = executor
        self.on_unavailable = on_unavailable
        self.unavailable_errors = unavailable_errors
        self.info = model_info(worker, worker_pb2.ROLE_TARGET)
        self._closed = False

    @classmethod
    def factory(
        cls, address: str, worker: Any, executor: Executor, **kw: Any
    ) -> Callable[[OnUnavailable], ServedTarget]:
        """What `WorkerPool(local=...)` takes: a side for `address`, given the pool's mark_down."""
        return lambda on_unavailable: cls(
            address, worker, executor, on_unavailable=on_unavailable, **kw
        )

    def _batched(self, method: str, rows: Sequence[Any]) -> Future:
        """One executor job; its future gives the worker's per-row slots, or raises
        RemoteUnavailable where the worker is gone (a dead tensor-parallel rank), as the gRPC
        transport does for an UNAVAILABLE call."""
        out: Future = Future()
        try:
            if self._closed:
                raise RuntimeError("closed")
            job = self.executor.submit(Call(method, None, (list(rows),)))
        except RuntimeError as exc:  # closed, or the replica shut its model thread down
            out.set_exception(self._gone(exc))
            return out
        gone = unavailable_types(self.unavailable_errors)

        def done(f: Future) -> None:
            try:
                slots = f.result()
            except BaseException as exc:  # noqa: BLE001 - the whole call failed
                out.set_exception(self._gone(exc) if isinstance(exc, gone) else exc)
                return
            lost = next((s for s in slots if isinstance(s, gone)), None)
            if lost is not None:
                out.set_exception(self._gone(lost))
            else:
                out.set_result(slots)

        job.add_done_callback(done)
        return out

    def _gone(self, exc: BaseException) -> RemoteUnavailable:
        err = RemoteUnavailable(self.address, grpc.StatusCode.UNAVAILABLE, f"target worker: {exc}")
        if self.on_unavailable is not None:
            self.on_unavailable(self.address, err)
        return err

    def prefill_batch(self, rows: Sequence[PrefillRow]) -> Future:
        return self._batched("prefill_batch", rows)

    def verify_batch(self, rows: Sequence[VerifyRow]) -> Future:
        return self._batched("verify_batch", rows)

    def release(self, seq_id: str) -> None:
        self.executor.submit(Call("release", seq_id)).result()

    def stats(self, timeout_s: float | None = None) -> worker_pb2.StatsResponse:
        return stats_response(self.worker, self.info)

    def close(self) -> None:
        self._closed = True  # the worker and its thread belong to the replica, not to us
