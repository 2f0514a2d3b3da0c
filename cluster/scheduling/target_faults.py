"""What a step scheduler does when the target fails: a row the target lost or disagrees on is
re-prefilled, a row error fails that row alone, a lost target hands every row to
`on_target_lost` (the router moves them to another replica), and a row's release frees it on
every worker. A mixin of StepScheduler (cluster/scheduling/scheduler.py), whose state it uses:
running, waiting, drafting, target, options, on_target_lost. No ray, no grpc.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future

from cluster.scheduling.rows import Row
from cluster.scheduling.worker_api import BatchTarget, is_worker_loss
from workers.errors import StaleSequenceError, UnknownSequenceError

log = logging.getLogger(__name__)


class _TargetLost(Exception):
    pass


# (rows to move, the error) -> None; called on the scheduler thread, once, when the target fails.
TargetLostHandler = Callable[[list[Row], BaseException], None]


class TargetFaults:
    def _row_target_error(self, row: Row, exc: BaseException) -> None:
        if isinstance(exc, UnknownSequenceError | StaleSequenceError):
            # The target lost (or disagrees on) this row: recover by re-prefilling it.
            log.warning("%s: re-prefilling %s on the target (%s)", self.name, row.seq_id, exc)
            self.running.remove(row)
            row.on_target = False
            row.ready = None
            self.waiting.appendleft(row)
            return
        self.running.remove(row)
        self._fail(row, exc)

    def _fail(self, row: Row, exc: BaseException) -> None:
        self._release(row)
        row.sink.failed(exc)

    def _target_lost(self, exc: BaseException) -> None:
        log.warning("%s: target lost (%s); moving %d rows", self.name, exc, self.load)
        self._take_inbox()
        self.drafting.poll(wait=True)  # the rows take their draft state along
        rows = [*self.running, *self.waiting]
        self.running.clear()
        self.waiting.clear()
        self.alive = False
        for row in rows:
            row.on_target = False
            row.ready = None
        if self.on_target_lost is not None:
            self.on_target_lost(rows, exc)
        else:
            for row in rows:
                self._release(row)
                row.sink.failed(exc)

    def _target_call(self, call: Callable[[BatchTarget], Future]) -> Future:
        try:
            return call(self.target)
        except Exception as exc:
            if is_worker_loss(exc):
                raise _TargetLost() from exc
            raise

    def _target_wait(self, fut: Future) -> list:
        try:
            return fut.result(timeout=self.options.target_timeout_s)
        except Exception as exc:
            if is_worker_loss(exc):
                raise _TargetLost() from exc
            raise

    def _release(self, row: Row) -> None:
        """Free the row on every worker (also after errors and cancellation)."""
        if row.on_target:
            try:
                self.target.release(row.seq_id)
            except Exception:  # noqa: BLE001 - a dead target has nothing left to free
                pass
            row.on_target = False
        self.drafting.drop_lease(row)
        row.ready = None
        row.released.set()
