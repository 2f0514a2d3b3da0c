"""What a step scheduler does when the target fails: a row the target lost or disagrees on is
re-prefilled, a row error fails that row alone, a lost target hands every row to
`on_target_lost` (the router moves them to another replica), and a row's release frees it on
every worker. A mixin of StepScheduler (cluster/scheduling/scheduler.py), whose state it uses:
running, waiting, drafting, target, options, on_target_lost. No ray, no grpc.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future

from cluster.scheduling.rows import Row
from cluster.scheduling.worker_api import BatchTarget, WorkerBusy, is_worker_loss
from workers.errors import StaleSequenceError, UnknownSequenceError

log = logging.getLogger(__name__)


class _TargetLost(Exception):
    pass


# (rows to move, the error) -> None; called on the scheduler thread, once, when the target fails.
TargetLostHandler = Callable[[list[Row], BaseException], None]

# Pauses before each new try of a call the target refused whole for now (WorkerBusy): a worker
# that still refuses after these (~1.5 s) is as good as gone, and its rows move. Every target call
# may be sent again: a prefill frees what the sequence held first; a verify starts from the
# committed length it names.
BUSY_PAUSES_S = (0.05, 0.1, 0.2, 0.4, 0.8)


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
        except WorkerBusy as exc:  # refused at once: answered like a refusal through the future
            out: Future = Future()
            out.set_exception(exc)
            return out
        except Exception as exc:
            if is_worker_loss(exc):
                raise _TargetLost() from exc
            raise

    def _target_wait(self, fut: Future, call: Callable[[BatchTarget], Future]) -> list:
        """The call's per-row answers. A call the target refused whole for now is sent again
        after a pause (BUSY_PAUSES_S), the rows staying where they are; a lost target, or one
        that refuses past the pauses, raises _TargetLost (its rows move)."""
        for pause in (*BUSY_PAUSES_S, None):
            try:
                return fut.result(timeout=self.options.target_timeout_s)
            except WorkerBusy as exc:
                if pause is None:
                    raise _TargetLost() from exc
                log.warning("%s: the target refused a call for now (%s); again in %.2fs",
                            self.name, exc, pause)  # fmt: skip
                self.busy_retries += 1
                time.sleep(pause)
                fut = self._target_call(call)
            except Exception as exc:
                if is_worker_loss(exc):
                    raise _TargetLost() from exc
                raise
        raise AssertionError("unreachable")

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
