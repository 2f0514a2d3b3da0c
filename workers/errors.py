"""Errors a worker answers with; the gRPC layer maps each to a status code."""


class StaleSequenceError(RuntimeError):
    """The caller assumed a committed length the worker does not hold; nothing was changed."""


class UnknownSequenceError(KeyError):
    """No live sequence with that id on this worker (never prefilled, released, or lost)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown sequence"


class KVBudgetExceeded(RuntimeError):
    """Admitting the sequence would pass the worker's KV budget; nothing was changed. The caller
    waits for room or answers RESOURCE_EXHAUSTED: a worker never runs out of memory instead."""
