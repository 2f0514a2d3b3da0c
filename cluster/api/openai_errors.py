"""OpenAI's error shape, and the router's refusals (`RequestError`) said in OpenAI's terms.

Every failure of the HTTP API answers {"error": {"message", "type", "param", "code"}} with an HTTP
status. A router refusal names a proto field (`RequestError.field`); `error_from_router` maps it
back to the OpenAI parameter the client sent, and the gRPC status to the HTTP one.
"""

from __future__ import annotations

from typing import Any

from protos import specdec_pb2 as pb


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
    """A 400 for a bad request parameter; the message starts with the parameter's name."""
    text = f"{param}: {message}" if param else message
    return APIError(400, text, param=param, code=code)


def refused(param: str, why: str) -> APIError:
    """A 400 for an OpenAI parameter this server does not implement: never silently ignored."""
    return invalid(param, f"not supported by this server ({why})", "unsupported_parameter")


# gRPC status (by name: no grpc import here) -> HTTP status, OpenAI error type.
_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),  # overload: retry later
    "UNAVAILABLE": (503, "service_unavailable_error"),  # no target left, shutting down
    "DEADLINE_EXCEEDED": (408, "timeout_error"),
    "CANCELLED": (499, "cancelled"),  # nginx's "client closed request"
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "invalid_request_error"),  # OpenAI's code: invalid_api_key
}

# The GenerateRequest fields a RequestError may name.
_REQUEST_FIELDS = frozenset(pb.GenerateRequest.DESCRIPTOR.fields_by_name) | {
    "speculation.mode",
    "speculation.num_draft_tokens",
    "speculation.drafter",
}

# Proto field names (RequestError.field) -> OpenAI parameter names.
_PARAMS = {
    "prompt": "prompt",
    "prompt_token_ids": "prompt",
    "max_new_tokens": "max_tokens",
}


def error_from_router(
    code: Any,
    field: str,
    message: str,
    *,
    chat: bool = False,
    max_tokens_param: str = "",
    structured_param: str = "",
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
    if param and param.startswith("structured_output."):
        # what the client sent it as: response_format or one of vLLM's guided_* fields
        param = structured_param or "response_format"
    if chat and param == "logprobs":
        param = "top_logprobs"  # chat's count of alternatives (its logprobs is a flag)
    if param == "max_tokens" and max_tokens_param:
        param = max_tokens_param  # chat: whichever of max_tokens / max_completion_tokens was sent
    text = f"{param}: {message}" if param else message
    return APIError(status, text, param=param, type=kind, code=name.lower())
