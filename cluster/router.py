"""The router: drives speculative decoding over gRPC between draft and target worker pools.

One round logic, two transports: the router runs the same `RoundDriver`, `SequenceRounds` and
`SpeculationPolicy` as the in-process engine, with `GrpcDraft` / `GrpcTarget` (cluster/remote.py)
as the transport. So pipelining, adaptive k, plain-mode fallback with probes, draft loss (plain
mode at once, no token lost) and re-prefilling a healthy draft later all come from the driver and
the policy; the router adds the pools, request checks, text, and the async API.

    router = Router(RouterConfig(target_model_path="/models/target"))
    router.set_workers(drafts=["10.0.0.5:7001"], targets=["10.0.0.6:7002"])
    async for msg in router.generate_stream(request):   # protos.specdec_pb2.GenerateRequest
        ...

Per request: validate (a bad field raises `RequestError(INVALID_ARGUMENT, field, ...)`), admit (more
than `max_in_flight` sequences raises `RequestError(RESOURCE_EXHAUSTED, ...)` at once), tokenize
with the target's tokenizer, pick the least-loaded target and draft, prefill both in parallel, run
rounds on a thread of the router's pool, detokenize incrementally, trim stop strings, stream each
round's tokens, and release the sequence on both workers when it finishes, fails, or the consumer
goes away (task cancelled, client cancel or deadline). A target that fails mid-sequence is replaced
by another from the pool (the committed tokens are re-prefilled there); with none left the request
ends with `RequestError(UNAVAILABLE, ...)`, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from transformers import AutoConfig, GenerationConfig

from cluster.driver import (
    DriverOptions,
    RoundDriver,
    TargetSide,
    TargetUnavailable,
    WorkerUnavailable,
)
from cluster.engine import spec_policy
from cluster.policy import DeploymentEstimates, PolicyConfig, SpecMode, with_pipelining
from cluster.remote import Endpoint, EndpointState, WorkerPool
from cluster.rounds import FinishReason, SequenceRounds, StopConditions
from protos import specdec_pb2, worker_pb2
from workers.model_runner import load_tokenizer
from workers.sampling import SamplingParams
from workers.wire import tokenizer_fingerprint

log = logging.getLogger(__name__)

_MODES = {
    specdec_pb2.SPECULATION_MODE_UNSPECIFIED: SpecMode.AUTO,
    specdec_pb2.SPECULATION_MODE_AUTO: SpecMode.AUTO,
    specdec_pb2.SPECULATION_MODE_ON: SpecMode.ON,
    specdec_pb2.SPECULATION_MODE_OFF: SpecMode.OFF,
}
_FINISH = {
    FinishReason.LENGTH: specdec_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: specdec_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: specdec_pb2.FINISH_REASON_EOS,
    FinishReason.CANCELLED: specdec_pb2.FINISH_REASON_CANCELLED,
}


class RequestError(Exception):
    """A request the router will not (or can no longer) serve; `code` is the gRPC status to answer
    with and `details` (= str(self)) starts with the offending field, e.g.
    "top_p: must be in (0, 1] (0 = unset = 1.0), got 1.5"."""

    def __init__(self, code: grpc.StatusCode, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code
        self.field = field
        self.message = message

    @property
    def details(self) -> str:
        return str(self)


class WorkerMismatchError(ValueError):
    """A worker serves something the router cannot use (other tokenizer, role or model)."""


def _invalid(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, field, message)


DEFAULT_MAX_NEW_TOKENS = 128


@dataclass(frozen=True, slots=True)
class RouterConfig:
    target_model_path: str  # local checkpoint of the target: tokenizer, context, EOS
    max_draft_tokens: int = 8  # a request's num_draft_tokens above this is INVALID_ARGUMENT
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # default policy thresholds
    pipelined: bool | str = True  # or "auto": measure rounds with and without, run the faster
    draft_timeout_s: float = 5.0  # a draft slower than this is dropped: plain mode
    target_timeout_s: float = 60.0  # a target slower than this is failed over
    max_in_flight: int = 64  # sequences at once; more: RESOURCE_EXHAUSTED at once
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # when a request leaves it unset
    max_new_tokens_limit: int = 8192  # a request asking for more is INVALID_ARGUMENT
    max_stop_strings: int = 16
    health_recheck_s: float = 5.0  # how often addresses out of rotation are probed again
    probe_timeout_s: float = 2.0  # Stats call used as a health check

    def __post_init__(self) -> None:
        if not self.target_model_path:
            raise ValueError("target_model_path: required (the target's tokenizer comes from it)")
        if self.max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1, got {self.max_draft_tokens}")
        for name in ("draft_timeout_s", "target_timeout_s", "health_recheck_s", "probe_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_in_flight", "default_max_new_tokens", "max_new_tokens_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("default_max_new_tokens must be <= max_new_tokens_limit")
        self.policy_config()  # PolicyConfig's own checks against max_draft_tokens

    @classmethod
    def from_cluster_config(cls, cfg: Any) -> RouterConfig:
        """From a `cluster.config.ClusterConfig` (read duck-typed: models, speculation, limits,
        target, workers), for the Serve ingress."""
        spec, limits = cfg.speculation, cfg.limits
        return cls(
            target_model_path=str(cfg.models.target_path()),
            max_draft_tokens=spec.max_draft_tokens,
            policy=spec.policy(),
            pipelined=spec.pipelined,
            draft_timeout_s=spec.draft_timeout_s,
            target_timeout_s=cfg.target.call_timeout_s,
            max_in_flight=limits.max_in_flight,
            default_max_new_tokens=limits.default_max_new_tokens,
            max_new_tokens_limit=limits.max_new_tokens,
            health_recheck_s=cfg.workers.health_check_period_s,
        )

    def policy_config(self) -> PolicyConfig:
        return with_pipelining(
            replace(self.policy, max_draft_tokens=self.max_draft_tokens), self.pipelined
        )

    def driver_options(self) -> DriverOptions:
        return DriverOptions(
            draft_timeout_s=self.draft_timeout_s,
            target_timeout_s=self.target_timeout_s,
        )


@dataclass(frozen=True, slots=True)
class _Request:
    seq_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...]
    mode: SpecMode
    k: int  # 0 = the policy's default (adaptive unless configured)


_END = object()
_DECODE_CONTEXT = 5  # prompt tokens decoded along with the output, for correct spacing


class _TextStream:
    """Incremental detokenization with stop strings.

    Decodes a sliding window (the previous read offset onward) and emits only the new suffix,
    holding back an incomplete UTF-8 character (decoded as U+FFFD) and any tail that may be the
    start of a stop string. A matched stop string ends the text just before it.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stops: Sequence[str]) -> None:
        self.tok = tokenizer
        self.ids = list(prompt_ids[-_DECODE_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""  # the output text so far (cut at a stop string)
        self.sent = 0  # characters of text already handed out
        self.stops = tuple(stops)
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def feed(self, token: int) -> bool:
        """Add one token; True when a stop string matched (the text now ends before it)."""
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False
        self.prefix, self.read = self.read, len(self.ids)
        return self._append(after[len(before) :])

    def _append(self, delta: str) -> bool:
        if not delta or self.stopped:
            return False
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += delta
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped

    def take(self, final: bool) -> str:
        """The text that may go out now (all of it when final)."""
        if final and not self.stopped:
            before = self._decode(self.ids[self.prefix : self.read])
            after = self._decode(self.ids[self.prefix :])
            if len(after) > len(before):  # an incomplete character at the very end
                self._append(after[len(before) :])
                self.prefix = self.read = len(self.ids)
        end = len(self.text) if final else len(self.text) - self._held()
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _held(self) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best


class _SequenceDraft:
    """The `DraftSide` of one sequence over the draft pool: bound to one draft worker from its
    (re)prefill on, so a re-prefill after a draft failure can land on another, healthy one."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.ep: Endpoint | None = None

    def prefill(self, seq_id: str, token_ids: list[int], params: SamplingParams):
        new = self.pool.acquire()
        if new is None:
            raise WorkerUnavailable("no draft worker is available")
        old, self.ep = self.ep, new
        if old is not None:
            if old is not new:
                self._release_on(old, seq_id)
            self.pool.release(old)
        return new.side.prefill(seq_id, token_ids, params)

    def propose(self, seq_id: str, committed_len: int, k: int, commit=(), start=None):
        if self.ep is None:
            raise WorkerUnavailable("no draft worker bound")
        return self.ep.side.propose(seq_id, committed_len, k, commit, start)

    def release(self, seq_id: str) -> None:
        ep, self.ep = self.ep, None
        if ep is not None:
            self._release_on(ep, seq_id)
            self.pool.release(ep)

    @staticmethod
    def _release_on(ep: Endpoint, seq_id: str) -> None:
        try:
            ep.side.release(seq_id)
        except Exception:  # noqa: BLE001 - a dead draft holds nothing any more
            pass


class Router:
    """Speculative decoding over gRPC worker pools, for the Ray Serve ingress and the standalone
    gRPC ingress (cluster/grpc_ingress.py).

    Use:
      * `Router(config, drafts=[...], targets=[...])` — loads the target's tokenizer from
        `config.target_model_path` (local files only); worker addresses are "host:port".
        `config` is a `RouterConfig`, or a `cluster.config.ClusterConfig` (converted by
        `RouterConfig.from_cluster_config`).
      * `set_workers(drafts=[...], targets=[...])` — replace either pool at any time (None leaves
        it as is), e.g. when worker replicas register or come back. New addresses are checked
        (Stats: role, tokenizer fingerprint, context) on first use; an address that fails leaves
        the rotation until set again or until the periodic recheck finds it healthy.
      * `check_workers()` — probe every address now (blocking); raises `WorkerMismatchError` with
        a clear message when a worker's tokenizer / role / model does not match. Call it at
        start-up to refuse a bad deployment.
      * `async for msg in router.generate_stream(request)` — `GenerateResponse` chunks; the last
        one carries finish_reason, usage and stats. Cancelling the consuming task (or leaving the
        loop) releases the sequence on both workers.
      * `await router.generate(request)` — the whole `GenerateResponse`.
      * Both raise `RequestError` (its `code` is a `grpc.StatusCode`, its `details` name the field):
        INVALID_ARGUMENT for bad input, RESOURCE_EXHAUSTED when `max_in_flight` sequences are
        running, UNAVAILABLE when no target worker can serve, INTERNAL otherwise. A gRPC handler
        does `except RequestError as e: await context.abort(e.code, e.details)`; in a stream the
        error may come after some chunks.
      * `close()` — stop the health checks, end running streams (CANCELLED), close channels.

    Thread-safe; the async methods may be called from any event loop.
    """

    def __init__(
        self,
        config: RouterConfig,
        *,
        drafts: Sequence[str] = (),
        targets: Sequence[str] = (),
        health_checks: bool = True,
    ) -> None:
        if not isinstance(config, RouterConfig):  # a ClusterConfig from the Serve application
            config = RouterConfig.from_cluster_config(config)
        self.config = config
        path = config.target_model_path
        self.tokenizer = load_tokenizer(path)
        model_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        self.max_context = int(getattr(model_cfg, "max_position_embeddings", 2048))
        self.vocab_size = int(model_cfg.vocab_size)
        self.eos_token_ids = frozenset(_eos_ids(path, model_cfg, self.tokenizer))
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self._policy = config.policy_config()
        # Measured costs and acceptance, shared by every sequence this router drives.
        self._estimates = DeploymentEstimates(self._policy)
        self._options = config.driver_options()
        self._drafts = WorkerPool(
            "draft",
            self._check_draft,
            timeout_s=config.draft_timeout_s,
            probe_timeout_s=config.probe_timeout_s,
        )
        self._targets = WorkerPool(
            "target",
            self._check_target,
            timeout_s=config.target_timeout_s,
            probe_timeout_s=config.probe_timeout_s,
        )
        self._executor = ThreadPoolExecutor(config.max_in_flight, thread_name_prefix="router-seq")
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closing = threading.Event()
        self.set_workers(drafts=drafts, targets=targets)
        self._health: threading.Thread | None = None
        if health_checks:
            self._health = threading.Thread(
                target=self._health_loop, name="router-health", daemon=True
            )
            self._health.start()

    # -- workers ------------------------------------------------------------------------------

    def set_workers(
        self, drafts: Sequence[str] | None = None, targets: Sequence[str] | None = None
    ) -> None:
        """Replace the draft and/or target addresses (None: leave that pool as it is). Sequences
        running on a removed address finish there."""
        if drafts is not None:
            self._drafts.set(drafts)
        if targets is not None:
            self._targets.set(targets)

    def check_workers(self) -> dict[str, list[dict[str, Any]]]:
        """Probe every address now; returns `worker_status()`. Raises WorkerMismatchError when a
        worker is rejected (wrong tokenizer, role or model)."""
        for pool in (self._targets, self._drafts):
            pool.recheck(list(EndpointState))
        status = self.worker_status()
        bad = [
            f"{role[:-1]} {w['address']}: {w['error']}"
            for role, ws in status.items()
            for w in ws
            if w["state"] == EndpointState.REJECTED.value
        ]
        if bad:
            raise WorkerMismatchError("router refuses workers: " + "; ".join(bad))
        return status

    def worker_status(self) -> dict[str, list[dict[str, Any]]]:
        return {"targets": self._targets.status(), "drafts": self._drafts.status()}

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def _check_common(self, info: worker_pb2.ModelInfo, role: int, name: str) -> str | None:
        if info.role != role:
            return f"it is a {worker_pb2.Role.Name(info.role)} worker, not a {name} worker"
        if info.tokenizer_fingerprint != self.fingerprint:
            return (
                f"its tokenizer (model {info.model_path!r}) differs from the target's "
                f"({self.config.target_model_path!r}): speculative decoding needs draft and "
                f"target to share a tokenizer"
            )
        return None

    def _check_draft(self, info: worker_pb2.ModelInfo) -> str | None:
        return self._check_common(info, worker_pb2.ROLE_DRAFT, "draft")

    def _check_target(self, info: worker_pb2.ModelInfo) -> str | None:
        problem = self._check_common(info, worker_pb2.ROLE_TARGET, "target")
        if problem:
            return problem
        theirs = (info.vocab_size, info.max_context, frozenset(info.eos_token_ids))
        ours = (self.vocab_size, self.max_context, self.eos_token_ids)
        if theirs != ours:
            return (
                f"its model {info.model_path!r} (vocab, context, EOS = {theirs[0]}, {theirs[1]}, "
                f"{sorted(theirs[2])}) is not the router's target "
                f"{self.config.target_model_path!r} ({ours[0]}, {ours[1]}, {sorted(ours[2])})"
            )
        return None

    def _health_loop(self) -> None:
        while not self._closing.wait(self.config.health_recheck_s):
            for pool in (self._targets, self._drafts):
                try:
                    pool.recheck()
                except Exception:  # noqa: BLE001 - keep checking
                    log.exception("health recheck failed")

    # -- requests -----------------------------------------------------------------------------

    def validate(self, request: specdec_pb2.GenerateRequest) -> _Request:
        """Check a request and tokenize it; RequestError(INVALID_ARGUMENT, field, ...) if bad."""
        has_text, has_ids = bool(request.prompt), len(request.prompt_token_ids) > 0
        if has_text and has_ids:
            raise _invalid("prompt", "set either prompt or prompt_token_ids, not both")
        if not has_text and not has_ids:
            raise _invalid("prompt", "must not be empty (set prompt or prompt_token_ids)")
        if has_text:
            ids = list(self.tokenizer.encode(request.prompt, add_special_tokens=False))
            if not ids:
                raise _invalid("prompt", "tokenizes to no tokens")
        else:
            ids = [int(t) for t in request.prompt_token_ids]
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise _invalid("prompt_token_ids", f"token id {bad} outside [0, {self.vocab_size})")
        if len(ids) > self.max_context:
            raise _invalid(
                "prompt", f"{len(ids)} tokens exceed the target's context of {self.max_context}"
            )
        cfg = self.config
        max_new = (
            request.max_new_tokens
            if request.HasField("max_new_tokens")
            else cfg.default_max_new_tokens
        )
        if not 1 <= max_new <= cfg.max_new_tokens_limit:
            raise _invalid(
                "max_new_tokens", f"must be in [1, {cfg.max_new_tokens_limit}], got {max_new}"
            )
        temperature = request.temperature
        if not math.isfinite(temperature) or temperature < 0:
            raise _invalid("temperature", f"must be >= 0 (0 = greedy), got {temperature}")
        if request.top_k < 0:
            raise _invalid("top_k", f"must be >= 0 (0 = off), got {request.top_k}")
        top_p = request.top_p if request.top_p != 0 else 1.0
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise _invalid("top_p", f"must be in (0, 1] (0 = unset = 1.0), got {request.top_p}")
        seed = request.seed if request.HasField("seed") else None
        if seed is not None and seed < 0:
            raise _invalid("seed", f"must be >= 0, got {seed}")
        stops = tuple(request.stop)
        if any(not s for s in stops):
            raise _invalid("stop", "stop strings must not be empty")
        if len(stops) > cfg.max_stop_strings:
            raise _invalid("stop", f"at most {cfg.max_stop_strings} stop strings, got {len(stops)}")
        spec = request.speculation
        mode = _MODES.get(spec.mode)
        if mode is None:
            raise _invalid("speculation.mode", f"unknown value {spec.mode} (use AUTO, ON or OFF)")
        k = spec.num_draft_tokens
        if not 0 <= k <= cfg.max_draft_tokens:
            raise _invalid(
                "speculation.num_draft_tokens",
                f"must be in [0, {cfg.max_draft_tokens}] (0 = adaptive), got {k}",
            )
        params = SamplingParams(
            temperature=float(temperature), top_k=int(request.top_k), top_p=top_p, seed=seed
        )
        return _Request(uuid.uuid4().hex, ids, params, int(max_new), stops, mode, int(k))

    async def generate_stream(
        self, request: specdec_pb2.GenerateRequest
    ) -> AsyncIterator[specdec_pb2.GenerateResponse]:
        """Stream the generation; see the class docstring. Raises RequestError."""
        req = self.validate(request)
        self._admit()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                cancel.set()

        try:
            self._executor.submit(self._run, req, emit, cancel)
        except RuntimeError:  # the router is closed
            self._leave()
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "", "router is shutting down") from None
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, RequestError):
                    raise item
                yield item
        finally:
            cancel.set()  # the consumer is gone (or done): the sequence ends and is released

    async def generate(self, request: specdec_pb2.GenerateRequest) -> specdec_pb2.GenerateResponse:
        """The whole generation as one response. Raises RequestError."""
        out = specdec_pb2.GenerateResponse()
        stream = self.generate_stream(request)
        try:
            async for msg in stream:
                out.text += msg.text
                out.token_ids.extend(msg.token_ids)
                if msg.finish_reason:
                    out.finish_reason = msg.finish_reason
                    out.usage.CopyFrom(msg.usage)
                    out.stats.CopyFrom(msg.stats)
        finally:
            await stream.aclose()
        return out

    def _admit(self) -> None:
        with self._lock:
            if self._closing.is_set():
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "", "router is shutting down")
            if self._in_flight >= self.config.max_in_flight:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "",
                    f"router is at its limit of {self.config.max_in_flight} sequences in flight",
                )
            self._in_flight += 1

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    # -- one sequence, on a router thread -------------------------------------------------------

    def _run(self, req: _Request, emit: Callable[[Any], None], cancel: threading.Event) -> None:
        driver: RoundDriver | None = None
        bound: list[Endpoint | None] = [None]  # the target endpoint the sequence is on
        error: RequestError | None = None
        try:
            target = self._targets.acquire()
            if target is None:
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE, "", "no target worker is available" + self._why()
                )
            bound[0] = target
            rounds = SequenceRounds(
                req.prompt_ids,
                StopConditions(
                    req.max_new_tokens, self.eos_token_ids, frozenset(), self.max_context
                ),
            )
            # The engine's per-request policy: fixed or adaptive k, and timing-free for seeded
            # sampling (so that a seeded request repeats exactly, AUTO mode included).
            policy = spec_policy(self._policy, req.mode, req.k or None, req.params, self._estimates)
            draft = None
            if req.mode is not SpecMode.OFF and self._drafts.configured:
                draft = _SequenceDraft(self._drafts)
            driver = RoundDriver(
                req.seq_id,
                rounds,
                policy,
                draft,
                target.side,
                req.params,
                self._options,
                target_failover=self._failover(bound),
            )
            text = _TextStream(self.tokenizer, req.prompt_ids, req.stop)
            sent = 0
            if not cancel.is_set():
                driver.start()
            while not rounds.finished:
                if cancel.is_set() or self._closing.is_set():
                    rounds.cancel()
                    break
                out = driver.step()
                if not out:
                    continue
                tokens: list[int] = []
                for tok in out:
                    tokens.append(tok)
                    if text.feed(tok):
                        rounds.finish(FinishReason.STOP)
                        break
                sent += len(tokens)
                msg = specdec_pb2.GenerateResponse(
                    text=text.take(rounds.finished), token_ids=tokens
                )
                if rounds.finished:
                    self._final(msg, rounds, driver, sent)
                emit(msg)
            if rounds.finish_reason is FinishReason.CANCELLED and not cancel.is_set():
                msg = specdec_pb2.GenerateResponse(text=text.take(True))
                self._final(msg, rounds, driver, sent)
                emit(msg)  # the router closed under a live stream
        except RequestError as exc:
            error = exc
        except TargetUnavailable as exc:
            error = RequestError(grpc.StatusCode.UNAVAILABLE, "", str(exc))
        except ValueError as exc:  # a worker refused the input (its message names the field)
            error = RequestError(grpc.StatusCode.INVALID_ARGUMENT, "", str(exc))
        except Exception as exc:  # noqa: BLE001 - never leave a stream hanging
            log.exception("sequence %s failed", req.seq_id)
            error = RequestError(grpc.StatusCode.INTERNAL, "", f"router: internal error: {exc!r}")
        finally:
            # Free everything first, so that a client who sees the error can retry at once.
            try:
                if driver is not None:
                    driver.close()
            finally:
                if bound[0] is not None:
                    self._targets.release(bound[0])
                self._leave()
                if error is not None:
                    emit(error)
                emit(_END)

    def _failover(self, bound: list[Endpoint | None]) -> Callable[[TargetSide, BaseException], Any]:
        tried: set[str] = set()

        def failover(failed: TargetSide, exc: BaseException) -> TargetSide | None:
            old = bound[0]
            if old is not None:
                if isinstance(exc, WorkerUnavailable | TimeoutError):
                    tried.add(old.address)
                if isinstance(exc, TimeoutError):
                    self._targets.mark_down(old.address, "no answer within target_timeout_s")
            log.warning("target %s failed (%s); moving the sequence", old and old.address, exc)
            new = self._targets.acquire(exclude=tried)
            bound[0] = new
            if old is not None:
                self._targets.release(old)
            return None if new is None else new.side

        return failover

    def _final(
        self,
        msg: specdec_pb2.GenerateResponse,
        rounds: SequenceRounds,
        driver: RoundDriver,
        completion_tokens: int,
    ) -> None:
        s = rounds.stats
        msg.finish_reason = _FINISH[rounds.finish_reason]
        msg.usage.prompt_tokens = len(rounds.prompt_ids)
        msg.usage.completion_tokens = completion_tokens
        msg.stats.CopyFrom(
            specdec_pb2.SpeculationStats(
                rounds=s.rounds,
                draft_tokens=s.draft_tokens,
                accepted_tokens=s.accepted_tokens,
                mean_accepted_length=s.mean_accepted_length,
                plain_steps=s.plain_steps,
                pipeline_hits=s.pipeline_hits,
                pipeline_misses=s.pipeline_misses,
                acceptance_rate=s.acceptance_rate,
                tokens_per_target_pass=s.tokens_per_target_pass,
                draft_failures=s.draft_failures,
                target_failovers=driver.target_failovers,
                # starting without a draft (mode OFF) is not a switch
                mode_switches=max(0, driver.policy.switches - (driver.draft is None)),
                acceptance_histogram=s.acceptance_histogram,  # for the HTTP API's metrics
            )
        )

    def _why(self) -> str:
        status = self._targets.status()
        if not status:
            return " (none configured)"
        return (
            " ("
            + "; ".join(f"{w['address']}: {w['state']} {w['error']}".strip() for w in status)
            + ")"
        )

    # -- shutdown -----------------------------------------------------------------------------

    def close(self) -> None:
        """End running streams (CANCELLED), stop health checks and close the channels."""
        self._closing.set()
        self._executor.shutdown(wait=True)
        if self._health is not None:
            self._health.join(timeout=5)
        self._drafts.close()
        self._targets.close()


def _eos_ids(path: str, model_cfg: Any, tokenizer: Any) -> set[int]:
    """The EOS ids the target worker stops on (as `ModelRunner.eos_token_ids` reads them)."""
    try:
        eos = GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
    except (OSError, ValueError):
        eos = getattr(model_cfg, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, list | tuple) else {int(eos)}
