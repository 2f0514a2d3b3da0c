"""The in-process engine: draft and target in this process, no Ray and no gRPC.

It runs the same `RoundDriver` as the router; its transport is a single worker thread per side, so
a pipelined draft really drafts block i+1 while the target verifies block i (torch releases the GIL
inside its kernels).

    engine = SpecEngine.from_paths(target_dir, draft_dir)
    result = engine.generate("def add(a, b):", max_new_tokens=32, k=4)
    print(engine.tokenizer.decode(result.token_ids), result.stats.acceptance_rate)
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from cluster.driver import DriverOptions, RoundDriver
from cluster.policy import (
    DeploymentEstimates,
    PolicyConfig,
    SpecMode,
    SpeculationPolicy,
    with_pipelining,
)
from cluster.rounds import FinishReason, GenerationStats, SequenceRounds, StopConditions
from workers.draft import DraftWorker
from workers.model_runner import check_same_tokenizer
from workers.sampling import SamplingParams
from workers.target import TargetWorker
from workers.verification import SparseQ


class _OnThread:
    """Runs every call of one worker on one dedicated thread (workers are not thread-safe).

    `torch_threads` caps torch's intra-op threads for that thread only: torch keeps an OpenMP
    team per calling thread, and a multi-threaded draft team slows the target's passes even while
    the draft is idle (measured here: a target verify 14 -> 21 ms). A small draft loses little
    running on one thread.
    """

    def __init__(self, name: str, torch_threads: int | None = None) -> None:
        init = (lambda: torch.set_num_threads(torch_threads)) if torch_threads else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=init)

    def submit(self, fn, *args) -> Future:
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class LocalDraft:
    """`DraftSide` over an in-process `DraftWorker`."""

    def __init__(self, worker: DraftWorker) -> None:
        self.worker = worker
        self.thread = _OnThread("draft", torch_threads=1)

    def prefill(self, seq_id: str, token_ids: list[int], params: SamplingParams) -> Future:
        return self.thread.submit(self.worker.prefill, seq_id, token_ids, params)

    def propose(
        self,
        seq_id: str,
        committed_len: int,
        k: int,
        commit: Sequence[int] = (),
        start: int | None = None,
    ) -> Future:
        return self.thread.submit(
            self.worker.propose, seq_id, committed_len, k, list(commit), start
        )

    def release(self, seq_id: str) -> None:
        self.thread.submit(self.worker.release, seq_id).result()


class LocalTarget:
    """`TargetSide` over an in-process `TargetWorker`."""

    def __init__(self, worker: TargetWorker) -> None:
        self.worker = worker
        self.thread = _OnThread("target")

    def prefill(self, seq_id: str, token_ids: list[int], params: SamplingParams) -> Future:
        return self.thread.submit(self.worker.prefill, seq_id, token_ids, params)

    def verify(
        self, seq_id: str, committed_len: int, draft_tokens: list[int], q: SparseQ | None
    ) -> Future:
        return self.thread.submit(self.worker.verify, seq_id, committed_len, draft_tokens, q)

    def plain_step(self, seq_id: str, committed_len: int) -> Future:
        return self.thread.submit(self.worker.plain_step, seq_id, committed_len)

    def release(self, seq_id: str) -> None:
        self.thread.submit(self.worker.release, seq_id).result()


@dataclass(frozen=True, slots=True)
class GenerationResult:
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    stats: GenerationStats


def spec_policy(
    base: PolicyConfig,
    mode: SpecMode,
    k: int | None,
    sampling: SamplingParams = SamplingParams(),
    shared: DeploymentEstimates | None = None,
    pipelined: bool | str | None = None,
) -> SpeculationPolicy:
    """The per-request policy: `k` fixes the block size (None = adaptive). A seeded sampling
    request gets a timing-free policy so that it repeats exactly."""
    if k is not None and (not isinstance(k, int) or k < 1):
        raise ValueError(f"k (num_draft_tokens) must be >= 1, got {k!r}")
    if k is not None and k > base.max_draft_tokens:
        raise ValueError(f"k (num_draft_tokens) must be <= {base.max_draft_tokens}, got {k}")
    deterministic = sampling.seed is not None and not sampling.greedy
    config = replace(base, num_draft_tokens=k or 0)
    if pipelined is not None:  # True, False or "auto" (measure both, run the faster)
        config = with_pipelining(config, pipelined)
    return SpeculationPolicy(config, mode, deterministic, shared)


class Generation:
    """One request in flight: iterate it for token chunks; it frees its KV when done or dropped."""

    def __init__(self, driver: RoundDriver) -> None:
        self.driver = driver
        self.rounds = driver.rounds

    def __iter__(self) -> Iterator[list[int]]:
        try:
            yield from self.driver.run()
        finally:
            self.rounds.cancel()  # no-op when finished; marks an abandoned stream
            self.driver.close()

    def result(self) -> GenerationResult:
        r = self.rounds
        return GenerationResult(list(r.generated), r.finish_reason, len(r.prompt_ids), r.stats)


class SpecEngine:
    """Speculative decoding for many sequences, one process. Thread-safe per request."""

    def __init__(
        self,
        target: TargetWorker,
        draft: DraftWorker | None,
        *,
        policy: PolicyConfig = PolicyConfig(),
        options: DriverOptions = DriverOptions(),
    ) -> None:
        if draft is not None:
            check_same_tokenizer(draft.runner.tokenizer, target.runner.tokenizer)
        self.target = LocalTarget(target)
        self.draft = LocalDraft(draft) if draft is not None else None
        self.policy = policy
        # Shared by all requests: costs and acceptance belong to the workers.
        self.estimates = DeploymentEstimates(policy)
        self.options = options
        self.tokenizer = target.runner.tokenizer
        self._ids = itertools.count()

    @classmethod
    def from_paths(
        cls,
        target_path: str | os.PathLike,
        draft_path: str | os.PathLike | None,
        *,
        top_m: int = 64,
        **kw,
    ) -> SpecEngine:
        target = TargetWorker.from_path(target_path)
        draft = DraftWorker.from_path(draft_path, top_m=top_m) if draft_path else None
        return cls(target, draft, **kw)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt: must not be empty")
        vocab = self.target.worker.runner.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})")
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
    ) -> Generation:
        """Validate a request and set up its sequence; iterate the result to run it."""
        ids = self.encode(prompt)
        runner = self.target.worker.runner
        stop = StopConditions(
            max_new_tokens,
            frozenset(runner.eos_token_ids),
            frozenset(stop_token_ids),
            runner.max_context,
        )
        rounds = SequenceRounds(ids, stop)
        driver = RoundDriver(
            f"local-{next(self._ids)}",
            rounds,
            spec_policy(self.policy, mode, k, sampling, self.estimates, pipelined),
            self.draft if mode is not SpecMode.OFF else None,
            self.target,
            sampling,
            self.options,
        )
        return Generation(driver)

    def stream(self, prompt: str | Sequence[int], **kw) -> Iterator[list[int]]:
        """Yields the tokens of each round as they are committed."""
        return iter(self.start(prompt, **kw))

    def generate(self, prompt: str | Sequence[int], **kw) -> GenerationResult:
        gen = self.start(prompt, **kw)
        for _ in gen:
            pass
        return gen.result()

    def close(self) -> None:
        self.target.thread.shutdown()
        if self.draft is not None:
            self.draft.thread.shutdown()
