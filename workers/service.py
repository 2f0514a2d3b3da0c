"""gRPC services of the draft and target workers (protos/worker.proto).

The servicers are thin: they decode a request, hand one `Call` to the worker's executor, and encode
the result. The worker objects are duck-typed (`DraftModel`, `TargetModel`: workers/protocols.py):
the in-process `DraftWorker` / `TargetWorker`, or a tensor-parallel target with the same methods.

Concurrency: gRPC runs each call on a thread of its pool, so many callers are served at once;
the model itself runs one call at a time (`SerialExecutor`: one model thread per worker). Every
model call goes through the executor's single `submit(call) -> Future` point. A batched call
(PrefillBatch, ProposeBatch, VerifyBatch) is one `Call`: one executor job, one batched forward.

Errors, per row of a batched call (in its RowStatus; a row that fails to decode fails alone too):
StaleSequenceError -> FAILED_PRECONDITION (nothing changed), UnknownSequenceError -> NOT_FOUND,
ValueError -> INVALID_ARGUMENT, KVBudgetExceeded -> RESOURCE_EXHAUSTED, anything else -> INTERNAL;
the message goes along. Only the configured "worker is gone" errors (a dead tensor-parallel rank)
fail the whole call, UNAVAILABLE. Release answers with the same codes as its call status. A row's
token ids and lengths are checked by the worker (workers/token_range.py), not here: the
in-process engine calls the same workers without this service.

    server, port = serve_target(TargetWorker.from_path(path), "127.0.0.1", 0)
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc

from protos import worker_pb2, worker_pb2_grpc
from workers.batch import PrefillRow, ProposeRow, VerifyRow
from workers.draft import Proposal
from workers.errors import KVBudgetExceeded, StaleSequenceError, UnknownSequenceError
from workers.leases import OWNER_KEY, LeaseBook
from workers.model_thread import Call, Executor, SerialExecutor
from workers.protocols import DraftModel, TargetModel
from workers.tls import TLSFiles
from workers.types import Verdict
from workers.wire import (
    pack_logprobs,
    pack_q,
    sampling_from_proto,
    tokenizer_fingerprint,
    unpack_q,
)

log = logging.getLogger(__name__)

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a port is one server's: never share it with a stale process
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


# -- error mapping ----------------------------------------------------------------------------


def unavailable_types(extra: tuple[type[BaseException], ...]) -> tuple[type[BaseException], ...]:
    types = list(extra)
    tp = sys.modules.get("workers.tp")  # never imported here: it pulls in ray
    if tp is not None and hasattr(tp, "TensorParallelError"):
        types.append(tp.TensorParallelError)
    return tuple(types)


# The worker's refusals, as status codes (of a row, or of a Release / Stats call).
_REFUSAL_CODES = (
    (StaleSequenceError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnknownSequenceError, grpc.StatusCode.NOT_FOUND),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (KVBudgetExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def _refusal_code(exc: BaseException) -> grpc.StatusCode | None:
    return next((code for types, code in _REFUSAL_CODES if isinstance(exc, types)), None)


def _owner(context: grpc.ServicerContext) -> str | None:
    return next((v for k, v in context.invocation_metadata() or () if k == OWNER_KEY), None)


def _rpc(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self: _ServicerBase, request, context: grpc.ServicerContext):
        if self.leases is not None:
            self.leases.seen(_owner(context))  # every call renews its caller's lease
        try:
            return method(self, request, context)
        except Exception as exc:
            code = _refusal_code(exc)
            if code is not None:
                context.abort(code, str(exc))
            if isinstance(exc, unavailable_types(self.unavailable_errors)):
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.role} worker: {exc}")
            log.exception("%s worker: %s failed", self.role, method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{self.role} worker: {exc!r}")

    return wrapper


# -- servicers --------------------------------------------------------------------------------


def model_info(worker: Any, role: int) -> worker_pb2.ModelInfo:
    """What a worker serves, as the router checks it (role, model, tokenizer, context)."""
    runner = worker.runner
    return worker_pb2.ModelInfo(
        role=role,
        model_path=str(runner.path),
        vocab_size=int(runner.vocab_size),
        max_context=int(runner.max_context),
        eos_token_ids=sorted(int(t) for t in runner.eos_token_ids),
        tokenizer_fingerprint=tokenizer_fingerprint(runner.tokenizer),
    )


def stats_response(worker: Any, info: worker_pb2.ModelInfo) -> worker_pb2.StatsResponse:
    return worker_pb2.StatsResponse(
        live_sequences=int(worker.live_sequences),
        model=info,
        kv_tokens=int(getattr(worker, "kv_tokens", 0)),
        max_kv_tokens=int(getattr(worker, "max_kv_tokens", None) or 0),
    )


class _ServicerBase:
    role = ""
    role_enum = worker_pb2.ROLE_UNSPECIFIED

    def __init__(
        self,
        worker: Any,
        executor: Executor | None = None,
        unavailable_errors: tuple[type[BaseException], ...] = (),
        lease_timeout_s: float | None = None,
    ) -> None:
        """lease_timeout_s: free the sequences of a caller not heard from this long (None:
        never; workers/leases.py)."""
        self.worker = worker
        self.executor = executor or SerialExecutor(worker)
        self.unavailable_errors = tuple(unavailable_errors)
        self.info = model_info(worker, self.role_enum)
        self.leases = LeaseBook(lease_timeout_s) if lease_timeout_s else None
        self._reaping = threading.Event()
        if self.leases is not None:
            threading.Thread(
                target=self._reap_loop, name=f"{self.role}-leases", daemon=True
            ).start()

    def _reap_loop(self) -> None:
        """Free the sequences of callers whose lease ran out (on the model thread, in order
        with every other call)."""
        period = min(1.0, self.leases.timeout_s / 4)
        while not self._reaping.wait(period):
            for seq in self.leases.expired():
                try:
                    self.executor.submit(Call("release", seq)).result()
                    log.warning("%s worker: freed %s (its caller's lease ran out)", self.role, seq)
                except Exception as exc:  # noqa: BLE001 - a closed executor: the worker stops
                    log.debug("%s worker: lease release of %s failed: %s", self.role, seq, exc)

    def stop_leases(self) -> None:
        self._reaping.set()

    @staticmethod
    def _prefill_row(req) -> PrefillRow:
        params = sampling_from_proto(req.sampling)
        return PrefillRow(
            _seq_id(req),
            list(req.token_ids),
            params,
            features=req.features,
            prompt_len=req.prompt_len if req.HasField("prompt_len") else None,
            fork_of=req.fork_of or None,
        )

    def _batch(self, method: str, rows: Sequence, decode: Callable, encode: Callable, result):
        """One batched call: decode each row (a bad row fails alone), one executor job for the
        rest, then one `result(status=..., result=...)` per row, in order."""
        slots: list[object] = [None] * len(rows)
        good: list[tuple[int, object]] = []
        for i, req in enumerate(rows):
            try:
                good.append((i, decode(req)))
            except Exception as exc:  # noqa: BLE001 - answered in the row's status
                slots[i] = exc
        if good:
            call = Call(method, None, ([row for _, row in good],))
            for (i, _), res in zip(good, self.executor.submit(call).result(), strict=True):
                slots[i] = res
        gone = unavailable_types(self.unavailable_errors)
        out = []
        for req, res in zip(rows, slots, strict=True):
            if isinstance(res, gone):
                raise res  # the worker is gone: the whole call is UNAVAILABLE
            if isinstance(res, BaseException):
                out.append(result(status=self._row_status(method, res)))
            else:
                out.append(result(status=worker_pb2.RowStatus(code=0), result=encode(req, res)))
        return out

    def _row_status(self, method: str, exc: BaseException) -> worker_pb2.RowStatus:
        code = _refusal_code(exc)
        if code is not None:
            return worker_pb2.RowStatus(code=code.value[0], message=str(exc))
        log.error("%s worker: a %s row failed: %r", self.role, method, exc)
        code = grpc.StatusCode.INTERNAL.value[0]
        return worker_pb2.RowStatus(code=code, message=f"{self.role} worker: {exc!r}")

    @_rpc
    def PrefillBatch(self, request, context):
        rows = self._batch(
            "prefill_batch",
            request.rows,
            self._prefill_row,
            _prefilled,
            worker_pb2.PrefillResult,
        )
        if self.leases is not None:
            held = [
                r.seq_id for r, out in zip(request.rows, rows, strict=True) if not out.status.code
            ]
            self.leases.own(_owner(context), held)
        return worker_pb2.PrefillBatchResponse(rows=rows)

    @_rpc
    def Release(self, request, context):
        seq_id = _seq_id(request)
        released = self.executor.submit(Call("release", seq_id)).result()
        if self.leases is not None:
            self.leases.released(seq_id)
        return worker_pb2.ReleaseResponse(released=bool(released))

    @_rpc
    def Stats(self, request, context):
        return stats_response(self.worker, self.info)


class DraftServicer(_ServicerBase, worker_pb2_grpc.DraftWorkerServicer):
    role = "draft"
    role_enum = worker_pb2.ROLE_DRAFT

    @staticmethod
    def _propose_row(req) -> ProposeRow:
        start = req.start if req.HasField("start") else None
        return ProposeRow(
            _seq_id(req),
            req.committed_len,
            req.k,
            tuple(req.commit),
            start,
            commit_features=req.commit_features,
        )

    @staticmethod
    def _proposal(req, proposal: Proposal) -> worker_pb2.ProposeResponse:
        return worker_pb2.ProposeResponse(
            start=proposal.start,
            tokens=proposal.tokens,
            q=pack_q(proposal.q),
            committed_len=req.committed_len + len(req.commit),
            unsure_last=proposal.unsure_last,
        )

    @_rpc
    def ProposeBatch(self, request, context):
        rows = self._batch(
            "propose_batch",
            request.rows,
            self._propose_row,
            self._proposal,
            worker_pb2.ProposeResult,
        )
        return worker_pb2.ProposeBatchResponse(rows=rows)


class TargetServicer(_ServicerBase, worker_pb2_grpc.TargetWorkerServicer):
    role = "target"
    role_enum = worker_pb2.ROLE_TARGET

    @staticmethod
    def _verify_row(req) -> VerifyRow:
        return VerifyRow(
            _seq_id(req),
            req.committed_len,
            list(req.draft_tokens),
            unpack_q(req.q),
            one_hot=req.one_hot,
            features=req.features,
        )

    @staticmethod
    def _verdict(req, verdict: Verdict) -> worker_pb2.VerifyResponse:
        return worker_pb2.VerifyResponse(
            accepted=verdict.accepted,
            token=verdict.token,
            bonus=verdict.bonus,
            committed_len=req.committed_len + verdict.accepted + 1,
            features=verdict.features,
            logprobs=pack_logprobs(verdict.logprobs),
            forced=verdict.forced,
        )

    @_rpc
    def VerifyBatch(self, request, context):
        rows = self._batch(
            "verify_batch", request.rows, self._verify_row, self._verdict, worker_pb2.VerifyResult
        )
        return worker_pb2.VerifyBatchResponse(rows=rows)


def _prefilled(req, token: int | None) -> worker_pb2.PrefillResponse:
    """A prefilled row: the target's answer carries its next token, the draft's none."""
    if token is None:
        return worker_pb2.PrefillResponse(committed_len=len(req.token_ids))
    return worker_pb2.PrefillResponse(
        committed_len=len(req.token_ids) + 1,
        token=int(token),
        features=getattr(token, "features", b""),  # a PrefillToken's, when asked
        logprobs=pack_logprobs(getattr(token, "logprobs", ())),
        prompt_logprobs=pack_logprobs(getattr(token, "prompt_logprobs", ())),
        forced=getattr(token, "forced", ()),
    )


def _seq_id(req) -> str:
    if not req.seq_id:
        raise ValueError("seq_id: must not be empty")
    return req.seq_id


# -- servers ----------------------------------------------------------------------------------


def _serve(
    add: Callable, servicer: Any, host: str, port: int, max_workers: int, tls: TLSFiles | None
):
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=servicer.role),
        options=SERVER_OPTIONS,
    )
    add(servicer, server)
    if tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:  # mutual TLS: a caller without a certificate from the cluster's CA is refused
        bound = server.add_secure_port(f"{host}:{port}", tls.server_credentials())
    if bound == 0:
        raise OSError(f"{servicer.role} worker: cannot bind {host}:{port}")
    server.start()
    return server, bound


def serve_draft(
    worker: DraftModel,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_workers: int = 16,
    executor: Executor | None = None,
    lease_timeout_s: float | None = None,
    tls: TLSFiles | None = None,
    threads: int | None = None,
) -> tuple[grpc.Server, int]:
    """Start a DraftWorker gRPC server (port 0 picks a free one); returns (server, bound port).
    `tls`: mutual TLS (workers/tls.py) instead of plaintext; `threads`: the model thread's."""
    executor = executor or SerialExecutor(worker, threads)
    servicer = DraftServicer(worker, executor, lease_timeout_s=lease_timeout_s)
    return _serve(
        worker_pb2_grpc.add_DraftWorkerServicer_to_server, servicer, host, port, max_workers, tls
    )


def serve_target(
    worker: TargetModel,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_workers: int = 16,
    executor: Executor | None = None,
    unavailable_errors: tuple[type[BaseException], ...] = (),
    lease_timeout_s: float | None = None,
    tls: TLSFiles | None = None,
    threads: int | None = None,
) -> tuple[grpc.Server, int]:
    """Start a TargetWorker gRPC server; returns (server, bound port). `unavailable_errors`: worker
    exceptions that mean "this target is gone" (answered UNAVAILABLE so the router fails over;
    workers.tp.TensorParallelError is always included once that module is loaded)."""
    executor = executor or SerialExecutor(worker, threads)
    servicer = TargetServicer(worker, executor, unavailable_errors, lease_timeout_s)
    return _serve(
        worker_pb2_grpc.add_TargetWorkerServicer_to_server, servicer, host, port, max_workers, tls
    )
