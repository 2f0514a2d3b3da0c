"""The Serve layer's pure parts: the worker registry and the ingress's error mapping (no Ray)."""

from __future__ import annotations

import re

import grpc
import pytest

from cluster.api.validation import RequestError
from cluster.serve import registry
from cluster.serve.grpc_errors import grpc_status_for, handler_failure
from cluster.serve.registry import Registry


def test_registry_registers_renews_and_expires(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(registry.time, "monotonic", lambda: now[0])
    reg = Registry(ttl_s=5.0)
    assert reg.snapshot() == {"drafts": [], "targets": [], "version": 0, "warm": False}
    reg.register("draft", "d1", "10.0.0.1:7001")
    reg.register("target", "t1", "10.0.0.2:7002")
    v = reg.register("draft", "d1", "10.0.0.1:7001")  # a heartbeat changes nothing
    snap = reg.snapshot()
    assert snap["drafts"] == ["10.0.0.1:7001"] and snap["targets"] == ["10.0.0.2:7002"]
    assert snap["version"] == v == 2
    now[0] += 4.0
    reg.register("target", "t1", "10.0.0.2:7002")  # renewed; d1 is not
    now[0] += 2.0  # d1 unseen for 6 s > TTL: expired (a killed replica never unregisters)
    snap = reg.snapshot()
    assert snap == {"drafts": [], "targets": ["10.0.0.2:7002"], "version": 3, "warm": True}
    reg.register("draft", "d2", "10.0.0.1:7005")  # Serve's replacement, on a new port
    assert reg.unregister("t1") == 5 and reg.unregister("t1") == 5
    assert reg.snapshot()["drafts"] == ["10.0.0.1:7005"]
    with pytest.raises(ValueError, match="kind"):
        reg.register("router", "x", "a:1")


class FakeContext:
    def __init__(self) -> None:
        self.code = self.details = None

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details) -> None:
        self.details = details


@pytest.mark.parametrize(
    ("exc", "code", "details"),
    [
        (
            RequestError(grpc.StatusCode.INVALID_ARGUMENT, "top_p", "must be in (0, 1]"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_p: must be in (0, 1]",
        ),
        (
            RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "", "at its limit"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "at its limit",
        ),
        (TimeoutError("5 s"), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"),
    ],
)
def test_failures_map_to_a_code_and_one_clean_line(exc, code, details):
    assert grpc_status_for(exc) == (code, details)
    ctx = FakeContext()
    raised = handler_failure(ctx, exc)
    assert (ctx.code, ctx.details) == (code, details) and str(raised) == details


def test_our_own_failures_are_internal_with_an_id_in_the_log_and_nothing_else(caplog):
    """No exception type, message, address or trace reaches the client: an id that the logged
    exception carries."""
    secret = ValueError("shape mismatch at 10.1.2.3:7001 in actor 4f2a")
    code, details = grpc_status_for(secret)
    assert code == grpc.StatusCode.INTERNAL
    error_id = re.fullmatch(r"internal error \(id ([0-9a-f]{12}); the server logged it\)", details)
    assert error_id, details
    logged = [r for r in caplog.records if error_id.group(1) in r.getMessage()]
    assert logged and logged[0].exc_info[1] is secret


def test_multiline_messages_become_one_line():
    ctx = FakeContext()
    handler_failure(ctx, RuntimeError("first\n  Traceback (most recent call last):\n  x"))
    assert "\n" not in ctx.details and ctx.code == grpc.StatusCode.INTERNAL
