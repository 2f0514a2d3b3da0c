"""Remote workers: the scheduler's BatchDraft / BatchTarget over gRPC.

`GrpcDraft` / `GrpcTarget` send each batched call as one RPC and hand the scheduler a
`concurrent.futures.Future` of the same per-row slots the in-process worker returns (a `Proposal`,
a `Verdict`, None for a prefill, or the row's error); what a failed call or row means is in
cluster/transport/remote_errors.py (gone: rows go plain or to another target; busy: the target's
call is tried again).

The pools of worker addresses that the router uses are in cluster/transport/pools.py.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import grpc

from cluster.transport.remote_errors import (
    RemoteUnavailable,
    RemoteWorkerError,
    map_rpc_error,
    row_result,
    takes_down,
)
from protos import worker_pb2, worker_pb2_grpc
from workers.batch import PrefillRow, PrefillToken, ProposeRow, VerifyRow
from workers.draft import Proposal
from workers.leases import OWNER_KEY
from workers.tls import TLSFiles
from workers.types import Verdict
from workers.wire import pack_q, sampling_to_proto, unpack_logprobs, unpack_q

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),  # workers are on the cluster network, never behind a proxy
    ("grpc.initial_reconnect_backoff_ms", 100),  # a restarted worker is seen again quickly
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


def prefill_request(row: PrefillRow) -> worker_pb2.PrefillRequest:
    req = worker_pb2.PrefillRequest(
        seq_id=row.seq_id,
        token_ids=list(row.token_ids),
        sampling=sampling_to_proto(row.params),
        features=row.features,
    )
    if row.prompt_len is not None:
        req.prompt_len = row.prompt_len
    if row.fork_of:
        req.fork_of = row.fork_of
    return req


def propose_request(row: ProposeRow) -> worker_pb2.ProposeRequest:
    req = worker_pb2.ProposeRequest(
        seq_id=row.seq_id,
        committed_len=row.committed_len,
        k=row.k,
        commit=list(row.commit),
        commit_features=row.commit_features,
    )
    if row.start is not None:
        req.start = row.start
    return req


def verify_request(row: VerifyRow) -> worker_pb2.VerifyRequest:
    return worker_pb2.VerifyRequest(
        seq_id=row.seq_id,
        committed_len=row.committed_len,
        draft_tokens=list(row.draft_tokens),
        q=pack_q(row.q),
        one_hot=row.one_hot,
        features=row.features,
    )


def _next_token(resp: worker_pb2.PrefillResponse) -> int | None:
    if not resp.HasField("token"):
        return None
    # What the row asked for rides on the token: the prompt's features, its log-probability.
    return PrefillToken.of(
        resp.token,
        resp.features,
        unpack_logprobs(resp.logprobs),
        unpack_logprobs(resp.prompt_logprobs),
        tuple(resp.forced),
    )


# This process's name on the workers: every call carries it, so a worker knows whose sequences
# it holds and frees them when this process stops calling (workers/leases.py).
OWNER = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready")
    ),
    grpc.ClientCallDetails,
):
    pass


class _OwnerInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Adds `specdec-owner: OWNER` to every call on the channel."""

    def intercept_unary_unary(self, continuation, details, request):
        metadata = [*(details.metadata or ()), (OWNER_KEY, OWNER)]
        return continuation(
            _CallDetails(
                details.method,
                details.timeout,
                metadata,
                details.credentials,
                getattr(details, "wait_for_ready", None),
            ),
            request,
        )


_TLS: TLSFiles | None = None  # this process's worker channels use mutual TLS when set


def configure_tls(files: TLSFiles | None) -> None:
    """Mutual TLS (workers/tls.py) on every worker channel this process opens from now on."""
    global _TLS
    _TLS = files


def open_channel(address: str) -> grpc.Channel:
    if _TLS is None:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    else:
        options = CHANNEL_OPTIONS + _TLS.channel_options()
        channel = grpc.secure_channel(address, _TLS.channel_credentials(), options=options)
    return grpc.intercept_channel(channel, _OwnerInterceptor())


class LeaseRenewal:
    """One thread per process: every `period_s`, a Stats call to each open worker side, so the
    workers keep this process's sequences while it is alive but idle (any other call renews
    too). The period must be well under the workers' lease timeout."""

    period_s = 5.0
    _sides: weakref.WeakSet = weakref.WeakSet()
    _thread: threading.Thread | None = None
    _lock = threading.Lock()
    _wake = threading.Event()  # a new period applies at once, not after the current wait

    @classmethod
    def add(cls, side: _Remote) -> None:
        with cls._lock:
            cls._sides.add(side)
            if cls._thread is None:
                cls._thread = threading.Thread(target=cls._loop, name="lease-renewal", daemon=True)
                cls._thread.start()

    @classmethod
    def set_period(cls, period_s: float) -> None:
        if not period_s > 0:
            raise ValueError(f"lease renewal period must be > 0, got {period_s}")
        cls.period_s = float(period_s)
        cls._wake.set()

    @classmethod
    def _loop(cls) -> None:
        while True:
            cls._wake.wait(cls.period_s)
            cls._wake.clear()
            for side in list(cls._sides):
                if side.closed:
                    continue
                try:
                    side.stats(timeout_s=min(2.0, cls.period_s))
                except Exception:  # noqa: BLE001 - a worker that is gone: its pool notices
                    pass


class _Remote:
    """Shared by both sides: one channel, deadlines, the future adaptor, prefill and release."""

    def __init__(
        self,
        address: str,
        stub: Any,
        channel: grpc.Channel,
        timeout_s: float,
        on_unavailable: Callable[[str, Exception], None] | None,
    ) -> None:
        self.address = address
        self.stub = stub
        self.channel = channel
        self.timeout_s = timeout_s
        self.release_timeout_s = min(2.0, timeout_s)
        self.on_unavailable = on_unavailable
        self._calls = ThreadPoolExecutor(4, thread_name_prefix=f"grpc-{address}")
        # Releases in flight by seq_id: a later prefill of the same id waits for its release
        # (on a call thread), so a release sent without waiting never overtakes it.
        self._releasing: dict[str, Future] = {}
        self._releasing_lock = threading.Lock()
        self.closed = False
        LeaseRenewal.add(self)

    def _future(self, method: Any, request: Any, convert: Callable[[Any], Any]) -> Future:
        """`method(request)` on this remote's call threads, as a Future of `convert(response)`.

        Not `method.future()`: grpcio's sync channel starts a new polling thread for a future
        call whenever none is in flight, which the scheduler's one-call-at-a-time steps hit on
        every step (a thread start each, milliseconds on a busy box). A blocking call on a
        long-lived thread polls in that thread."""

        def call() -> Any:
            try:
                response = method(request, timeout=self.timeout_s)
            except grpc.RpcError as exc:
                raise self._failed(map_rpc_error(exc, self.address)) from None
            except ValueError as exc:  # e.g. a closed channel
                raise self._failed(RemoteUnavailable(self.address, None, repr(exc))) from None
            return convert(response)

        try:
            return self._calls.submit(call)
        except RuntimeError as exc:  # closed
            out: Future = Future()
            out.set_exception(self._failed(RemoteUnavailable(self.address, None, repr(exc))))
            return out

    def close(self) -> None:
        """Close the channel (calls in flight fail) and let the call threads go; releases in
        flight get their deadline to finish first."""
        with self._releasing_lock:
            releasing = list(self._releasing.values())
        wait(releasing, timeout=self.release_timeout_s)
        self.closed = True
        self.channel.close()
        self._calls.shutdown(wait=False)

    def _failed(self, err: Exception) -> Exception:
        if takes_down(err) and self.on_unavailable is not None:
            try:
                self.on_unavailable(self.address, err)
            except Exception:  # noqa: BLE001 - bookkeeping must not hide the error
                log.exception("on_unavailable callback failed")
        return err

    def _rows(self, response: Any, n: int, value: Callable[[Any], Any]) -> list[object]:
        """The per-row slots of a batched response (one per request row, in order)."""
        if len(response.rows) != n:
            raise RemoteWorkerError(
                self.address,
                grpc.StatusCode.INTERNAL,
                f"{len(response.rows)} results for {n} rows",
            )
        return [
            row_result(r.status, lambda r=r: value(r.result), self.address) for r in response.rows
        ]

    def prefill_batch(self, rows: Sequence[PrefillRow]) -> Future:
        """Future of one slot per row: the target's next token (None from a draft), or the row's
        error (ValueError, KVBudgetExceeded); the future itself raises RemoteUnavailable when
        the worker is gone."""
        req = worker_pb2.PrefillBatchRequest(rows=[prefill_request(r) for r in rows])
        with self._releasing_lock:
            before = [f for r in rows if (f := self._releasing.get(r.seq_id)) is not None]
        method = self.stub.PrefillBatch
        if before:  # their releases go first (they are short: a deadline of release_timeout_s)

            def method(request, timeout, _prefill=method):
                wait(before, timeout=self.release_timeout_s)
                return _prefill(request, timeout=timeout)

        return self._future(method, req, lambda resp: self._rows(resp, len(rows), _next_token))

    def release(self, seq_id: str) -> Future:
        """Drop the sequence on the worker, without waiting: the scheduler's thread never
        stalls on a worker that is gone (a lost release is harmless: the worker's lease frees
        what its caller stopped renewing). Unknown ids are fine. The future is done when the
        worker answered or the call gave up (it never raises)."""
        req = worker_pb2.ReleaseRequest(seq_id=seq_id)

        def call() -> None:
            try:
                self.stub.Release(req, timeout=self.release_timeout_s)
            except (grpc.RpcError, ValueError) as exc:  # gone, or a closed channel
                log.debug("release of %s on %s failed: %s", seq_id, self.address, exc)

        try:
            done = self._calls.submit(call)
        except RuntimeError:  # closed: the lease frees it
            done = Future()
            done.set_result(None)
            return done
        with self._releasing_lock:
            self._releasing[seq_id] = done
        done.add_done_callback(lambda f: self._released(seq_id, f))
        return done

    def _released(self, seq_id: str, done: Future) -> None:
        with self._releasing_lock:
            if self._releasing.get(seq_id) is done:
                del self._releasing[seq_id]

    def stats(self, timeout_s: float | None = None) -> worker_pb2.StatsResponse:
        try:
            return self.stub.Stats(worker_pb2.StatsRequest(), timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, self.address) from None


class GrpcDraft(_Remote):
    """`BatchDraft` over a DraftWorker gRPC server."""

    def __init__(
        self,
        address: str,
        channel: grpc.Channel | None = None,
        *,
        timeout_s: float = 10.0,
        on_unavailable: Callable[[str, Exception], None] | None = None,
    ) -> None:
        channel = channel or open_channel(address)
        stub = worker_pb2_grpc.DraftWorkerStub(channel)
        super().__init__(address, stub, channel, timeout_s, on_unavailable)

    def propose_batch(self, rows: Sequence[ProposeRow]) -> Future:
        """Future of one slot per row: a Proposal, or the row's error (StaleSequenceError,
        UnknownSequenceError, ValueError)."""
        req = worker_pb2.ProposeBatchRequest(rows=[propose_request(r) for r in rows])

        def proposal(r) -> Proposal:
            return Proposal(r.start, list(r.tokens), unpack_q(r.q), r.unsure_last)

        return self._future(
            self.stub.ProposeBatch, req, lambda resp: self._rows(resp, len(rows), proposal)
        )


class GrpcTarget(_Remote):
    """`BatchTarget` over a TargetWorker gRPC server."""

    def __init__(
        self,
        address: str,
        channel: grpc.Channel | None = None,
        *,
        timeout_s: float = 60.0,
        on_unavailable: Callable[[str, Exception], None] | None = None,
    ) -> None:
        channel = channel or open_channel(address)
        stub = worker_pb2_grpc.TargetWorkerStub(channel)
        super().__init__(address, stub, channel, timeout_s, on_unavailable)

    def verify_batch(self, rows: Sequence[VerifyRow]) -> Future:
        """Future of one slot per row: a Verdict (a plain row: accepted 0, the next token), or
        the row's error (StaleSequenceError, UnknownSequenceError, ValueError)."""
        req = worker_pb2.VerifyBatchRequest(rows=[verify_request(r) for r in rows])

        def verdict(r) -> Verdict:
            return Verdict(
                r.accepted,
                r.token,
                bonus=r.bonus,
                features=r.features,
                logprobs=unpack_logprobs(r.logprobs),
                forced=tuple(r.forced),
            )

        return self._future(
            self.stub.VerifyBatch, req, lambda resp: self._rows(resp, len(rows), verdict)
        )
