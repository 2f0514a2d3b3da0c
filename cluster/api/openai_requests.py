"""OpenAI request bodies -> `GenerateRequest`: POST /v1/completions and /v1/chat/completions.

    completion_request(body, model_id=...)            -> (GenerateRequest, Options)
    chat_request(body, model_id=..., tokenizer=...)   -> (GenerateRequest, Options)

One validation for both APIs: the *values* of a request (empty prompt, max_tokens < 1, top_p
outside (0, 1], negative seed, too many stop strings, k out of range, ...) are checked by the
router on the proto, as for gRPC (cluster/api/validation.py), and its refusals are said in
OpenAI's terms by `openai_errors.error_from_router`. What is checked here is only what a proto
cannot express: JSON types and shapes, unknown parameters, the model name, and the OpenAI
parameters this server refuses (best_of, suffix, tools, ...) with a 400 that names
them, never silently ignored. Pure: no I/O, neither ray nor grpc.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cluster.api.openai_errors import APIError, invalid, refused
from cluster.api.openai_fields import INT32, INT64, json_type, read_bool, read_int, read_number
from protos import specdec_pb2 as pb


@dataclass(frozen=True, slots=True)
class Options:
    """What the HTTP layer needs besides the proto request."""

    model: str
    stream: bool
    include_usage: bool  # stream_options.include_usage
    chat: bool = False
    max_tokens_param: str = "max_tokens"  # the name to report for max_new_tokens errors
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage on every chunk
    logprobs: bool = False  # the choices carry the tokens' log-probabilities (req.logprobs: top-N)
    structured_param: str = ""  # the parameter that asked for a structured output, for errors
    n: int = 1  # choices (samples of the prompt)
    echo: bool = False  # completions: the text (and its log-probabilities) start with the prompt


# The parameters both endpoints take (some only to refuse them with a clear message).
_SHARED_PARAMS = frozenset(
    {
        "model",
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
        "user",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "speculation",
        # vLLM's extensions, sent by the load and benchmark clients
        "ignore_eos",
        "min_tokens",
        "stop_token_ids",
        "include_stop_str_in_output",
        "repetition_penalty",
        "min_p",
        # structured outputs: OpenAI's response_format, vLLM's guided_* extensions
        "response_format",
        "guided_json",
        "guided_regex",
        "guided_grammar",
    }
)
COMPLETION_PARAMS = _SHARED_PARAMS | {"prompt", "echo", "best_of", "suffix"}
CHAT_PARAMS = _SHARED_PARAMS | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "chat_template_kwargs",
}

_SPEC_MODES = {
    "auto": pb.SPECULATION_MODE_AUTO,
    "on": pb.SPECULATION_MODE_ON,
    "off": pb.SPECULATION_MODE_OFF,
}
_DRAFTERS = {"auto": pb.DRAFTER_AUTO, "model": pb.DRAFTER_MODEL, "lookup": pb.DRAFTER_LOOKUP}


def _shared_params(
    body: Mapping[str, Any], req: pb.GenerateRequest, allowed: frozenset[str], model_id: str
) -> tuple[str, bool, bool, bool]:
    """Model, sampling, stop, streaming and speculation: the parameters both endpoints share."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(unknown[0], "unrecognized request argument", "unknown_parameter")
    model = body.get("model")
    if model is None:
        raise invalid("model", "required (GET /v1/models lists it)", "missing_required_parameter")
    if not isinstance(model, str):
        raise invalid("model", f"must be a string, got {json_type(model)}", "invalid_type")
    if model != model_id:
        raise invalid(
            "model",
            f"the model {model!r} is not served here (only {model_id!r})",
            "model_not_found",
        )

    # Defaults as OpenAI's: temperature 1 (sampling) when unset; 0 = greedy.
    temperature = read_number(body, "temperature")
    req.temperature = 1.0 if temperature is None else temperature
    top_p = read_number(body, "top_p")
    if top_p is not None:
        req.top_p = top_p  # optional in the proto: an explicit 0 is refused, not read as unset
    top_k = read_int(body, "top_k")
    if top_k is not None:
        req.top_k = 0 if top_k == -1 else top_k  # vLLM: -1 (or 0) = no top-k filter
    seed = read_int(body, "seed", INT64)
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
            "stop", f"must be a string or a list of strings, got {json_type(stop)}", "invalid_type"
        )

    _vllm_extensions(body, req)
    _processing(body, req)
    _structured_output(body, req)
    n = read_int(body, "n")
    if n is not None:
        req.n = n  # its range is the router's check, as over gRPC
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", "must be a string", "invalid_type")

    stream = bool(read_bool(body, "stream"))
    include_usage = continuous = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise invalid("stream_options", "must be an object", "invalid_type")
        if not stream:
            raise invalid("stream_options", "only allowed when stream is true")
        extra = sorted(set(opts) - {"include_usage", "continuous_usage_stats"})
        if extra:
            raise invalid(f"stream_options.{extra[0]}", "unrecognized", "unknown_parameter")
        include_usage = bool(read_bool(opts, "include_usage"))
        continuous = bool(read_bool(opts, "continuous_usage_stats"))

    spec = body.get("speculation")
    if spec is not None:
        _speculation(spec, req)
    return model, stream, include_usage, continuous


def _vllm_extensions(body: Mapping[str, Any], req: pb.GenerateRequest) -> None:
    """ignore_eos, stop_token_ids, include_stop_str_in_output, min_tokens as the proto's."""
    req.ignore_eos = bool(read_bool(body, "ignore_eos"))
    req.include_stop_str_in_output = bool(read_bool(body, "include_stop_str_in_output"))
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids
        ):
            raise invalid("stop_token_ids", "must be a list of token ids", "invalid_type")
        if any(not 0 <= t < 2**31 for t in ids):
            raise invalid("stop_token_ids", "token ids must be >= 0")
        req.stop_token_ids.extend(ids)
    min_tokens = read_int(body, "min_tokens")
    if min_tokens is not None:
        req.min_tokens = min_tokens  # its range is the router's check, as over gRPC


def _processing(body: Mapping[str, Any], req: pb.GenerateRequest) -> None:
    """The logits-processing parameters (OpenAI's penalties and logit_bias; vLLM's
    repetition_penalty and min_p); their ranges are the router's checks, as over gRPC."""
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        value = read_number(body, name)
        if value is not None:
            setattr(req, name, value)
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise invalid("logit_bias", "must be an object of token id -> bias", "invalid_type")
    for key, value in bias.items():
        try:
            token = int(key)  # JSON keys are strings: "1234"
        except ValueError:
            raise invalid("logit_bias", f"keys must be token ids, got {key!r}") from None
        if not INT32[0] <= token <= INT32[1]:
            raise invalid("logit_bias", f"token id {token} is out of range")
        try:
            req.logit_bias[token] = read_number({"logit_bias": value}, "logit_bias")
        except APIError as err:
            raise invalid("logit_bias", f"token {key}: {err.message.split(': ', 1)[1]}") from None


STRUCTURED_PARAMS = ("response_format", "guided_json", "guided_regex", "guided_grammar")


def _structured_param(body: Mapping[str, Any]) -> str:
    return next((k for k in STRUCTURED_PARAMS if body.get(k) is not None), "")


def _structured_output(body: Mapping[str, Any], req: pb.GenerateRequest) -> None:
    """OpenAI's response_format ({"type": "text" | "json_object" | "json_schema", "json_schema":
    {"name", "schema", "strict"}}) and vLLM's guided_json / guided_regex / guided_grammar (Lark),
    one of them at most. Whether a schema, expression or grammar compiles is the router's check."""
    out = req.structured_output
    given = [k for k in STRUCTURED_PARAMS if body.get(k) is not None]
    if len(given) > 1:
        raise invalid(given[1], f"set one of {', '.join(given)}, not several")
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise invalid("response_format", "must be an object", "invalid_type")
        kind = fmt.get("type")
        if kind == "json_object":
            out.json_object = True
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise invalid("response_format.json_schema.schema", "must be an object (a schema)")
            out.json_schema = json.dumps(schema)
        elif kind != "text":
            raise invalid(
                "response_format.type", f"must be text, json_object or json_schema; got {kind!r}"
            )
    schema = body.get("guided_json")
    if schema is not None:
        if isinstance(schema, str):
            out.json_schema = schema
        elif isinstance(schema, dict):
            out.json_schema = json.dumps(schema)
        else:
            raise invalid(
                "guided_json", "must be a schema (an object or its JSON text)", "invalid_type"
            )
    for key, field in (("guided_regex", "regex"), ("guided_grammar", "lark")):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise invalid(key, "must be a string", "invalid_type")
            setattr(out, field, value)


def _speculation(spec: Any, req: pb.GenerateRequest) -> None:
    """The extension field {"mode": "auto"|"on"|"off", "num_draft_tokens": k,
    "drafter": "auto"|"model"|"lookup"}, as the proto's."""
    if not isinstance(spec, dict):
        raise invalid("speculation", f"must be an object, got {json_type(spec)}", "invalid_type")
    extra = sorted(set(spec) - {"mode", "num_draft_tokens", "drafter"})
    if extra:
        raise invalid(
            f"speculation.{extra[0]}",
            "unrecognized (use mode, num_draft_tokens, drafter)",
            "unknown_parameter",
        )
    drafter = spec.get("drafter")
    if drafter is not None:
        if not isinstance(drafter, str) or drafter.lower() not in _DRAFTERS:
            raise invalid(
                "speculation.drafter", f"must be one of auto, model, lookup; got {drafter!r}"
            )
        req.speculation.drafter = _DRAFTERS[drafter.lower()]
    mode = spec.get("mode")
    if mode is not None:
        if not isinstance(mode, str) or mode.lower() not in _SPEC_MODES:
            raise invalid("speculation.mode", f"must be one of auto, on, off; got {mode!r}")
        req.speculation.mode = _SPEC_MODES[mode.lower()]
    try:
        k = read_int(spec, "num_draft_tokens")
    except APIError as exc:
        raise invalid(
            "speculation.num_draft_tokens",
            exc.message.split(": ", 1)[1],
            exc.code or "invalid_value",
        ) from None
    if k is not None:
        req.speculation.num_draft_tokens = k


def _max_tokens(body: Mapping[str, Any], req: pb.GenerateRequest, key: str) -> None:
    value = read_int(body, key)
    if value is not None:
        req.max_new_tokens = value  # unset: the router's default


def completion_request(
    body: Mapping[str, Any], *, model_id: str
) -> tuple[pb.GenerateRequest, Options]:
    """POST /v1/completions -> the proto request (values checked later by the router)."""
    req = pb.GenerateRequest()
    model, stream, include_usage, continuous = _shared_params(
        body, req, COMPLETION_PARAMS, model_id
    )
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        req.prompt = prompt  # "" is refused by the router, as over gRPC
    elif isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        bad = next((t for t in prompt if not INT32[0] <= t <= INT32[1]), None)
        if bad is not None:
            raise invalid("prompt", f"token id {bad} is out of range")
        req.prompt_token_ids.extend(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise refused("prompt", "one prompt per request: a string or a list of token ids")
    elif prompt is None:
        raise invalid("prompt", "required", "missing_required_parameter")
    else:
        raise invalid("prompt", "must be a string or a list of token ids", "invalid_type")
    _max_tokens(body, req, "max_tokens")
    top = read_int(body, "logprobs")  # legacy: the N most likely, beside the chosen token
    if top is not None:
        req.logprobs = top  # its range is the router's check, as over gRPC
    echo = bool(read_bool(body, "echo"))
    if echo and top is not None:
        req.prompt_logprobs = top  # the echoed prompt's log-probabilities too
    best_of = read_int(body, "best_of")
    if best_of is not None and best_of != 1:
        raise refused("best_of", "one candidate per request")
    if body.get("suffix") is not None:
        raise refused("suffix", "no insertion (fill-in-the-middle)")
    return req, Options(
        model,
        stream,
        include_usage,
        continuous_usage=continuous,
        logprobs=top is not None,
        structured_param=_structured_param(body),
        n=max(1, req.n),
        echo=echo,
    )


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_request(
    body: Mapping[str, Any], *, model_id: str, tokenizer: Any
) -> tuple[pb.GenerateRequest, Options]:
    """POST /v1/chat/completions: the messages rendered by the target tokenizer's chat template
    (`apply_chat_template(..., add_generation_prompt=True)`) become the prompt text."""
    req = pb.GenerateRequest()
    model, stream, include_usage, continuous = _shared_params(body, req, CHAT_PARAMS, model_id)
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
    logprobs = bool(read_bool(body, "logprobs"))
    top = read_int(body, "top_logprobs")
    if top is not None and not logprobs:
        raise invalid("top_logprobs", "only with logprobs: true")
    if logprobs:
        req.logprobs = top or 0  # its range is the router's check, as over gRPC
    for name in ("tools", "functions"):
        if body.get(name):
            raise refused(name, "no tool calling")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none", "auto"):
            raise refused(name, "no tool calling")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise invalid("chat_template_kwargs", "must be an object", "invalid_type")
    try:
        req.prompt = tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=True, **kwargs
        )
    except Exception as exc:  # noqa: BLE001 - the template's own complaint (roles, ...)
        raise invalid("messages", f"the chat template refused them: {exc}") from None
    return req, Options(
        model,
        stream,
        include_usage,
        chat=True,
        max_tokens_param=key,
        continuous_usage=continuous,
        logprobs=logprobs,
        structured_param=_structured_param(body),
        n=max(1, req.n),
    )


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
                raise refused(f"{where}.content[{j}]", "only text content parts")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise invalid(f"{where}.content", "must be a string or text parts", "invalid_type")
    return {"role": role, "content": content}
