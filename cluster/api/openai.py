"""The OpenAI-compatible HTTP API as pure translation: JSON -> `GenerateRequest`, responses -> JSON.

    POST /v1/completions        completion_request(body, ...) -> (GenerateRequest, Options)
    POST /v1/chat/completions   chat_request(body, tokenizer, ...)
    GET  /v1/models             models_list(model_id)

The Serve ingress (cluster/serve/app.py) does the HTTP and calls the router; this module holds no
I/O and imports neither ray nor grpc, so every rule here is unit-tested in milliseconds.

One validation for both APIs: the *values* of a request (empty prompt, max_tokens < 1, top_p
outside (0, 1], negative seed, too many stop strings, k out of range, ...) are checked by
`Router.validate` on the proto, as for gRPC. Its `RequestError.field` (a proto field name) is
mapped back to the OpenAI parameter name by `error_from_router`. What is checked here is only
what a proto cannot express: JSON types and shapes, unknown parameters, the model name, and the
OpenAI parameters this server refuses (n > 1, logprobs, echo, best_of, suffix, penalties, ...)
with a 400 that names them, never silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protos import specdec_pb2 as pb

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


# -- errors -----------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    text = f"{param}: {message}" if param else message
    return APIError(400, text, param=param, code=code)


# gRPC status (by name: no grpc import here) -> HTTP status, OpenAI error type.
_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),  # overload: retry later
    "UNAVAILABLE": (503, "service_unavailable_error"),  # no target left, shutting down
    "DEADLINE_EXCEEDED": (408, "timeout_error"),
    "CANCELLED": (499, "cancelled"),  # nginx's "client closed request"
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
}

# The GenerateRequest fields a RequestError may name.
_REQUEST_FIELDS = frozenset(pb.GenerateRequest.DESCRIPTOR.fields_by_name) | {
    "speculation.mode",
    "speculation.num_draft_tokens",
}

# Proto field names (RequestError.field) -> OpenAI parameter names.
_PARAMS = {
    "prompt": "prompt",
    "prompt_token_ids": "prompt",
    "max_new_tokens": "max_tokens",
}


def error_from_router(
    code: Any, field: str, message: str, *, chat: bool = False, max_tokens_param: str = ""
) -> APIError:
    """The OpenAI error for a router `RequestError(code, field, message)`."""
    name = getattr(code, "name", str(code))
    status, kind = _STATUS.get(name, (500, "internal_error"))
    if not field and name == "INVALID_ARGUMENT":
        # Refused after validation (a worker's or the round state's ValueError): the field is
        # only in the message, which then starts with it ("prompt: ... exceed the context").
        head, sep, rest = message.partition(": ")
        if sep and head in _REQUEST_FIELDS:
            field, message = head, rest
    param = _PARAMS.get(field, field) or None
    if chat and param == "prompt":
        param = "messages"  # the prompt of a chat request is the rendered messages
    if param == "max_tokens" and max_tokens_param:
        param = max_tokens_param  # chat: whichever of max_tokens / max_completion_tokens was sent
    text = f"{param}: {message}" if param else message
    return APIError(status, text, param=param, type=kind, code=name.lower())


# -- request parsing --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    """What the HTTP layer needs besides the proto request."""

    model: str
    stream: bool
    include_usage: bool  # stream_options.include_usage
    chat: bool = False
    max_tokens_param: str = "max_tokens"  # the name to report for max_new_tokens errors


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (400 otherwise)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"invalid JSON body: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(
            400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json"
        )
    return body


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else "number"
    )


def _int(body: Mapping[str, Any], key: str, bounds: tuple[int, int] = _INT32) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    # bool is an int in Python; JSON true is not a number. 2.0 is accepted as OpenAI does.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(key, f"must be an integer, got {_type_name(value)}", "invalid_type")
    if not bounds[0] <= value <= bounds[1]:
        raise invalid(key, f"{value} is out of range", "invalid_value")
    return value


def _number(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(key, f"must be a number, got {_type_name(value)}", "invalid_type")
    return float(value)


def _bool(body: Mapping[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise invalid(key, f"must be a boolean, got {_type_name(value)}", "invalid_type")
    return value


def _refuse(param: str, why: str) -> APIError:
    return invalid(param, f"not supported by this server ({why})", "unsupported_parameter")


COMPLETION_PARAMS = frozenset(
    {
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
        "logprobs",
        "echo",
        "best_of",
        "suffix",
        "user",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "speculation",
    }
)
CHAT_PARAMS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
        "logprobs",
        "top_logprobs",
        "user",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "speculation",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "functions",
        "function_call",
        "chat_template_kwargs",
    }
)

_SPEC_MODES = {
    "auto": pb.SPECULATION_MODE_AUTO,
    "on": pb.SPECULATION_MODE_ON,
    "off": pb.SPECULATION_MODE_OFF,
}


def _common(
    body: Mapping[str, Any], req: pb.GenerateRequest, allowed: frozenset[str], model_id: str
) -> tuple[str, bool, bool]:
    """Model, sampling, stop, streaming and speculation: the parameters both endpoints share."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(unknown[0], "unrecognized request argument", "unknown_parameter")
    model = body.get("model")
    if model is None:
        raise invalid("model", "required (GET /v1/models lists it)", "missing_required_parameter")
    if not isinstance(model, str):
        raise invalid("model", f"must be a string, got {_type_name(model)}", "invalid_type")
    if model != model_id:
        raise invalid(
            "model",
            f"the model {model!r} is not served here (only {model_id!r})",
            "model_not_found",
        )

    # Defaults as OpenAI's: temperature 1 (sampling) when unset; 0 = greedy.
    temperature = _number(body, "temperature")
    req.temperature = 1.0 if temperature is None else temperature
    top_p = _number(body, "top_p")
    if top_p is not None:
        # The proto reads top_p = 0 as "unset" (= 1.0): an explicit 0 must not pass as 1.0.
        if top_p == 0:
            raise invalid("top_p", "must be in (0, 1], got 0")
        req.top_p = top_p
    top_k = _int(body, "top_k")
    if top_k is not None:
        req.top_k = 0 if top_k == -1 else top_k  # vLLM: -1 (or 0) = no top-k filter
    seed = _int(body, "seed", _INT64)
    if seed is not None:
        req.seed = seed

    stop = body.get("stop")
    if isinstance(stop, str):
        req.stop.append(stop)
    elif isinstance(stop, list):
        if not all(isinstance(s, str) for s in stop):
            raise invalid("stop", "must be a string or a list of strings", "invalid_type")
        req.stop.extend(stop)
    elif stop is not None:
        raise invalid(
            "stop", f"must be a string or a list of strings, got {_type_name(stop)}", "invalid_type"
        )

    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name):
            raise _refuse(name, "only 0 is accepted")
    bias = body.get("logit_bias")
    if bias is not None and not isinstance(bias, dict):
        raise invalid("logit_bias", "must be an object", "invalid_type")
    if bias:
        raise _refuse("logit_bias", "it would change the target's distribution")
    n = _int(body, "n")
    if n is not None and n != 1:
        raise _refuse("n", "one choice per request; send n requests")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", "must be a string", "invalid_type")

    stream = bool(_bool(body, "stream"))
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise invalid("stream_options", "must be an object", "invalid_type")
        if not stream:
            raise invalid("stream_options", "only allowed when stream is true")
        extra = sorted(set(opts) - {"include_usage", "continuous_usage_stats"})
        if extra:
            raise invalid(f"stream_options.{extra[0]}", "unrecognized", "unknown_parameter")
        include_usage = bool(_bool(opts, "include_usage"))
        if _bool(opts, "continuous_usage_stats"):
            raise _refuse("stream_options.continuous_usage_stats", "usage comes at the end")

    spec = body.get("speculation")
    if spec is not None:
        _speculation(spec, req)
    return model, stream, include_usage


def _speculation(spec: Any, req: pb.GenerateRequest) -> None:
    """The extension field {"mode": "auto"|"on"|"off", "num_draft_tokens": k}, as the proto's."""
    if not isinstance(spec, dict):
        raise invalid("speculation", f"must be an object, got {_type_name(spec)}", "invalid_type")
    extra = sorted(set(spec) - {"mode", "num_draft_tokens"})
    if extra:
        raise invalid(
            f"speculation.{extra[0]}",
            "unrecognized (use mode, num_draft_tokens)",
            "unknown_parameter",
        )
    mode = spec.get("mode")
    if mode is not None:
        if not isinstance(mode, str) or mode.lower() not in _SPEC_MODES:
            raise invalid("speculation.mode", f"must be one of auto, on, off; got {mode!r}")
        req.speculation.mode = _SPEC_MODES[mode.lower()]
    try:
        k = _int(spec, "num_draft_tokens")
    except APIError as exc:
        raise invalid(
            "speculation.num_draft_tokens",
            exc.message.split(": ", 1)[1],
            exc.code or "invalid_value",
        ) from None
    if k is not None:
        req.speculation.num_draft_tokens = k


def _max_tokens(body: Mapping[str, Any], req: pb.GenerateRequest, key: str) -> None:
    value = _int(body, key)
    if value is not None:
        req.max_new_tokens = value  # unset: the router's default


def completion_request(
    body: Mapping[str, Any], *, model_id: str
) -> tuple[pb.GenerateRequest, Options]:
    """POST /v1/completions -> the proto request (values checked later by the router)."""
    req = pb.GenerateRequest()
    model, stream, include_usage = _common(body, req, COMPLETION_PARAMS, model_id)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        req.prompt = prompt  # "" is refused by the router, as over gRPC
    elif isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        bad = next((t for t in prompt if not _INT32[0] <= t <= _INT32[1]), None)
        if bad is not None:
            raise invalid("prompt", f"token id {bad} is out of range")
        req.prompt_token_ids.extend(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise _refuse("prompt", "one prompt per request: a string or a list of token ids")
    elif prompt is None:
        raise invalid("prompt", "required", "missing_required_parameter")
    else:
        raise invalid("prompt", "must be a string or a list of token ids", "invalid_type")
    _max_tokens(body, req, "max_tokens")
    if body.get("logprobs") is not None:
        raise _refuse("logprobs", "no log probabilities are returned")
    if _bool(body, "echo"):
        raise _refuse("echo", "the prompt is not echoed")
    best_of = _int(body, "best_of")
    if best_of is not None and best_of != 1:
        raise _refuse("best_of", "one candidate per request")
    if body.get("suffix") is not None:
        raise _refuse("suffix", "no insertion (fill-in-the-middle)")
    return req, Options(model, stream, include_usage)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_request(
    body: Mapping[str, Any], *, model_id: str, tokenizer: Any
) -> tuple[pb.GenerateRequest, Options]:
    """POST /v1/chat/completions: the messages rendered by the target tokenizer's chat template
    (`apply_chat_template(..., add_generation_prompt=True)`) become the prompt text."""
    req = pb.GenerateRequest()
    model, stream, include_usage = _common(body, req, CHAT_PARAMS, model_id)
    if not has_chat_template(tokenizer):
        raise APIError(
            400,
            f"the model {model_id!r} has no chat template (its tokenizer defines none): "
            "use POST /v1/completions with a prompt",
            param="model",
            code="chat_template_missing",
        )
    messages = body.get("messages")
    if messages is None:
        raise invalid("messages", "required", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty array of messages", "invalid_type")
    turns = [_message(m, i) for i, m in enumerate(messages)]
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get("max_tokens") is not None and key == "max_completion_tokens":
        raise invalid("max_tokens", "set max_tokens or max_completion_tokens, not both")
    _max_tokens(body, req, key)
    if _bool(body, "logprobs") or body.get("top_logprobs") is not None:
        raise _refuse(
            "logprobs" if body.get("logprobs") else "top_logprobs",
            "no log probabilities are returned",
        )
    for name in ("tools", "functions"):
        if body.get(name):
            raise _refuse(name, "no tool calling")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none", "auto"):
            raise _refuse(name, "no tool calling")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _refuse("response_format", "only {'type': 'text'}")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise invalid("chat_template_kwargs", "must be an object", "invalid_type")
    try:
        req.prompt = tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=True, **kwargs
        )
    except Exception as exc:  # noqa: BLE001 - the template's own complaint (roles, ...)
        raise invalid("messages", f"the chat template refused them: {exc}") from None
    return req, Options(model, stream, include_usage, chat=True, max_tokens_param=key)


def _message(m: Any, i: int) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise invalid(where, "must be an object with role and content", "invalid_type")
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or not role:
        raise invalid(f"{where}.role", "must be a non-empty string", "invalid_type")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise _refuse(f"{where}.content[{j}]", "only text content parts")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise invalid(f"{where}.content", "must be a string or text parts", "invalid_type")
    return {"role": role, "content": content}


# -- responses --------------------------------------------------------------------------------

_FINISH = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "stop",
    pb.FINISH_REASON_CANCELLED: "abort",  # vLLM's word for a request the server gave up on
}


def finish_reason(resp: pb.GenerateResponse) -> str | None:
    return _FINISH.get(resp.finish_reason)


def usage(resp: pb.GenerateResponse) -> dict[str, int]:
    p, c = int(resp.usage.prompt_tokens), int(resp.usage.completion_tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def speculation_metrics(stats: pb.SpeculationStats) -> dict[str, Any]:
    """`metrics.speculative_decoding` of a response: vLLM's per-request shape (mean acceptance
    length = 1 + accepted / steps, draft acceptance rate, acceptance_histogram[j] = steps that
    accepted exactly j draft tokens, ...) plus ours (plain steps, pipeline hits, ...)."""
    hist = [int(h) for h in stats.acceptance_histogram]
    steps = int(stats.rounds)
    return {
        # vLLM's fields
        "mean_acceptance_length": (1 + stats.accepted_tokens / steps) if steps else 0.0,
        "draft_acceptance_rate": float(stats.acceptance_rate),
        "acceptance_histogram": hist,
        "num_spec_steps": steps,
        "num_accepted_draft_tokens": int(stats.accepted_tokens),
        "num_draft_tokens": int(stats.draft_tokens),
        "num_spec_tokens": max(0, len(hist) - 1),  # the longest block proposed (k varies)
        # ours
        "plain_steps": int(stats.plain_steps),
        "pipeline_hits": int(stats.pipeline_hits),
        "pipeline_misses": int(stats.pipeline_misses),
        "tokens_per_target_pass": float(stats.tokens_per_target_pass),
        "draft_failures": int(stats.draft_failures),
        "target_failovers": int(stats.target_failovers),
        "mode_switches": int(stats.mode_switches),
    }


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def _head(opts: Options, rid: str, created: int, chunk: bool) -> dict[str, Any]:
    obj = "chat.completion" if opts.chat else "text_completion"
    if chunk and opts.chat:
        obj = "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": created, "model": opts.model}


def response_json(
    resp: pb.GenerateResponse, opts: Options, *, rid: str | None = None, created: int | None = None
) -> dict[str, Any]:
    """The whole (unary) response."""
    rid = rid or new_id(opts.chat)
    out = _head(opts, rid, int(time.time()) if created is None else created, chunk=False)
    choice: dict[str, Any] = {"index": 0}
    if opts.chat:
        choice["message"] = {"role": "assistant", "content": resp.text}
        choice["logprobs"] = None
    else:
        choice["text"] = resp.text
        choice["logprobs"] = None
    choice["finish_reason"] = finish_reason(resp)
    out["choices"] = [choice]
    out["usage"] = usage(resp)
    out["metrics"] = {"speculative_decoding": speculation_metrics(resp.stats)}
    return out


class ChunkWriter:
    """Turns the router's stream messages into server-sent events, in OpenAI's order: (chat: a
    first chunk with the role), text chunks, a chunk with finish_reason (and our metrics), with
    include_usage a last chunk with `choices: []` and usage, then `data: [DONE]`."""

    def __init__(
        self, opts: Options, *, rid: str | None = None, now: Callable[[], float] = time.time
    ):
        self.opts = opts
        self.rid = rid or new_id(opts.chat)
        self.created = int(now())
        self.started = False

    def _chunk(self, text: str | None, finish: str | None) -> dict[str, Any]:
        out = _head(self.opts, self.rid, self.created, chunk=True)
        choice: dict[str, Any] = {"index": 0}
        if self.opts.chat:
            delta: dict[str, Any] = {}
            if not self.started:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        self.started = True
        out["choices"] = [choice]
        if self.opts.include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the last
        return out

    def events(self, msg: pb.GenerateResponse) -> list[str]:
        """The SSE lines for one router message (none for an empty, non-final one)."""
        out = []
        finish = finish_reason(msg)
        if self.opts.chat and not self.started:
            out.append(sse(self._chunk("", None)))
        if msg.text and finish is None:
            out.append(sse(self._chunk(msg.text, None)))
        if finish is not None:
            last = self._chunk(msg.text if msg.text else None if self.opts.chat else "", finish)
            metrics = {"speculative_decoding": speculation_metrics(msg.stats)}
            last["metrics"] = metrics
            out.append(sse(last))
            if self.opts.include_usage:
                tail = _head(self.opts, self.rid, self.created, chunk=True)
                tail.update(choices=[], usage=usage(msg), metrics=metrics)
                out.append(sse(tail))
        return out

    def error(self, err: APIError) -> str:
        """An error after the stream started (vLLM's way: an error event, then [DONE])."""
        return sse(err.body())


DONE = "data: [DONE]\n\n"


def sse(obj: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), allow_nan=False)}\n\n"


# -- models -----------------------------------------------------------------------------------


def default_model_id(target_path: str | Path) -> str:
    """The served model id when the config sets none: the target checkpoint's directory name."""
    return Path(target_path).name or "specdec"


def models_list(model_id: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "specdec"}],
    }
