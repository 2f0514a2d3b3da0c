"""Rows' output into asyncio queues, from the scheduler thread. No ray, no grpc.

A step commits tokens for every row of the batch at once; waking the consumer's event loop once
per row (`call_soon_threadsafe` each) costs a self-pipe write and a loop pass per row, and the
loop thread then fights the scheduler thread for the GIL while the next step is being sent. A
`LoopMailbox` gathers what the scheduler puts for one loop and wakes it once: the first put after
a delivery schedules the delivery, later ones ride along.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from cluster.scheduling.rows import Row
from workers.types import TokenLogprob

END = object()  # the row finished: nothing follows


class Emitted(NamedTuple):
    """Tokens a step committed for a row, with their log-probabilities when it asked."""

    tokens: list[int]
    logprobs: tuple[TokenLogprob, ...] = ()


class LoopMailbox:
    """Items for the queues of one event loop, delivered in one loop callback."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Any]] = []
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        """Raises RuntimeError when the loop is closed."""
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            with self._lock:
                self._scheduled = False
                self._items.clear()
            raise

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


class LoopSink:
    """A row's output into its consumer's queue (the scheduler thread never blocks): `Emitted`
    token lists, then END, or the error `to_error(exc)` made of a failure, each as (index,
    item), so that one queue can gather the n sequences of a request. `on_done(row)` runs on
    the scheduler thread when the row ends either way."""

    def __init__(
        self,
        mailbox: LoopMailbox,
        on_done: Callable[[Row | None], None],
        to_error: Callable[[BaseException], Any],
        queue: asyncio.Queue | None = None,
        index: int = 0,
    ) -> None:
        self.mailbox = mailbox
        self.on_done = on_done
        self.to_error = to_error
        self.queue: asyncio.Queue = asyncio.Queue() if queue is None else queue
        self.index = index
        self.row: Row | None = None

    def _put(self, item: Any) -> None:
        try:
            self.mailbox.put(self.queue, (self.index, item))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            if self.row is not None:
                self.row.cancel()

    def tokens(self, tokens: list[int], logprobs: tuple[TokenLogprob, ...] = ()) -> None:
        self._put(Emitted(tokens, logprobs))

    def finished(self) -> None:
        self.on_done(self.row)
        self._put(END)

    def failed(self, exc: BaseException) -> None:
        self.on_done(self.row)
        self._put(self.to_error(exc))
