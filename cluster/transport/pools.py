"""Worker pools: the addresses of one kind of worker, their health, and the least-loaded choice.

`WorkerPool` checks each address with a Stats call as soon as it is set (role, tokenizer
fingerprint, context), picks the least-loaded healthy one, drops an address that fails from
rotation, and takes it back when a recheck sees it healthy or when it is set again. An `Endpoint`
is also the draft lease of the rows bound to that worker (`key`).

The checks run on threads of their own: a probe waits up to `probe_timeout_s` for a worker that
may be starting or gone, and neither the scheduler's thread (a whole batch) nor an event loop
(every stream of a replica) may wait on it. `acquire(wait=False)` passes over addresses not
checked yet; `acquire()` waits for their check (a caller that has nothing else to do).
"""

from __future__ import annotations

import concurrent.futures
import enum
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from cluster.transport.grpc_workers import GrpcDraft, GrpcTarget
from cluster.transport.remote_errors import RemoteWorkerError
from protos import worker_pb2

log = logging.getLogger(__name__)

OnUnavailable = Callable[[str, Exception], None]  # (address, why): the pool's mark_down
# A side served by this very process, made for an address given the pool's mark_down
# (cluster/transport/same_process.py).
LocalSide = Callable[[OnUnavailable], Any]


class EndpointState(enum.Enum):
    UNCHECKED = "unchecked"  # set, its first probe not answered yet
    UP = "up"
    DOWN = "down"  # failed: out of rotation until a recheck sees it healthy or it is set again
    REJECTED = "rejected"  # answers, but serves the wrong thing (role, tokenizer): until set again


@dataclass(eq=False)
class Endpoint:
    address: str
    side: GrpcDraft | GrpcTarget
    state: EndpointState = EndpointState.UNCHECKED
    error: str = ""
    in_flight: int = 0  # sequences bound to it
    active: bool = True  # False once removed by set(); closed when its last sequence ends
    info: worker_pb2.ModelInfo | None = None
    order: int = field(default=0)

    @property
    def key(self) -> str:  # a DraftLease: rows of one worker share one batched call
        return self.address


class WorkerPool:
    """The addresses of one kind of worker (role "draft" or "target"). Thread-safe.

    `check(info)` returns None when a worker's ModelInfo is acceptable, else why not.
    """

    def __init__(
        self,
        role: str,
        check: Callable[[worker_pb2.ModelInfo], str | None],
        *,
        timeout_s: float,
        probe_timeout_s: float = 2.0,
        local: Mapping[str, LocalSide] | None = None,
    ) -> None:
        """`local`: address -> a factory of the side to use there instead of a gRPC client
        (given the pool's `mark_down`): a worker served by this very process."""
        if role not in ("draft", "target"):
            raise ValueError(f"role must be 'draft' or 'target', got {role!r}")
        self.role = role
        self._check = check
        self.timeout_s = timeout_s
        self.probe_timeout_s = probe_timeout_s
        self._local = dict(local or {})
        self._lock = threading.Lock()
        self._endpoints: dict[str, Endpoint] = {}  # every address still referenced
        self._order = itertools.count()
        self._rr = itertools.count()
        self._probes: dict[str, concurrent.futures.Future] = {}  # address -> its check in flight

    # -- membership -------------------------------------------------------------------------

    def set(self, addresses: Iterable[str]) -> None:
        """Replace the pool. Kept addresses keep their state, except that a down or rejected one
        is checked again; removed ones serve their current sequences, then close."""
        wanted = list(dict.fromkeys(str(a) for a in addresses))
        to_close = []
        with self._lock:
            for addr in wanted:
                ep = self._endpoints.get(addr)
                if ep is None:
                    self._endpoints[addr] = Endpoint(
                        addr, self._new_side(addr), order=next(self._order)
                    )
                else:
                    ep.active = True
                    if ep.state in (EndpointState.DOWN, EndpointState.REJECTED):
                        ep.state, ep.error = EndpointState.UNCHECKED, ""
            for addr, ep in list(self._endpoints.items()):
                if addr not in wanted and ep.active:
                    ep.active = False
                    if ep.in_flight == 0:
                        to_close.append(self._endpoints.pop(addr))
            unchecked = [
                ep
                for ep in self._endpoints.values()
                if ep.active and ep.state is EndpointState.UNCHECKED
            ]
        for ep in to_close:
            ep.side.close()
        for ep in unchecked:
            self._probe_soon(ep)

    @property
    def configured(self) -> bool:
        with self._lock:
            return any(ep.active for ep in self._endpoints.values())

    def addresses(self) -> list[str]:
        with self._lock:
            return [a for a, ep in self._endpoints.items() if ep.active]

    def _new_side(self, address: str) -> GrpcDraft | GrpcTarget:
        local = self._local.get(address)
        if local is not None:
            return local(self.mark_down)
        cls = GrpcDraft if self.role == "draft" else GrpcTarget
        return cls(address, timeout_s=self.timeout_s, on_unavailable=self.mark_down)

    # -- use --------------------------------------------------------------------------------

    def acquire(self, exclude: Iterable[str] = (), *, wait: bool = True) -> Endpoint | None:
        """The least-loaded healthy endpoint (round robin among equals), counted as in use until
        `release`; None when there is none. An endpoint whose first check has not answered yet
        is waited for when `wait`, else passed over (its check goes on in the background)."""
        exclude = set(exclude)
        with self._lock:
            cands = [
                ep
                for ep in self._endpoints.values()
                if ep.active
                and ep.address not in exclude
                and ep.state in (EndpointState.UP, EndpointState.UNCHECKED)
            ]
            n, rr = max(1, len(cands)), next(self._rr)
            cands.sort(key=lambda ep: ep.order)
            ranked = sorted(enumerate(cands), key=lambda p: (p[1].in_flight, (p[0] - rr) % n))
            cands = [ep for _, ep in ranked]
        for ep in cands:
            if ep.state is EndpointState.UNCHECKED:
                check = self._probe_soon(ep)
                if not wait:
                    continue
                check.result()
            with self._lock:
                if ep.active and ep.state is EndpointState.UP:
                    ep.in_flight += 1
                    return ep
        return None

    def hold(self, ep: Endpoint) -> Endpoint:
        """Count one more use of an endpoint already acquired (rows placed together)."""
        with self._lock:
            ep.in_flight += 1
        return ep

    def release(self, ep: Endpoint) -> None:
        close = False
        with self._lock:
            ep.in_flight = max(0, ep.in_flight - 1)
            if not ep.active and ep.in_flight == 0 and self._endpoints.get(ep.address) is ep:
                del self._endpoints[ep.address]
                close = True
        if close:
            ep.side.close()

    def mark_down(self, address: str, reason: BaseException | str) -> None:
        with self._lock:
            ep = self._endpoints.get(address)
            if ep is None or ep.state is EndpointState.REJECTED:
                return
            was = ep.state
            ep.state, ep.error = EndpointState.DOWN, str(reason)
        if was is not EndpointState.DOWN:
            log.warning("%s worker %s out of rotation: %s", self.role, address, reason)

    def checking(self, exclude: Iterable[str] = ()) -> bool:
        """Whether an endpoint (not in `exclude`) awaits its first check: `acquire()` may still
        find one where `acquire(wait=False)` found none."""
        exclude = set(exclude)
        with self._lock:
            return any(
                ep.active and ep.state is EndpointState.UNCHECKED and ep.address not in exclude
                for ep in self._endpoints.values()
            )

    # -- health -----------------------------------------------------------------------------

    def _probe_soon(self, ep: Endpoint) -> concurrent.futures.Future:
        """The endpoint's check, on a thread of its own; one at a time per address."""
        with self._lock:
            fut = self._probes.get(ep.address)
            if fut is not None:
                return fut
            fut = self._probes[ep.address] = concurrent.futures.Future()

        def run() -> None:
            state = EndpointState.DOWN
            try:
                state = self.probe(ep)
            finally:
                with self._lock:
                    self._probes.pop(ep.address, None)
                fut.set_result(state)

        threading.Thread(target=run, name=f"{self.role}-probe", daemon=True).start()
        return fut

    def probe(self, ep: Endpoint) -> EndpointState:
        """Stats call: up, down (no answer) or rejected (wrong role / tokenizer / model)."""
        try:
            stats = ep.side.stats(self.probe_timeout_s)
        except RemoteWorkerError as exc:
            info = None
            if exc.code is grpc.StatusCode.UNIMPLEMENTED:  # another service answers there
                state = EndpointState.REJECTED
                error = f"it does not serve the {self.role} worker API ({exc})"
                log.error("%s worker %s rejected: %s", self.role, ep.address, error)
            else:
                state, error = EndpointState.DOWN, str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure: not usable now
            state, error, info = EndpointState.DOWN, str(exc), None
        else:
            info = stats.model
            problem = self._check(info)
            if problem:
                state, error = EndpointState.REJECTED, problem
                log.error("%s worker %s rejected: %s", self.role, ep.address, problem)
            else:
                state, error = EndpointState.UP, ""
        with self._lock:
            ep.state, ep.error = state, error
            if info is not None:
                ep.info = info
        return state

    def recheck(self, states: Sequence[EndpointState] = (EndpointState.DOWN,)) -> None:
        with self._lock:
            eps = [ep for ep in self._endpoints.values() if ep.active and ep.state in states]
        for ep in eps:
            self.probe(ep)

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "address": ep.address,
                    "state": ep.state.value,
                    "error": ep.error,
                    "in_flight": ep.in_flight,
                    "active": ep.active,
                }
                for ep in self._endpoints.values()
            ]

    def close(self) -> None:
        with self._lock:
            eps = list(self._endpoints.values())
            self._endpoints.clear()
        for ep in eps:
            ep.side.close()
