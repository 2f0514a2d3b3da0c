"""The HTTP side of the Serve ingress: the OpenAI-compatible API and GET /specdec, as a FastAPI app.

    GET  /specdec               worker status as JSON (also GET / under an old /specdec prefix)
    GET  /health                200 while the ingress answers (liveness)
    GET  /ready                 200 when every pool has a live replica, else 503 (readiness)
    GET  /version               the package version
    GET  /v1/models             the served model id
    POST /v1/completions        text completion, unary or server-sent events
    POST /v1/chat/completions   chat completion (the target tokenizer's chat template)

`build_http_app(ingress)` is called once per ingress replica (`__serve_build_asgi_app__` in
cluster/serve/app.py) and closes over it: `ingress.router` (a `cluster.routing.router.Router`),
`ingress.model_id`, `ingress.started`, `ingress.serving()` and `await ingress.status()`. The
translation itself is pure, in cluster/api/openai_requests.py, openai_responses.py,
openai_errors.py and openai_models.py; here is only HTTP: status codes, streaming,
disconnects. No ray.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import ExitStack
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.api.auth import HEADER, authorized, key_in_flight
from cluster.api.openai_errors import APIError, error_from_router
from cluster.api.openai_fields import parse_json
from cluster.api.openai_models import models_list
from cluster.api.openai_requests import Options, chat_request, completion_request
from cluster.api.openai_responses import (
    DONE,
    ChunkWriter,
    TokenText,
    echo_of,
    response_json,
    token_texts,
)
from cluster.api.validation import internal_error

log = logging.getLogger("ray.serve")


def to_api_error(exc: BaseException, opts: Options | None) -> APIError:
    """The OpenAI error for a failure of the router (RequestError) or anything else."""
    if isinstance(exc, APIError):
        return exc
    code, field = getattr(exc, "code", None), getattr(exc, "field", None)
    if code is not None and field is not None:  # the router's RequestError
        return error_from_router(
            code,
            field,
            getattr(exc, "message", str(exc)),
            chat=bool(opts and opts.chat),
            max_tokens_param=opts.max_tokens_param if opts else "",
            structured_param=opts.structured_param if opts else "",
        )
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return APIError(408, f"deadline exceeded: {exc}", type="timeout_error", code="timeout")
    err = internal_error(exc, "specdec http")
    return APIError(500, err.details, type="internal_error", code="internal")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("specdec-cluster")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


OPEN_PATHS = ("/health", "/ready", "/version")  # probes: no API key


def build_http_app(ingress: Any) -> FastAPI:
    app = FastAPI(title="specdec-cluster", docs_url=None, redoc_url=None, openapi_url=None)

    keys = getattr(ingress, "api_keys", None)

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        request.state.api_key = -1
        if keys is not None and not request.url.path.endswith(OPEN_PATHS):
            found = authorized(request.headers.get(HEADER), keys)
            if found is None:
                err = APIError(
                    401,
                    "a valid API key is required: send `Authorization: Bearer <key>`",
                    type="invalid_request_error",
                    code="invalid_api_key",
                )
                return error_response(err)
            request.state.api_key = found
        return await call_next(request)

    @app.get("/specdec")
    @app.get("/")  # the same under an application deployed with route_prefix /specdec
    async def status() -> dict[str, Any]:
        return await ingress.status()

    @app.get("/health")
    async def health() -> Response:
        """Live: this ingress answers (vLLM's server answers the same path)."""
        return Response(status_code=200)

    @app.get("/ready")
    async def ready() -> Response:
        """Ready: every pool has a live replica with its model loaded (503 until then)."""
        if ingress.serving():
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False}, status_code=503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": package_version()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return models_list(ingress.model_id, int(ingress.started))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, chat=True)

    text_cache: dict[int, TokenText] = {}

    def texts_of(tokenizer: Any) -> TokenText:
        """One memo of token texts per tokenizer the router holds."""
        if id(tokenizer) not in text_cache:
            text_cache[id(tokenizer)] = token_texts(tokenizer)
        return text_cache[id(tokenizer)]

    cfg = getattr(ingress, "cfg", None)
    max_bytes = cfg.limits.max_request_bytes if cfg is not None else 4 << 20

    async def _generate(request: Request, *, chat: bool) -> Response:
        # The key's request counts in flight until the answer is out (a stream: to its end).
        held = ExitStack()
        try:
            held.enter_context(key_in_flight(keys, request.state.api_key))
        except Exception as exc:  # noqa: BLE001 - the key's own limit: 429
            return error_response(to_api_error(exc, None))
        response = None
        try:
            response = await _respond(request, chat, held)
            return response
        finally:
            if not isinstance(response, StreamingResponse):
                held.close()

    async def _respond(request: Request, chat: bool, held: ExitStack) -> Response:
        try:
            size = int(request.headers.get("content-length") or 0)
            raw = b"" if size > max_bytes else await request.body()
            if max(size, len(raw)) > max_bytes:
                raise APIError(
                    413,
                    f"the request body has {max(size, len(raw))} bytes; at most {max_bytes}",
                    code="request_too_large",
                )
            body = parse_json(raw)
            if chat:
                req, opts = chat_request(
                    body, model_id=ingress.model_id, tokenizer=ingress.router.tokenizer
                )
            else:
                req, opts = completion_request(body, model_id=ingress.model_id)
        except APIError as err:
            return error_response(err)
        router = ingress.router
        text_of = texts_of(router.tokenizer)
        if not opts.stream:
            try:
                resp = await router.generate(req)
            except Exception as exc:  # noqa: BLE001 - every failure gets OpenAI's error shape
                return error_response(to_api_error(exc, opts))
            # echo: the prompt is tokenized again once the router took it (its limits checked)
            echo = echo_of(req, router.tokenizer) if opts.echo else None
            return JSONResponse(response_json(resp, opts, text_of=text_of, echo=echo))

        prompt_tokens = 0
        if opts.continuous_usage:  # usage on every chunk needs the prompt's length up front
            try:
                prompt_tokens = len(router.validate(req).prompt_ids)
            except Exception as exc:  # noqa: BLE001
                return error_response(to_api_error(exc, opts))
        stream = router.generate_stream(req)
        # Wait for the first message before answering: bad input, overload and "no target"
        # then get their HTTP status (400 / 429 / 503) instead of an error inside a 200 stream.
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            first = None
        except asyncio.CancelledError:  # the client left before the first tokens
            await stream.aclose()
            raise
        except Exception as exc:  # noqa: BLE001
            await stream.aclose()
            return error_response(to_api_error(exc, opts))
        echo = echo_of(req, router.tokenizer) if opts.echo else None
        return StreamingResponse(
            _events(
                stream,
                first,
                ChunkWriter(opts, prompt_tokens=prompt_tokens, text_of=text_of, echo=echo),
                opts,
                held,
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    return app


async def _events(
    stream: AsyncIterator[Any], first: Any, writer: ChunkWriter, opts: Options, held: ExitStack
) -> AsyncIterator[str]:
    """SSE lines; a client that disconnects cancels this task, and closing the router's stream
    (finally) releases the sequence on every worker and the key's request in flight."""
    try:
        try:
            if first is not None:
                for event in writer.events(first):
                    yield event
            async for msg in stream:
                for event in writer.events(msg):
                    yield event
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - mid-stream failure: an error event, as vLLM
            yield writer.error(to_api_error(exc, opts))
        yield DONE
    finally:
        held.close()
        await stream.aclose()  # type: ignore[attr-defined]
