"""The model thread: the single entry point for a worker's model work (`Call`, `Executor`,
`SerialExecutor`). Both callers of a served worker, its gRPC service and (in a Serve target
replica) its own scheduler, submit here, so the model runs one call at a time on one thread.
No grpc.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Call:
    """One worker method call: `getattr(worker, method)(seq_id, *args)` (release), or, for a
    batched method (seq_id None: prefill_batch, propose_batch, verify_batch; args = (rows,)),
    `getattr(worker, method)(*args)`."""

    method: str
    seq_id: str | None
    args: tuple = ()

    def run(self, worker: Any) -> Any:
        fn = getattr(worker, self.method)
        return fn(*self.args) if self.seq_id is None else fn(self.seq_id, *self.args)


class Executor(Protocol):
    def submit(self, call: Call) -> Future: ...


def load_threads() -> None:
    """Make the calling thread, which loads a model that SerialExecutor's thread will run,
    use one torch thread: then it never starts an OpenMP team of its own (see SerialExecutor)."""
    import torch

    torch.set_num_threads(1)


class SerialExecutor:
    """Runs the worker's calls one at a time on one dedicated thread.

    One thread, not a lock taken in each gRPC handler thread: torch's OpenMP runtime keeps a team
    of threads per calling thread, so model calls from many handler threads would leave several
    teams competing for the cores (measured here: a target pass twice as slow).

    `threads`: the model thread's torch threads. Load the model with one (`load_threads()`):
    once a second thread's team exists, GNU OpenMP sees more threads than cores and stops
    spinning between parallel regions, and each of a step's ~450 regions waits on a wake-up
    (SmolLM2 bf16, one token: 28 ms on the thread that loaded it, 37 ms on another).
    """

    def __init__(self, worker: Any, threads: int | None = None) -> None:
        self.worker = worker
        init = None
        if threads:

            def init() -> None:
                import torch

                torch.set_num_threads(threads)

        self._thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="model", initializer=init
        )

    def submit(self, call: Call) -> Future:
        return self._thread.submit(call.run, self.worker)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
