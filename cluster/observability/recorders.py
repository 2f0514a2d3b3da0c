"""Turn what the cluster does into metric updates, through a `MetricSink`: a request's stream of
messages at the ingress (`RequestRecorder`), a scheduler's steps in a target replica
(`StepRecorder`, a `SchedulerObserver`), a worker's KV (`record_worker`). Pure: the sink decides
where they go (Ray's metrics in the cluster: ray_sink; a dict in tests: `MemorySink`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Protocol

from cluster.observability.catalog import BY_NAME, MAX_POSITION
from cluster.scheduling.observer import StepRecord

Tags = dict[str, str]

# GenerateResponse.finish_reason -> the request_success label (vLLM's finished_reason values).
_FINISHED = {1: "length", 2: "stop", 3: "eos", 4: "cancelled"}
ABORT = "abort"  # the client went away before the finish (vLLM counts these as "abort")


class MetricSink(Protocol):
    def add(self, name: str, value: float, tags: Tags | None = None) -> None: ...  # counter

    def set(self, name: str, value: float, tags: Tags | None = None) -> None: ...  # gauge

    def observe(self, name: str, value: float, tags: Tags | None = None) -> None: ...


class MemorySink:
    """Counters and gauges in a dict, histogram observations in lists: for tests and the CLI."""

    def __init__(self) -> None:
        self.values: collections.Counter[tuple] = collections.Counter()
        self.observed: dict[tuple, list[float]] = collections.defaultdict(list)

    @staticmethod
    def key(name: str, tags: Tags | None) -> tuple:
        if name not in BY_NAME:
            raise KeyError(f"{name} is not in the metric catalogue")
        return (name, *sorted((tags or {}).items()))

    def add(self, name: str, value: float, tags: Tags | None = None) -> None:
        if value < 0:
            raise ValueError(f"{name}: a counter cannot go down ({value})")
        self.values[self.key(name, tags)] += value

    def set(self, name: str, value: float, tags: Tags | None = None) -> None:
        self.values[self.key(name, tags)] = value

    def observe(self, name: str, value: float, tags: Tags | None = None) -> None:
        self.observed[self.key(name, tags)].append(value)

    def get(self, name: str, **tags: str) -> float:
        return self.values[self.key(name, tags)]


class RequestWatch:
    """One request at the ingress, from arrival to its last message (or its error)."""

    __slots__ = ("_sink", "_clock", "_start", "_last", "_first", "_done")

    def __init__(self, sink: MetricSink, clock: Callable[[], float]) -> None:
        self._sink, self._clock = sink, clock
        self._start = self._last = clock()
        self._first = True
        self._done = False

    def message(self, token_ids: int, finish_reason: int, prompt_tokens: int) -> None:
        """A message sent to the client: its token count, finish reason (0: not the last)."""
        now, sink = self._clock(), self._sink
        if token_ids:
            sink.add("specdec_generation_tokens", token_ids)
            if self._first:
                sink.observe("specdec_time_to_first_token_seconds", now - self._start)
                self._first = False
            else:
                gap = (now - self._last) / token_ids
                for _ in range(token_ids):
                    sink.observe("specdec_inter_token_latency_seconds", gap)
            self._last = now
        if finish_reason:
            self._done = True
            sink.add("specdec_prompt_tokens", prompt_tokens)
            reason = _FINISHED.get(finish_reason, "cancelled")
            sink.add("specdec_request_success", 1, {"finished_reason": reason})
            sink.observe("specdec_e2e_request_latency_seconds", now - self._start)

    def failed(self, code_name: str) -> None:
        """Ended with an error (a gRPC status code name: INVALID_ARGUMENT, ...)."""
        if not self._done:
            self._done = True
            self._sink.add("specdec_requests_refused", 1, {"cause": code_name.lower()})

    def close(self) -> None:
        """The stream is over: neither a finish nor an error means the client left."""
        if not self._done:
            self._done = True
            self._sink.add("specdec_request_success", 1, {"finished_reason": ABORT})


class RequestRecorder:
    """The ingress's request metrics: `watch()` per request; the in-flight gauge."""

    def __init__(self, sink: MetricSink, clock: Callable[[], float] = time.monotonic) -> None:
        self.sink, self.clock = sink, clock
        self.in_flight = 0

    def watch(self) -> RequestWatch:
        return RequestWatch(self.sink, self.clock)

    def entered(self) -> None:
        self.in_flight += 1
        self.sink.set("specdec_num_requests_in_flight", self.in_flight)

    def left(self) -> None:
        self.in_flight -= 1
        self.sink.set("specdec_num_requests_in_flight", self.in_flight)


class StepRecorder:
    """A target replica's scheduler, step by step (a `SchedulerObserver`)."""

    def __init__(self, sink: MetricSink) -> None:
        self.sink = sink

    def step(self, r: StepRecord) -> None:
        sink = self.sink
        spec = r.rows - r.plain_rows
        if r.plain_rows:
            sink.add("specdec_row_steps", r.plain_rows, {"kind": "plain"})
        if spec:
            sink.add("specdec_row_steps", spec, {"kind": "spec"})
            sink.observe("specdec_draft_wait_seconds", r.draft_seconds)
        if r.drafted:
            sink.observe("specdec_draft_call_seconds", r.draft_seconds)
        sink.observe("specdec_batch_rows", r.rows)
        sink.observe("specdec_target_call_seconds", r.verify_seconds, {"call": "verify"})
        sink.observe("specdec_step_seconds", r.step_seconds)

    def round(self, drafter: str, proposed: int, accepted: int) -> None:
        sink, tags = self.sink, {"drafter": drafter}
        sink.add("specdec_spec_decode_num_drafts", 1, tags)
        sink.add("specdec_spec_decode_num_draft_tokens", proposed, tags)
        sink.add("specdec_spec_decode_num_accepted_tokens", accepted, tags)
        for pos in range(min(accepted, MAX_POSITION)):
            sink.add("specdec_spec_decode_num_accepted_tokens_per_pos", 1, {"position": str(pos)})

    def prefill(self, rows: int, seconds: float) -> None:
        self.sink.observe("specdec_target_call_seconds", seconds, {"call": "prefill"})

    def fallback(self, cause: str) -> None:
        self.sink.add("specdec_fallbacks", 1, {"cause": cause})

    def pipeline(self, hits: int, misses: int) -> None:
        if hits:
            self.sink.add("specdec_pipeline", hits, {"outcome": "hit"})
        if misses:
            self.sink.add("specdec_pipeline", misses, {"outcome": "miss"})


def record_batch(sink: MetricSink, running: int, waiting: int) -> None:
    sink.set("specdec_num_requests_running", running)
    sink.set("specdec_num_requests_waiting", waiting)


def record_worker(sink: MetricSink, sequences: int, kv_tokens: int, budget: int | None) -> None:
    """A worker replica's KV, sampled (every second in the cluster)."""
    sink.set("specdec_worker_sequences", sequences)
    sink.set("specdec_kv_cache_tokens", kv_tokens)
    sink.set("specdec_kv_cache_usage_perc", kv_tokens / budget if budget else 0.0)
