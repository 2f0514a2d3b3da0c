"""Merging a sequence's messages (cluster/api/response_stream.py): the stream interval and the
unary collect, against the stream as it was produced."""

from __future__ import annotations

import asyncio

import pytest

from cluster.api.response_stream import coalesce, collect
from protos import specdec_pb2 as pb


def messages(sizes, finish=pb.FINISH_REASON_LENGTH):
    """One message per step with `sizes[i]` tokens; the last carries the finish."""
    out, t = [], 0
    for n in sizes:
        ids = list(range(t, t + n))
        t += n
        out.append(pb.GenerateResponse(token_ids=ids, text="".join(f"<{i}>" for i in ids)))
    out[-1].finish_reason = finish
    out[-1].usage.completion_tokens = t
    out[-1].stats.rounds = 7
    return out


class Source:
    def __init__(self, msgs, delay_s=0.0):
        self.msgs, self.delay_s, self.closed = msgs, delay_s, False

    async def gen(self):
        try:
            for m in self.msgs:
                await asyncio.sleep(self.delay_s)
                yield m
        finally:
            self.closed = True


def run(src, every, max_delay_s=None):
    async def go():
        return [m async for m in coalesce(src.gen(), every, max_delay_s)]

    return asyncio.run(go())


def tokens(msgs):
    return [t for m in msgs for t in m.token_ids]


@pytest.mark.parametrize("every", [1, 2, 3, 4, 100])
def test_every_message_after_the_first_carries_the_interval_and_nothing_is_lost(every):
    sizes = [1, 1, 3, 1, 1, 1, 2, 1, 1]  # speculative steps commit several at once
    src = Source(messages(sizes))
    out = run(src, every)
    assert tokens(out) == list(range(sum(sizes)))
    assert "".join(m.text for m in out) == "".join(m.text for m in messages(sizes))
    assert list(out[0].token_ids) == [0]  # the first token goes at once
    assert all(len(m.token_ids) >= every for m in out[1:-1])
    assert [bool(m.finish_reason) for m in out] == [False] * (len(out) - 1) + [True]
    assert out[-1].usage.completion_tokens == sum(sizes) and out[-1].stats.rounds == 7
    assert src.closed
    if every == 1:
        assert len(out) == len(sizes)


def test_a_unary_call_gets_one_message_unless_the_stream_would_go_silent():
    sizes = [1] * 6
    assert len(run(Source(messages(sizes)), 0)) == 1
    slow = run(Source(messages(sizes), delay_s=0.03), 0, max_delay_s=0.05)
    assert 1 < len(slow) < len(sizes) and tokens(slow) == list(range(6))
    whole = asyncio.run(collect(Source(messages([2, 1, 3])).gen()))
    assert list(whole.token_ids) == list(range(6)) and whole.finish_reason


def test_a_consumer_that_leaves_closes_the_source():
    src = Source(messages([1] * 10))

    async def go():
        stream = coalesce(src.gen(), 1)
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(go())
    assert src.closed
