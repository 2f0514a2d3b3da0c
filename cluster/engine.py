"""The in-process engine: draft and target in this process, no Ray and no gRPC.

It runs the same `StepScheduler` as the cluster; its transport is one worker thread per side, so
concurrent requests are batched into one target pass per step and a pipelined draft really drafts
the next block while the target verifies (torch releases the GIL inside its kernels).

    engine = SpecEngine.from_paths(target_dir, draft_dir)
    result = engine.generate("def add(a, b):", max_new_tokens=32, k=4)
    print(engine.tokenizer.decode(result.token_ids), result.stats.acceptance_rate)
"""

from __future__ import annotations

import itertools
import os
import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from cluster.scheduling.policy import Drafter, PolicyConfig, SpecMode
from cluster.scheduling.rounds import FinishReason, GenerationStats, SequenceRounds, StopConditions
from cluster.scheduling.rows import Row, RowRequest
from cluster.scheduling.scheduler import SchedulerOptions, StepScheduler
from cluster.transport.in_process import LocalDraft, LocalDraftPool, LocalTarget
from workers.draft import DraftWorker
from workers.draft_loading import load_draft
from workers.feature_draft import FeatureDraftWorker
from workers.logits_processing import with_held_ids
from workers.model_runner import check_same_tokenizer
from workers.target import TargetWorker
from workers.token_range import check_length, check_token_ids
from workers.types import SamplingParams, TokenLogprob


@dataclass(frozen=True, slots=True)
class GenerationResult:
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    stats: GenerationStats
    # The target's log-probabilities of token_ids, when the sampling asked (else empty).
    logprobs: tuple[TokenLogprob, ...] = ()


_DONE = object()


class _QueueSink:
    """A row's output as a queue the consumer thread reads (the scheduler never blocks on it)."""

    def __init__(self) -> None:
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.logprobs: list[TokenLogprob] = []  # written by the scheduler before it emits

    def tokens(self, tokens: list[int], logprobs: tuple[TokenLogprob, ...] = ()) -> None:
        self.logprobs.extend(logprobs)
        self.q.put(tokens)

    def finished(self) -> None:
        self.q.put(_DONE)

    def failed(self, exc: BaseException) -> None:
        self.q.put(exc)


class Generation:
    """One request: iterate it for token chunks (it joins the batch on the first `next`); it
    leaves the batch and frees its KV when done, closed or dropped."""

    def __init__(self, scheduler: StepScheduler, row: Row, sink: _QueueSink) -> None:
        self.scheduler = scheduler
        self.row = row
        self.sink = sink
        self.rounds = row.rounds

    def __iter__(self) -> Iterator[list[int]]:
        self.scheduler.submit(self.row)
        try:
            while True:
                item = self.sink.q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not self.row.released.is_set():
                self.row.cancel()  # an abandoned stream: leave the batch at the next step
                self.scheduler.wake()
                self.row.released.wait(30)

    def result(self) -> GenerationResult:
        r = self.rounds
        return GenerationResult(
            list(r.generated),
            r.finish_reason,
            len(r.prompt_ids),
            r.stats,
            tuple(self.sink.logprobs),
        )


class SpecEngine:
    """Speculative decoding for many sequences, one process, batched. Thread-safe."""

    def __init__(
        self,
        target: TargetWorker,
        draft: DraftWorker | FeatureDraftWorker | None,
        *,
        policy: PolicyConfig = PolicyConfig(),
        options: SchedulerOptions = SchedulerOptions(),
    ) -> None:
        if draft is not None:
            check_same_tokenizer(draft.runner.tokenizer, target.runner.tokenizer)
        if isinstance(draft, FeatureDraftWorker):  # its rows carry the target's features
            options = replace(options, draft_features=True)
        self.target = LocalTarget(target)
        self.draft = LocalDraft(draft) if draft is not None else None
        self.policy = policy
        pool = LocalDraftPool(self.draft) if self.draft is not None else None
        self.scheduler = StepScheduler(
            self.target, pool, policy, options, name="engine-scheduler"
        ).start()
        self.tokenizer = target.runner.tokenizer
        self._ids = itertools.count()

    @classmethod
    def from_paths(
        cls,
        target_path: str | os.PathLike,
        draft_path: str | os.PathLike | None,
        *,
        top_m: int = 64,
        confidence_stop: float = 0.0,
        **kw,
    ) -> SpecEngine:
        target = TargetWorker.from_path(target_path)
        draft = None
        if draft_path:
            draft = load_draft(draft_path, top_m=top_m, confidence_stop=confidence_stop)
        return cls(target, draft, **kw)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """The prompt's token ids, checked by the workers' token-range rules (ValueError naming
        "prompt"): inside the vocabulary, with room in the context for at least one new token."""
        if isinstance(prompt, str):
            prompt = self.tokenizer.encode(prompt, add_special_tokens=False)
        runner = self.target.worker.runner
        ids = check_token_ids("prompt", prompt, runner.vocab_size)
        check_length("prompt", len(ids), runner.max_context, new_tokens=1)
        return ids

    def start(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        sampling: SamplingParams = SamplingParams(),
        stop_token_ids: Sequence[int] = (),
        mode: SpecMode = SpecMode.AUTO,
        k: int | None = None,
        pipelined: bool | str | None = None,
        drafter: Drafter | None = None,
    ) -> Generation:
        """Validate a request and set up its sequence; iterate the result to run it."""
        ids = self.encode(prompt)
        if k is not None and (not isinstance(k, int) or not 1 <= k <= self.policy.max_draft_tokens):
            raise ValueError(
                f"k (num_draft_tokens) must be in [1, {self.policy.max_draft_tokens}], got {k!r}"
            )
        if pipelined not in (None, True, False, "auto"):
            raise ValueError(f'pipelined must be true, false or "auto", got {pipelined!r}')
        runner = self.target.worker.runner
        stop = StopConditions(
            max_new_tokens,
            frozenset(runner.eos_token_ids),
            frozenset(stop_token_ids),
            runner.max_context,
        )
        rounds = SequenceRounds(ids, stop)
        if self.draft is None and (drafter or self.policy.drafter) is Drafter.MODEL:
            mode = SpecMode.OFF
        sink = _QueueSink()
        request = RowRequest(mode, k, pipelined, drafter)
        sampling = with_held_ids(sampling, stop.eos_token_ids | stop.stop_token_ids)
        row = Row(f"local-{next(self._ids)}", rounds, sampling, sink, request)
        return Generation(self.scheduler, row, sink)

    def stream(self, prompt: str | Sequence[int], **kw) -> Iterator[list[int]]:
        """Yields the tokens of each step as they are committed."""
        return iter(self.start(prompt, **kw))

    def generate(self, prompt: str | Sequence[int], **kw) -> GenerationResult:
        gen = self.start(prompt, **kw)
        for _ in gen:
            pass
        return gen.result()

    def close(self) -> None:
        self.scheduler.close()
        self.target.thread.shutdown()
        if self.draft is not None:
            self.draft.thread.shutdown()
