"""The layers `specdec bench --profile` times, one greedy stream each (printed by bench/profile.py).

Each function decodes one prompt through one layer and adds its decode steps' wall time to a
`Tally`; the prefill is never timed (a step is what is profiled). Layers, innermost first:

  forward     ModelRunner.extend_batch for one row (1 token, or k + 1 then rolled back)
  worker      TargetWorker.verify_batch / DraftWorker.propose_batch: `InProcess`
  grpc        the same calls over gRPC to worker processes: `OverGrpc`
  router      cluster.routing.router.Router over those worker processes: `router_request`
  hf          HF `generate` on the target's own model object, per decoded token
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from bench.hf import hf_greedy
from workers.batch import PrefillRow, Proposal, ProposeRow, VerifyRow
from workers.types import SamplingParams

GREEDY = SamplingParams()


@dataclass
class Tally:
    """Wall seconds over decode steps (and what they committed), pooled over prompts."""

    seconds: float = 0.0
    steps: int = 0
    tokens: int = 0
    phases: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, seconds: float, steps: int = 1) -> None:
        self.seconds += seconds
        self.steps += steps

    @property
    def ms(self) -> float:
        return 1e3 * self.seconds / self.steps if self.steps else 0.0

    def phase_ms(self, name: str) -> float:
        return 1e3 * self.phases[name] / self.steps if self.steps else 0.0


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a model with the intra-op threads its worker process would have (process-wide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def forward_steps(
    runner, sid: str, ids: list[int], steps: int, width: int, threads: int, tally: Tally
) -> None:
    """`steps` forwards of `width` tokens for one row; a wider one is rolled back to one new
    token after it (the KV bookkeeping is not timed: only the forward is this layer)."""
    with torch_threads(threads):
        runner.extend_batch([(sid, ids)], logits=False)
        try:
            for i in range(steps):
                toks = [ids[(i + j) % len(ids)] for j in range(width)]
                keep = runner.length(sid) + 1
                t0 = time.perf_counter()
                runner.extend_batch([(sid, toks)])
                tally.add(time.perf_counter() - t0)
                if width > 1:
                    runner.rollback(sid, keep)
        finally:
            runner.release(sid)


def _ok(slots: Sequence[object]) -> list[object]:
    """A batched call's per-row slots; a refused row is a bug of the profile itself."""
    for s in slots:
        if isinstance(s, BaseException):
            raise s
    return list(slots)


class InProcess:
    """The workers called in this process, each on its worker process's thread count."""

    def __init__(self, target, draft, threads: int, draft_threads: int) -> None:
        self.target, self.draft = target, draft
        self.threads, self.draft_threads = threads, draft_threads

    def prefill(self, rows: list[PrefillRow]) -> tuple[object, object]:
        with torch_threads(self.threads):
            t = self.target.prefill_batch(rows)
        with torch_threads(self.draft_threads):
            d = self.draft.prefill_batch(rows)
        return _ok(t)[0], _ok(d)[0]

    def verify(self, rows: list[VerifyRow]) -> list[object]:
        with torch_threads(self.threads):
            return _ok(self.target.verify_batch(rows))

    def propose(self, rows: list[ProposeRow]) -> list[object]:
        with torch_threads(self.draft_threads):
            return _ok(self.draft.propose_batch(rows))

    def release(self, sid: str) -> None:
        self.target.release(sid)
        self.draft.release(sid)


class OverGrpc:
    """The same calls through cluster.transport.grpc_workers to worker server processes."""

    def __init__(self, target_address: str, draft_address: str) -> None:
        from cluster.transport.grpc_workers import GrpcDraft, GrpcTarget

        self.target, self.draft = GrpcTarget(target_address), GrpcDraft(draft_address)

    def prefill(self, rows: list[PrefillRow]) -> tuple[object, object]:
        t, d = self.target.prefill_batch(rows), self.draft.prefill_batch(rows)
        return _ok(t.result())[0], _ok(d.result())[0]

    def verify(self, rows: list[VerifyRow]) -> list[object]:
        return _ok(self.target.verify_batch(rows).result())

    def propose(self, rows: list[ProposeRow]) -> list[object]:
        return _ok(self.draft.propose_batch(rows).result())

    def release(self, sid: str) -> None:
        self.target.release(sid)
        self.draft.release(sid)

    def close(self) -> None:
        self.target.close()
        self.draft.close()


def _start(workers: InProcess | OverGrpc, sid: str, ids: list[int]) -> list[int]:
    """Prefill both workers; the tokens committed since the prompt (the first token where the
    target's prefill decodes it, else none)."""
    first, _ = workers.prefill([PrefillRow(sid, ids, GREEDY)])
    return [] if first is None else [int(first)]


def plain_steps(
    workers: InProcess | OverGrpc, sid: str, ids: list[int], steps: int, tally: Tally
) -> None:
    """`steps` plain steps (a verify row without draft tokens) of one greedy row."""
    n = len(ids) + len(_start(workers, sid, ids))
    try:
        for i in range(steps):
            t0 = time.perf_counter()
            workers.verify([VerifyRow(sid, n + i)])
            tally.add(time.perf_counter() - t0)
    finally:
        workers.release(sid)


def spec_steps(
    workers: InProcess | OverGrpc,
    sid: str,
    ids: list[int],
    new_tokens: int,
    k: int,
    draft: Tally,
    verify: Tally,
) -> None:
    """Speculative steps of k until `new_tokens` are committed, one propose (with the last
    step's commit) and one verify each, as the scheduler sends them when not pipelined."""
    commit = _start(workers, sid, ids)
    base, made = len(ids), len(commit)
    try:
        while made < new_tokens:
            t0 = time.perf_counter()
            p = workers.propose([ProposeRow(sid, base, k, commit)])[0]
            t1 = time.perf_counter()
            assert isinstance(p, Proposal)
            v = workers.verify([VerifyRow(sid, base + len(commit), p.tokens, p.q)])[0]
            t2 = time.perf_counter()
            draft.add(t1 - t0)
            verify.add(t2 - t1)
            base += len(commit)
            commit = v.committed(p.tokens)
            made += len(commit)
    finally:
        workers.release(sid)


def _scheduler_totals(router) -> tuple[int, collections.Counter[str]]:
    steps, phases = 0, collections.Counter()
    for s in router.batch_status().values():
        steps += s["steps"]
        phases.update(s["phase_seconds"])
    return steps, phases


def router_request(
    loop: asyncio.AbstractEventLoop,
    router,
    ids: list[int],
    mode: int,
    k: int,
    max_new: int,
    tally: Tally,
) -> None:
    """One request through the router. Its steps' time is the request's wall time less the
    scheduler's admit phase (the prefill): streaming and waking up stay in, as a client sees."""
    from protos import specdec_pb2 as pb

    req = pb.GenerateRequest(
        prompt_token_ids=ids,
        max_new_tokens=max_new,
        speculation=pb.SpeculationOptions(mode=mode, num_draft_tokens=k),
    )
    steps0, phases0 = _scheduler_totals(router)
    t0 = time.perf_counter()
    resp = loop.run_until_complete(router.generate(req))
    wall = time.perf_counter() - t0
    steps1, phases1 = _scheduler_totals(router)
    phases1.subtract(phases0)
    admit = phases1.pop("admit", 0.0)
    tally.add(wall - admit, steps1 - steps0)
    tally.tokens += len(resp.token_ids)
    tally.phases.update(phases1)


def hf_steps(model, ids: list[int], max_new: int, threads: int, tally: Tally) -> None:
    """HF `generate`'s time per decoded token: a generation of max_new tokens less one of a
    single token (its prefill and first token), over the tokens after the first. The single
    token is timed three times and the least kept: noise only adds time, and one disturbed
    baseline made the difference negative for a tiny model."""

    def gen(n: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        made = len(hf_greedy(model, ids, n))
        return time.perf_counter() - t0, made

    with torch_threads(threads):
        first = min(gen(1)[0] for _ in range(3))
        whole, made = gen(max_new)
    if made > 1:
        tally.add(whole - first, made - 1)


def top_ops(runner, ids: list[int], threads: int, rows: int = 10) -> str:
    """torch.profiler's operators of one one-token forward, by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    sid = "profile-ops"
    with torch_threads(threads):
        runner.extend_batch([(sid, ids)], logits=False)
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runner.extend_batch([(sid, ids[:1])])
        finally:
            runner.release(sid)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
