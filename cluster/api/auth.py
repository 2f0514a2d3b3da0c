"""API keys: when the cluster's nodes have them (`SPECDEC_API_KEY`, or the variable that
`security.api_key_env` names; several keys comma-separated, for rotation or per-tenant keys),
every public call needs one as `authorization: Bearer <key>` (gRPC metadata, or the HTTP header
the `openai` client sends); without it UNAUTHENTICATED / 401. Health and readiness stay open.
Keys are compared in constant time and never logged. With `limits.max_in_flight_per_key`, one key
may have at most that many requests in flight on an ingress replica; more are
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import grpc

from cluster.api.validation import RequestError

HEADER = "authorization"
DEFAULT_ENV = "SPECDEC_API_KEY"


class APIKeys:
    def __init__(self, keys: Sequence[str], max_in_flight_per_key: int = 0) -> None:
        if not keys:
            raise ValueError("APIKeys needs at least one key")
        self._keys = [k.encode() for k in keys]
        self.max_in_flight_per_key = max_in_flight_per_key  # 0: no limit
        self._in_flight = [0] * len(keys)
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, name: str = DEFAULT_ENV, max_in_flight_per_key: int = 0) -> APIKeys | None:
        """The keys in the environment variable `name` (None: no key is required)."""
        keys = [k.strip() for k in (os.environ.get(name) or "").split(",") if k.strip()]
        return cls(keys, max_in_flight_per_key) if keys else None

    def match(self, header: str | None) -> int | None:
        """Which key an `authorization` value carries (every key compared: constant time)."""
        if not header or not header.startswith("Bearer "):
            return None
        given = header.removeprefix("Bearer ").strip().encode()
        found = None
        for i, key in enumerate(self._keys):
            if hmac.compare_digest(given, key) and found is None:
                found = i
        return found

    @contextmanager
    def in_flight(self, key: int) -> Iterator[None]:
        """One request of key `key` while the block runs (RESOURCE_EXHAUSTED past the limit)."""
        with self._lock:
            limit = self.max_in_flight_per_key
            if limit and self._in_flight[key] >= limit:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "",
                    f"this API key has {limit} requests in flight, its limit",
                )
            self._in_flight[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[key] -= 1


def authorized(header: str | None, keys: APIKeys | None) -> int | None:
    """The index of the key a call carries; -1 when no key is required; None: refused."""
    if keys is None:
        return -1
    return keys.match(header)


def unauthenticated() -> RequestError:
    return RequestError(
        grpc.StatusCode.UNAUTHENTICATED,
        "",
        "a valid API key is required: send `authorization: Bearer <key>`",
    )


def check_metadata(metadata: Iterable[tuple[str, str]] | None, keys: APIKeys | None) -> int:
    """gRPC: the key's index (-1: none required); UNAUTHENTICATED unless the call carries one."""
    header = next((v for k, v in metadata or () if k.lower() == HEADER), None)
    found = authorized(header, keys)
    if found is None:
        raise unauthenticated()
    return found


@contextmanager
def key_in_flight(keys: APIKeys | None, key: int) -> Iterator[None]:
    """`keys.in_flight(key)`, or nothing when no key is required."""
    if keys is None or key < 0:
        yield
    else:
        with keys.in_flight(key):
            yield


def client_metadata(env_name: str = DEFAULT_ENV) -> tuple[tuple[str, str], ...]:
    """What a client sends: the (first) key from its own environment, when it has one."""
    value = (os.environ.get(env_name) or "").split(",")[0].strip()
    return ((HEADER, f"Bearer {value}"),) if value else ()
