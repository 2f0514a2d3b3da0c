"""How the schedulers find the workers: a registry deployment of worker addresses, renewed by
heartbeats, and the poll loop that reads it.

Serve routes requests to *a* replica, but a scheduler must talk to each worker replica directly (a
sequence's KV lives on one draft and one target). So every worker replica registers `kind, replica
id, host:port` with the registry deployment when it starts and again every `workers.heartbeat_s`
(a heartbeat), and unregisters when Serve stops it. An address not renewed for
`workers.registry_ttl_s` expires (a killed replica never unregisters). The target replicas'
schedulers and the ingress poll the registry (`poll_registry`); a router drops an address whose
calls fail and takes it back when the registry lists it again. A replica that Serve restarts comes
back on a new port and is picked up by the next poll. A restarted registry starts empty: until it
has seen one TTL of heartbeats its snapshot is marked cold and pollers only add addresses, never
remove them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.config import ClusterConfig

log = logging.getLogger("ray.serve")

DRAFT, TARGET = "draft", "target"  # the kinds of worker replica


class Registry:
    """Worker addresses by replica id, renewed by heartbeats, expired after a TTL."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = float(ttl_s)
        self.started = time.monotonic()
        self._entries: dict[str, tuple[str, str, float]] = {}  # id -> (kind, address, seen)
        self.version = 0

    def register(self, kind: str, replica_id: str, address: str) -> int:
        if kind not in (DRAFT, TARGET):
            raise ValueError(f"kind must be {DRAFT!r} or {TARGET!r}, got {kind!r}")
        old = self._entries.get(replica_id)
        self._entries[replica_id] = (kind, address, time.monotonic())
        if old is None or old[:2] != (kind, address):
            self.version += 1
        return self.version

    def unregister(self, replica_id: str) -> int:
        if self._entries.pop(replica_id, None) is not None:
            self.version += 1
        return self.version

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        expired = [r for r, (_, _, seen) in self._entries.items() if now - seen > self.ttl_s]
        for r in expired:
            del self._entries[r]
            self.version += 1
        by_kind: dict[str, list[str]] = {DRAFT: [], TARGET: []}
        for kind, address, _ in self._entries.values():
            by_kind[kind].append(address)
        return {
            "drafts": sorted(by_kind[DRAFT]),
            "targets": sorted(by_kind[TARGET]),
            "version": self.version,
            "warm": now - self.started >= self.ttl_s,
        }


@serve.deployment(name="SpecDecodeRegistry", num_replicas=1, ray_actor_options={"num_cpus": 0})
class RegistryDeployment(Registry):
    async def check_health(self) -> None:  # nothing can go wrong that a restart would fix
        return None


async def poll_registry(
    registry: DeploymentHandle,
    period_s: float,
    apply: Callable[[tuple[str, ...], tuple[str, ...]], None],
    what: str,
) -> None:
    """Forever: read the registry's snapshot and hand the live addresses to `apply(drafts,
    targets)` when they change. A restarted registry starts empty: until it has seen one TTL of
    heartbeats its snapshot is marked cold and addresses are only added, never removed."""
    known: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    while True:
        try:
            snap = await registry.snapshot.remote()
            drafts, targets = tuple(snap["drafts"]), tuple(snap["targets"])
            if not snap["warm"]:
                drafts = tuple(sorted(set(drafts) | set(known[0])))
                targets = tuple(sorted(set(targets) | set(known[1])))
            if (drafts, targets) != known:
                known = (drafts, targets)
                apply(drafts, targets)
                log.info("%s: workers drafts=%s targets=%s", what, drafts, targets)
        except Exception as exc:  # noqa: BLE001 - registry restarting; keep the old list
            log.warning("%s: registry poll failed: %s", what, exc)
        await asyncio.sleep(period_s)


def poll_period(cfg: ClusterConfig) -> float:
    return max(0.2, min(1.0, cfg.workers.heartbeat_s / 2))
