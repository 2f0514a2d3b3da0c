"""The API key: when the cluster's nodes have one (`SPECDEC_API_KEY`, or the variable that
`security.api_key_env` names), every public call needs it as `authorization: Bearer <key>`
(gRPC metadata, or the HTTP header the `openai` client sends); without it UNAUTHENTICATED / 401.
Health and readiness stay open. The key is compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable

import grpc

from cluster.api.validation import RequestError

HEADER = "authorization"
DEFAULT_ENV = "SPECDEC_API_KEY"


def api_key_from_env(name: str = DEFAULT_ENV) -> str | None:
    """The key this process requires (None: none is required)."""
    return os.environ.get(name) or None


def authorized(header: str | None, key: str | None) -> bool:
    """Whether an `authorization` value carries the key (always, when none is required)."""
    if key is None:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header.removeprefix("Bearer ").strip().encode(), key.encode())


def unauthenticated() -> RequestError:
    return RequestError(
        grpc.StatusCode.UNAUTHENTICATED,
        "",
        "a valid API key is required: send `authorization: Bearer <key>`",
    )


def check_metadata(metadata: Iterable[tuple[str, str]] | None, key: str | None) -> None:
    """gRPC: raise UNAUTHENTICATED unless the call's metadata carries the key."""
    if key is None:
        return
    header = next((v for k, v in metadata or () if k.lower() == HEADER), None)
    if not authorized(header, key):
        raise unauthenticated()


def client_metadata(env_name: str = DEFAULT_ENV) -> tuple[tuple[str, str], ...]:
    """What a client sends: the key from its own environment, when it has one."""
    key = api_key_from_env(env_name)
    return ((HEADER, f"Bearer {key}"),) if key else ()
