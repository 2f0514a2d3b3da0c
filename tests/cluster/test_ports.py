"""Ports chosen for servers that start later must not come from the ephemeral range."""

from __future__ import annotations

import random
import socket

from cluster.serve.ports import RAY_WORKER_PORTS_END, ephemeral_start, pick_free_port, port_free


def test_picked_ports_lie_between_ray_worker_ports_and_the_ephemeral_range():
    ports = [pick_free_port() for _ in range(50)]
    assert len(set(ports)) == 50  # never the same port twice in one process
    assert all(RAY_WORKER_PORTS_END <= p < ephemeral_start() for p in ports)
    assert all(port_free(p) for p in ports)


def test_a_listening_port_is_not_free_and_is_never_picked():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        busy = s.getsockname()[1]
        assert not port_free(busy)

        class Always(random.Random):  # offers the busy port first, then others
            def __init__(self) -> None:
                super().__init__(0)
                self.first = True

            def randrange(self, *a, **k):  # type: ignore[override]
                if self.first:
                    self.first = False
                    return busy
                return super().randrange(*a, **k)

        assert pick_free_port(Always()) != busy
