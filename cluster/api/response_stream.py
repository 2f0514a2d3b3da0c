"""The `GenerateResponse` stream of one sequence, as the router sends it: its last message (finish
reason, usage, speculation stats) and a whole stream collected into one response (unary Generate).

Proto messages only; their OpenAI JSON is cluster/api/openai_responses.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from cluster.scheduling.rounds import FinishReason, GenerationStats
from cluster.scheduling.rows import Row
from protos import specdec_pb2

FINISH = {
    FinishReason.LENGTH: specdec_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: specdec_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: specdec_pb2.FINISH_REASON_EOS,
    FinishReason.CANCELLED: specdec_pb2.FINISH_REASON_CANCELLED,
}


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


async def collect(
    stream: AsyncIterator[specdec_pb2.GenerateResponse],
) -> specdec_pb2.GenerateResponse:
    """A whole stream as one response (the unary Generate); closes the stream in any case."""
    out = specdec_pb2.GenerateResponse()
    try:
        async for msg in stream:
            out.text += msg.text
            out.token_ids.extend(msg.token_ids)
            if msg.finish_reason:
                out.finish_reason = msg.finish_reason
                out.usage.CopyFrom(msg.usage)
                out.stats.CopyFrom(msg.stats)
    finally:
        await stream.aclose()
    return out
