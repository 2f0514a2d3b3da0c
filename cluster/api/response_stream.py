"""The `GenerateResponse` stream of one sequence, as the router sends it: its last message (finish
reason, usage, speculation stats) and a whole stream collected into one response (unary Generate).

Proto messages only; their OpenAI JSON is cluster/api/openai_responses.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from cluster.scheduling.rounds import FinishReason, GenerationStats
from cluster.scheduling.rows import Row
from protos import specdec_pb2
from workers.types import TokenLogprob

FINISH = {
    FinishReason.LENGTH: specdec_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: specdec_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: specdec_pb2.FINISH_REASON_EOS,
    FinishReason.CANCELLED: specdec_pb2.FINISH_REASON_CANCELLED,
}


def logprobs_to_proto(logprobs: Sequence[TokenLogprob]) -> list[specdec_pb2.TokenLogprob]:
    return [
        specdec_pb2.TokenLogprob(
            token_id=t.token,
            logprob=t.logprob,
            top=[specdec_pb2.TopLogprob(token_id=i, logprob=v) for i, v in t.top],
        )
        for t in logprobs
    ]


def mode_switches(stats: GenerationStats) -> int:
    """Changes between speculative rounds and plain steps over the sequence."""
    kinds = [r.proposed > 0 for r in stats.records]
    return sum(1 for a, b in zip(kinds, kinds[1:], strict=False) if a != b)


def finish(
    msg: specdec_pb2.GenerateResponse,
    row: Row,
    reason: FinishReason,
    completion_tokens: int,
) -> specdec_pb2.GenerateResponse:
    """Fill the last message of a stream: finish_reason, usage and the speculation stats."""
    s = row.rounds.stats
    msg.finish_reason = FINISH[reason]
    msg.usage.prompt_tokens = len(row.rounds.prompt_ids)
    msg.usage.completion_tokens = completion_tokens
    msg.stats.CopyFrom(
        specdec_pb2.SpeculationStats(
            rounds=s.rounds,
            draft_tokens=s.draft_tokens,
            accepted_tokens=s.accepted_tokens,
            mean_accepted_length=s.mean_accepted_length,
            plain_steps=s.plain_steps,
            pipeline_hits=s.pipeline_hits,
            pipeline_misses=s.pipeline_misses,
            acceptance_rate=s.acceptance_rate,
            tokens_per_target_pass=s.tokens_per_target_pass,
            draft_failures=s.draft_failures,
            target_failovers=row.target_failovers,
            mode_switches=mode_switches(s),
            acceptance_histogram=s.acceptance_histogram,  # for the HTTP API's metrics
            drafters=[
                specdec_pb2.DrafterStats(
                    drafter=name, rounds=n[0], draft_tokens=n[1], accepted_tokens=n[2]
                )
                for name, n in sorted(s.by_drafter.items())
            ],
        )
    )
    return msg


def merge(into: specdec_pb2.GenerateResponse, msg: specdec_pb2.GenerateResponse) -> None:
    """Append one message of a stream to `into` (text and tokens; the last one's finish)."""
    into.text += msg.text
    into.token_ids.extend(msg.token_ids)
    into.logprobs.extend(msg.logprobs)
    into.prompt_logprobs.extend(msg.prompt_logprobs)
    if msg.finish_reason:
        into.finish_reason = msg.finish_reason
        into.usage.CopyFrom(msg.usage)
        into.stats.CopyFrom(msg.stats)


async def coalesce(
    stream: AsyncIterator[specdec_pb2.GenerateResponse],
    every: int,
    max_delay_s: float | None = None,
) -> AsyncIterator[specdec_pb2.GenerateResponse]:
    """The stream with its messages merged so that each carries at least `every` tokens (vLLM's
    `--stream-interval`): the first one goes at once (the time to first token), the last one
    carries the finish. `every` 0: no token bound (a unary call: the whole response in one).
    `max_delay_s`: a message that arrives that long after the last one sent goes out with what
    is pending, so a waiting consumer still hears from a live stream (its liveness deadline).
    Closes the stream in any case.

    Why: each message crosses two Serve hops (target replica -> ingress -> proxy), a few ms of CPU
    each way, on the cores the forward needs; a unary request needs none of them."""
    pending: dict[int, specdec_pb2.GenerateResponse] = {}  # by sample index
    sent: set[int] = set()
    last = time.monotonic()
    try:
        async for msg in stream:
            i = msg.index
            if i in pending:
                merge(pending[i], msg)
            else:
                pending[i] = msg
            due = every > 0 and (i not in sent or len(pending[i].token_ids) >= every)
            if due or pending[i].finish_reason:
                sent.add(i)
                yield pending.pop(i)
            if max_delay_s is not None and time.monotonic() - last >= max_delay_s:
                for j in sorted(pending):  # a live stream still says so
                    sent.add(j)
                    yield pending.pop(j)
            if not pending:
                last = time.monotonic()
        for j in sorted(pending):
            yield pending.pop(j)
    finally:
        await stream.aclose()


async def collect(
    stream: AsyncIterator[specdec_pb2.GenerateResponse],
) -> specdec_pb2.GenerateResponse:
    """A whole stream as one response (the unary Generate); closes the stream in any case. The
    samples of an n > 1 request are merged each on its own, into `choices` (by index); the
    message's own fields repeat sample 0's."""
    parts: dict[int, specdec_pb2.GenerateResponse] = {}
    async for msg in coalesce(stream, 0):
        merge(parts.setdefault(msg.index, specdec_pb2.GenerateResponse(index=msg.index)), msg)
    out = specdec_pb2.GenerateResponse()
    if 0 in parts:
        out.CopyFrom(parts[0])
    if len(parts) > 1:
        out.choices.extend(parts[i] for i in sorted(parts))
    return out
