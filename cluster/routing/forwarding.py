"""The ingress side of the Serve cluster: stateless, it validates and forwards to a scheduler.

Each target replica runs the step scheduler of its own batch (a `Router` with that one target,
see cluster/serve/worker_deployments.py), so exactly one scheduler drives a target and no target
sees competing batches; the ingress replicas hold no sequence state. `ForwardingRouter` has the
`Router`'s public face (`validate`, `generate_stream`, `generate`, `tokenizer`, `in_flight`), so
every front end (the gRPC ingress, the OpenAI HTTP API) uses it alike:

* validate and tokenize here (bad input is refused before any worker is touched; one validation
  for every API), then hand the request, as token ids, to `submit` (Serve routes it to the least
  loaded target replica);
* stream the replica's chunks through; a replica's own refusal arrives as an error item and is
  raised as that `RequestError`;
* a replica that dies (or answers UNAVAILABLE) mid-stream: re-submit the committed tokens (the
  prompt plus every token already streamed) with the remaining budget, so Serve places the
  sequence on another replica, which re-prefills it and goes on (sampling randomness is keyed by
  position, so a seeded request continues exactly); with none left after `max_failovers` tries,
  UNAVAILABLE, never a hang (`target_timeout_s` bounds every wait).

No ray here: `submit` is injected (a Serve handle call in the cluster, anything in tests).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from cluster.api.response_stream import collect
from cluster.api.validation import Admission, RequestError, ValidRequest
from cluster.observability.recorders import RequestRecorder
from cluster.routing.config import RouterConfig
from cluster.routing.target_model import TargetModel
from protos import specdec_pb2

log = logging.getLogger(__name__)

ERROR = "error"  # first element of an error item: (ERROR, grpc status name, details)

# (request bytes, stream interval: tokens per message, 0 = unary) -> async iterator of
# (GenerateResponse bytes | error item)
Submit = Callable[[bytes, int], AsyncIterator[Any]]


def error_item(exc: RequestError) -> tuple[str, str, str]:
    return (ERROR, exc.code.name, exc.details)


def _raise_error_item(item: tuple) -> None:
    _, code, details = item
    raise RequestError(grpc.StatusCode[code], "", details)


class ForwardingRouter:
    """Validates, then forwards each request to a target replica's scheduler via `submit`."""

    def __init__(
        self,
        config: RouterConfig,
        submit: Submit,
        *,
        max_failovers: int = 3,
        recorder: RequestRecorder | None = None,
    ) -> None:
        """recorder: the request metrics (cluster/observability), None for none."""
        self.config = config
        self.recorder = recorder
        self.submit = submit
        self.max_failovers = max_failovers
        self.model = TargetModel.load(config.target_model_path)
        self._limits = config.limits()
        self._admission = Admission(config.max_in_flight, "ingress")

    @property
    def in_flight(self) -> int:
        return self._admission.in_flight

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def validate(self, request: specdec_pb2.GenerateRequest) -> ValidRequest:
        """Check a request and tokenize it; RequestError(INVALID_ARGUMENT, field, ...) if bad."""
        return self.model.validate(request, self._limits)

    async def generate(self, request: specdec_pb2.GenerateRequest) -> specdec_pb2.GenerateResponse:
        return await collect(self.generate_stream(request, every=0))

    async def generate_stream(
        self, request: specdec_pb2.GenerateRequest, *, every: int | None = None
    ) -> AsyncIterator[specdec_pb2.GenerateResponse]:
        """The replica's messages, `every` tokens to a message after the first (default: the
        config's `stream_interval`; 0: as few as the replica's liveness allows, for a unary
        call)."""
        if self.recorder is None:
            async for msg in self._stream(request, every):
                yield msg
            return
        watch = self.recorder.watch()
        self.recorder.entered()
        stream = self._stream(request, every)
        try:
            async for msg in stream:
                watch.message(len(msg.token_ids), msg.finish_reason, msg.usage.prompt_tokens)
                yield msg
        except RequestError as exc:
            watch.failed(exc.code.name)
            raise
        except TimeoutError:  # the front end answers DEADLINE_EXCEEDED (HTTP 408)
            watch.failed(grpc.StatusCode.DEADLINE_EXCEEDED.name)
            raise
        except Exception:
            watch.failed(grpc.StatusCode.INTERNAL.name)
            raise
        finally:
            watch.close()
            self.recorder.left()
            await stream.aclose()

    async def _stream(
        self, request: specdec_pb2.GenerateRequest, every: int | None
    ) -> AsyncIterator[specdec_pb2.GenerateResponse]:
        every = self.config.stream_interval if every is None else every
        req = self.validate(request)
        self._admission.enter()
        try:
            forward = specdec_pb2.GenerateRequest()
            forward.CopyFrom(request)
            forward.ClearField("prompt")
            del forward.prompt_token_ids[:]
            forward.prompt_token_ids.extend(req.prompt_ids)
            forward.max_new_tokens = req.max_new_tokens
            received: dict[int, list[int]] = {}  # by sample index
            failovers = 0
            while True:
                try:
                    async for msg in self._attempt(forward, every):
                        got = received.setdefault(msg.index, [])
                        got.extend(msg.token_ids)
                        if msg.finish_reason:
                            msg.usage.prompt_tokens = len(req.prompt_ids)
                            msg.usage.completion_tokens = len(got)
                            msg.stats.target_failovers += failovers
                        yield msg
                    return
                except _ReplicaLost as lost:
                    failovers += 1
                    # n samples move only together with their prompt's prefill: not built
                    if failovers > self.max_failovers or req.n > 1:
                        raise RequestError(
                            grpc.StatusCode.UNAVAILABLE,
                            "",
                            f"no target replica could serve the request ({lost})",
                        ) from None
                    log.warning("target replica lost (%s): moving the sequence", lost)
                    done = received.get(0, [])
                    if len(done) >= req.max_new_tokens:  # lost just before its last message
                        yield _length_finish(len(req.prompt_ids), len(done), failovers)
                        return
                    await asyncio.sleep(0.2 * failovers)  # let Serve see the replica gone
                    # The committed tokens go along: the next replica re-prefills and goes on.
                    del forward.prompt_token_ids[:]
                    forward.prompt_token_ids.extend(req.prompt_ids + done)
                    forward.max_new_tokens = req.max_new_tokens - len(done)
                    forward.resumed_tokens = len(done)  # output: penalties, grammar count it
                    forward.ClearField("prompt_logprobs")  # the client has them already
        finally:
            self._admission.leave()

    async def _attempt(
        self, forward: specdec_pb2.GenerateRequest, every: int
    ) -> AsyncIterator[specdec_pb2.GenerateResponse]:
        stream = self.submit(forward.SerializeToString(), every)
        timeout = self.config.target_timeout_s
        try:
            while True:
                try:
                    item = await asyncio.wait_for(anext(stream), timeout)
                except StopAsyncIteration:
                    return
                except (asyncio.CancelledError, GeneratorExit):
                    raise
                except TimeoutError:
                    raise _ReplicaLost(f"no answer within {timeout:g}s") from None
                except Exception as exc:  # noqa: BLE001 - the replica (or its actor) is gone
                    raise _ReplicaLost(f"{type(exc).__name__}: {exc}") from None
                if isinstance(item, tuple) and item and item[0] == ERROR:
                    if item[1] == grpc.StatusCode.UNAVAILABLE.name:
                        raise _ReplicaLost(item[2])  # its target is gone: try another replica
                    _raise_error_item(item)
                yield specdec_pb2.GenerateResponse.FromString(item)
        finally:
            cancel = getattr(stream, "cancel", None)
            if cancel is not None:
                cancel()  # a consumer that left frees the sequence on the replica

    def close(self) -> None:
        pass


class _ReplicaLost(Exception):
    pass


def _length_finish(prompt: int, completion: int, failovers: int) -> specdec_pb2.GenerateResponse:
    msg = specdec_pb2.GenerateResponse(finish_reason=specdec_pb2.FINISH_REASON_LENGTH)
    msg.usage.prompt_tokens = prompt
    msg.usage.completion_tokens = completion
    msg.stats.target_failovers = failovers
    return msg
