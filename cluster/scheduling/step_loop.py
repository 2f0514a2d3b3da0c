"""The thread a step scheduler runs on, and the inbox rows reach it through. No ray, no grpc.

Rows are submitted from any thread; the loop sleeps until there is work and runs one step at a
time. A step that raises fails the rows the scheduler holds instead of hanging their streams;
`close` (or a step that leaves the scheduler dead) ends the loop. What a step does, what counts
as work and how rows end are the scheduler's (scheduler.StepScheduler).
"""

from __future__ import annotations

import abc
import collections
import logging
import threading
from typing import Self

from cluster.scheduling.rows import Row

log = logging.getLogger(__name__)


class StepLoop(abc.ABC):
    """Submitting, waking, starting and closing a scheduler; steps on its own thread (`start()`),
    or one by one (`step()`) in tests."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.alive = True  # False once the loop ended or the target was lost
        self._inbox: collections.deque[Row] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    @abc.abstractmethod
    def step(self) -> bool:
        """One step; False when there was nothing to do."""

    @abc.abstractmethod
    def _has_work(self) -> bool: ...

    @abc.abstractmethod
    def _fail_all(self, exc: BaseException) -> None:
        """A step raised: fail every row held."""

    @abc.abstractmethod
    def _shutdown(self) -> None:
        """The loop ends: end every row held, release it, mark the scheduler not alive."""

    def submit(self, row: Row) -> None:
        self.submit_many([row])

    def submit_many(self, rows: list[Row]) -> None:
        """Rows that arrive together (a request's n samples): the loop takes them in one go."""
        with self._wake:
            if self._closing or not self.alive:
                raise RuntimeError(f"{self.name} is not running")
            self._inbox.extend(rows)
            self._wake.notify()

    def wake(self) -> None:
        """A row was cancelled: let an idle loop notice."""
        with self._wake:
            self._wake.notify()

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """End every row (CANCELLED), release them, stop the loop."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        else:
            self._shutdown()

    def _submitted(self) -> list[Row]:
        """The rows submitted since the last call, in order."""
        with self._wake:
            rows = list(self._inbox)
            self._inbox.clear()
        return rows

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._has_work():
                    self._wake.wait(0.5)
                if self._closing:
                    break
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - a bug must not hang its streams
                log.exception("%s: step failed; failing its rows", self.name)
                self._fail_all(exc)
            if not self.alive:
                return
        self._shutdown()
