"""Leases: every sequence a worker holds belongs to the caller that prefilled it (its "owner", a
scheduler process, named in each call's `specdec-owner` metadata); the owner renews its lease with
every call it makes (a scheduler with nothing to send calls Stats every few seconds). An owner
not heard from for the lease timeout is gone (crashed, restarted, partitioned away): the worker
frees its sequences and their KV, so a dead caller leaves nothing behind.

Pure bookkeeping (the gRPC servicer in workers/service.py feeds it and frees what expires);
sequences prefilled without an owner are never reaped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

OWNER_KEY = "specdec-owner"  # the gRPC metadata key that names a call's owner


class LeaseBook:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not timeout_s > 0:
            raise ValueError(f"lease timeout must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}  # owner -> last call
        self._owner_of: dict[str, str] = {}  # seq id -> owner

    def seen(self, owner: str | None) -> None:
        """A call from `owner`: its lease runs for another timeout."""
        if owner:
            with self._lock:
                self._seen[owner] = self.clock()

    def own(self, owner: str | None, seq_ids: Iterable[str]) -> None:
        """`owner` prefilled these sequences (they are freed when its lease runs out)."""
        if owner:
            with self._lock:
                self._seen[owner] = self.clock()
                for seq in seq_ids:
                    self._owner_of[seq] = owner

    def released(self, seq_id: str) -> None:
        with self._lock:
            self._owner_of.pop(seq_id, None)

    def expired(self) -> list[str]:
        """The sequences of owners not heard from within the timeout, forgotten here (the caller
        frees them on the worker)."""
        with self._lock:
            now = self.clock()
            gone = {o for o, t in self._seen.items() if now - t > self.timeout_s}
            if not gone:
                return []
            seqs = [s for s, o in self._owner_of.items() if o in gone]
            for s in seqs:
                del self._owner_of[s]
            for o in gone:
                del self._seen[o]
            return seqs

    @property
    def owned(self) -> int:
        with self._lock:
            return len(self._owner_of)
