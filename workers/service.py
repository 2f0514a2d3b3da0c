"""gRPC services of the draft and target workers (protos/worker.proto).

The servicers are thin: they decode a request, hand one `Call` to the worker's executor, and encode
the result. The worker objects are duck-typed (`DraftModel`, `TargetModel` below): the in-process
`DraftWorker` / `TargetWorker`, or a tensor-parallel target with the same methods.

Concurrency: gRPC runs each call on a thread of its pool, so many sequences are served at once;
the model itself runs one call at a time (`SerialExecutor`: one model thread per worker). Every
model call goes through the executor's single `submit(call) -> Future` point, so a batcher that
holds the verify / plain-step calls of several sequences for a moment and runs them as one forward
can replace `SerialExecutor` without touching the servicers.

Errors: StaleSequenceError -> FAILED_PRECONDITION (nothing changed), UnknownSequenceError ->
NOT_FOUND, ValueError -> INVALID_ARGUMENT, the configured "worker is gone" errors (a dead
tensor-parallel rank) -> UNAVAILABLE, anything else -> INTERNAL. Details carry the message.

    server, port = serve_target(TargetWorker.from_path(path), "127.0.0.1", 0)
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from protos import worker_pb2, worker_pb2_grpc
from workers.draft import Proposal
from workers.errors import StaleSequenceError, UnknownSequenceError
from workers.sampling import SamplingParams
from workers.verification import SparseQ, Verdict
from workers.wire import pack_q, sampling_from_proto, tokenizer_fingerprint, unpack_q

log = logging.getLogger(__name__)

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a port is one server's: never share it with a stale process
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


# -- what the services need from a worker -----------------------------------------------------


class RunnerInfo(Protocol):
    """Read from `worker.runner` for Stats and request checks."""

    path: str
    vocab_size: int
    max_context: int
    eos_token_ids: set[int]
    tokenizer: Any  # a PreTrainedTokenizerBase (its fingerprint goes out in Stats)


class DraftModel(Protocol):
    runner: RunnerInfo

    @property
    def live_sequences(self) -> int: ...

    def prefill(self, seq_id: str, token_ids: list[int], params: SamplingParams) -> None: ...

    def propose(
        self,
        seq_id: str,
        committed_len: int,
        k: int,
        commit: Sequence[int] = (),
        start: int | None = None,
    ) -> Proposal: ...

    def commit(self, seq_id: str, committed_len: int, new_tokens: list[int]) -> int: ...

    def release(self, seq_id: str) -> bool: ...


class TargetModel(Protocol):
    runner: RunnerInfo

    @property
    def live_sequences(self) -> int: ...

    def prefill(self, seq_id: str, token_ids: list[int], params: SamplingParams) -> None: ...

    def verify(
        self, seq_id: str, committed_len: int, draft_tokens: list[int], q: SparseQ | None = None
    ) -> Verdict: ...

    def plain_step(self, seq_id: str, committed_len: int) -> int: ...

    def release(self, seq_id: str) -> bool: ...


# -- the single entry point for model work ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """One worker method call: `getattr(worker, method)(seq_id, *args)`.

    Methods: prefill, propose, commit, release (draft); prefill, verify, plain_step, release
    (target). A batcher looks at `method` and `args` (verify: committed_len, draft_tokens, q;
    plain_step: committed_len) to group calls of different sequences into one forward.
    """

    method: str
    seq_id: str
    args: tuple = ()


class Executor(Protocol):
    def submit(self, call: Call) -> Future: ...


class SerialExecutor:
    """Runs the worker's calls one at a time on one dedicated thread.

    One thread, not a lock taken in each gRPC handler thread: torch's OpenMP runtime keeps a team
    of threads per calling thread, so model calls from many handler threads would leave several
    teams competing for the cores (measured here: a target pass twice as slow).
    """

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def submit(self, call: Call) -> Future:
        return self._thread.submit(getattr(self.worker, call.method), call.seq_id, *call.args)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


# -- error mapping ----------------------------------------------------------------------------


def _unavailable_types(extra: tuple[type[BaseException], ...]) -> tuple[type[BaseException], ...]:
    types = list(extra)
    tp = sys.modules.get("workers.tp")  # never imported here: it pulls in ray
    if tp is not None and hasattr(tp, "TensorParallelError"):
        types.append(tp.TensorParallelError)
    return tuple(types)


def _rpc(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self: _ServicerBase, request, context: grpc.ServicerContext):
        try:
            return method(self, request, context)
        except StaleSequenceError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except UnknownSequenceError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:
            if isinstance(exc, _unavailable_types(self.unavailable_errors)):
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.role} worker: {exc}")
            log.exception("%s worker: %s failed", self.role, method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{self.role} worker: {exc!r}")

    return wrapper


# -- servicers --------------------------------------------------------------------------------


class _ServicerBase:
    role = ""
    role_enum = worker_pb2.ROLE_UNSPECIFIED

    def __init__(
        self,
        worker: Any,
        executor: Executor | None = None,
        unavailable_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.worker = worker
        self.executor = executor or SerialExecutor(worker)
        self.unavailable_errors = tuple(unavailable_errors)
        runner = worker.runner
        self.vocab_size = int(runner.vocab_size)
        self.info = worker_pb2.ModelInfo(
            role=self.role_enum,
            model_path=str(runner.path),
            vocab_size=self.vocab_size,
            max_context=int(runner.max_context),
            eos_token_ids=sorted(int(t) for t in runner.eos_token_ids),
            tokenizer_fingerprint=tokenizer_fingerprint(runner.tokenizer),
        )

    def _call(self, method: str, seq_id: str, *args) -> Any:
        if not seq_id:
            raise ValueError("seq_id: must not be empty")
        return self.executor.submit(Call(method, seq_id, args)).result()

    def _tokens(self, field: str, tokens: Sequence[int]) -> list[int]:
        out = list(tokens)
        bad = [t for t in out if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{field}: token id {bad[0]} outside [0, {self.vocab_size})")
        return out

    @_rpc
    def Prefill(self, request, context):
        tokens = self._tokens("token_ids", request.token_ids)
        params = sampling_from_proto(request.sampling)
        self._call("prefill", request.seq_id, tokens, params)
        return worker_pb2.PrefillResponse(committed_len=len(tokens))

    @_rpc
    def Release(self, request, context):
        released = self._call("release", request.seq_id)
        return worker_pb2.ReleaseResponse(released=bool(released))

    @_rpc
    def Stats(self, request, context):
        return worker_pb2.StatsResponse(
            live_sequences=int(self.worker.live_sequences), model=self.info
        )


class DraftServicer(_ServicerBase, worker_pb2_grpc.DraftWorkerServicer):
    role = "draft"
    role_enum = worker_pb2.ROLE_DRAFT

    @_rpc
    def Propose(self, request, context):
        commit = self._tokens("commit", request.commit)
        start = request.start if request.HasField("start") else None
        proposal: Proposal = self._call(
            "propose", request.seq_id, request.committed_len, request.k, commit, start
        )
        return worker_pb2.ProposeResponse(
            start=proposal.start,
            tokens=proposal.tokens,
            q=pack_q(proposal.q),
            committed_len=request.committed_len + len(commit),
        )

    @_rpc
    def Commit(self, request, context):
        tokens = self._tokens("new_tokens", request.new_tokens)
        new_len = self._call("commit", request.seq_id, request.committed_len, tokens)
        return worker_pb2.CommitResponse(committed_len=new_len)


class TargetServicer(_ServicerBase, worker_pb2_grpc.TargetWorkerServicer):
    role = "target"
    role_enum = worker_pb2.ROLE_TARGET

    @_rpc
    def Verify(self, request, context):
        tokens = self._tokens("draft_tokens", request.draft_tokens)
        q = unpack_q(request.q)
        if q is not None and (
            q.indices.shape[0] != len(tokens) or int(q.indices.max()) >= self.vocab_size
        ):
            raise ValueError("q: needs one row per draft token, with indices inside the vocabulary")
        verdict: Verdict = self._call("verify", request.seq_id, request.committed_len, tokens, q)
        return worker_pb2.VerifyResponse(
            accepted=verdict.accepted,
            token=verdict.token,
            bonus=verdict.bonus,
            committed_len=request.committed_len + verdict.accepted + 1,
        )

    @_rpc
    def PlainStep(self, request, context):
        token = self._call("plain_step", request.seq_id, request.committed_len)
        return worker_pb2.PlainStepResponse(token=token, committed_len=request.committed_len + 1)


# -- servers ----------------------------------------------------------------------------------


def _serve(add: Callable, servicer: Any, host: str, port: int, max_workers: int):
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=servicer.role),
        options=SERVER_OPTIONS,
    )
    add(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
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
) -> tuple[grpc.Server, int]:
    """Start a DraftWorker gRPC server (port 0 picks a free one); returns (server, bound port)."""
    servicer = DraftServicer(worker, executor)
    return _serve(
        worker_pb2_grpc.add_DraftWorkerServicer_to_server, servicer, host, port, max_workers
    )


def serve_target(
    worker: TargetModel,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_workers: int = 16,
    executor: Executor | None = None,
    unavailable_errors: tuple[type[BaseException], ...] = (),
) -> tuple[grpc.Server, int]:
    """Start a TargetWorker gRPC server; returns (server, bound port). `unavailable_errors`: worker
    exceptions that mean "this target is gone" (answered UNAVAILABLE so the router fails over;
    workers.tp.TensorParallelError is always included once that module is loaded)."""
    servicer = TargetServicer(worker, executor, unavailable_errors)
    return _serve(
        worker_pb2_grpc.add_TargetWorkerServicer_to_server, servicer, host, port, max_workers
    )
