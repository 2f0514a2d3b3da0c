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
    pending: specdec_pb2.GenerateResponse | None = None
    sent = False
    last = time.monotonic()
    try:
        async for msg in stream:
            if pending is None:
                pending = msg
            else:
                merge(pending, msg)
            due = every > 0 and (not sent or len(pending.token_ids) >= every)
            late = max_delay_s is not None and time.monotonic() - last >= max_delay_s
            if due or late or pending.finish_reason:
                yield pending
                pending, sent, last = None, True, time.monotonic()
        if pending is not None:
            yield pending
    finally:
        await stream.aclose()


async def collect(
    stream: AsyncIterator[specdec_pb2.GenerateResponse],
) -> specdec_pb2.GenerateResponse:
    """A whole stream as one response (the unary Generate); closes the stream in any case."""
    out = specdec_pb2.GenerateResponse()
    async for msg in coalesce(stream, 0):
        merge(out, msg)
    return out
