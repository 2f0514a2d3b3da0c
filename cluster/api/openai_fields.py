"""Typed reads of an OpenAI request body: the body as a JSON object, and one field of it as an
integer, a number or a boolean, with a 400 naming the field when its JSON type is wrong."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cluster.api.openai_errors import APIError, invalid

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


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


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else "number"
    )


def read_int(body: Mapping[str, Any], key: str, bounds: tuple[int, int] = INT32) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    # bool is an int in Python; JSON true is not a number. 2.0 is accepted as OpenAI does.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(key, f"must be an integer, got {json_type(value)}", "invalid_type")
    if not bounds[0] <= value <= bounds[1]:
        raise invalid(key, f"{value} is out of range", "invalid_value")
    return value


def read_number(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(key, f"must be a number, got {json_type(value)}", "invalid_type")
    try:
        return float(value)
    except OverflowError:  # an integer literal of hundreds of digits
        raise invalid(key, "is out of range", "invalid_value") from None


def read_bool(body: Mapping[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise invalid(key, f"must be a boolean, got {json_type(value)}", "invalid_type")
    return value
