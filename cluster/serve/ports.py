"""Picking listening ports that stay free until a server binds them.

A port the kernel hands out for `bind(0)` comes from the ephemeral range, the same range it uses
for the source port of every outgoing connection. Between choosing such a port and a server
(Serve's gRPC proxy, started seconds later inside Ray) binding it, any of the hundreds of
connections Ray opens meanwhile may take it as a source port, and the bind fails ("Failed to bind
to address [::]:44293"). So ports are chosen below the ephemeral range and above Ray's worker
port range (10002-19999), where nothing takes ports unasked.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

RAY_WORKER_PORTS_END = 20000  # Ray's default max_worker_port is 19999
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()
_lock = threading.Lock()


def ephemeral_start() -> int:
    """First port of the kernel's ephemeral range (32768 where /proc does not say)."""
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_free(port: int) -> bool:
    """Whether a server could listen on `port` on every address (IPv6 and IPv4 wildcards)."""
    for family, addr in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr, port))
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno in (97, 99):  # no IPv6 on this host
                continue
            return False
    return True


def pick_free_port(rng: random.Random | None = None) -> int:
    """A free port between Ray's worker ports and the ephemeral range, never the same one twice
    in this process (two servers started together must not be told the same port)."""
    rng = rng or random.SystemRandom()
    low, high = RAY_WORKER_PORTS_END, ephemeral_start()
    if high - low < 100:  # an unusual kernel setting: fall back to the kernel's choice
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    with _lock:
        for _ in range(1000):
            port = rng.randrange(low, high)
            if port not in _handed_out and port_free(port):
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no free port found in {low}-{high - 1}")
