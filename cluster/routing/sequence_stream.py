"""A request's sequences as the router streams them: the scheduler's output (tokens and their
log-probabilities, the end, or an error, from each row's sink) folded into `GenerateResponse`
messages, one sequence at a time or n at once (n samples of one prompt, `index` telling them
apart). No ray, no grpc.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from cluster.api.response_stream import finish, logprobs_to_proto
from cluster.api.text_stream import TextStream
from cluster.api.validation import RequestError
from cluster.routing.mailbox import END, Emitted
from cluster.scheduling.rounds import FinishReason
from cluster.scheduling.rows import Row
from protos import specdec_pb2
from workers.types import TokenLogprob


class SequenceStream:
    """One sequence's messages: its text (stop strings), what it committed since the last
    message, and its final message."""

    def __init__(self, index: int, row: Row, text: TextStream) -> None:
        self.index = index
        self.row = row
        self.text = text
        self.sent = 0  # tokens handed out, for usage
        self.done = False
        self._tokens: list[int] = []
        self._logprobs: list[TokenLogprob] = []
        self._first = True  # the first message also carries the prompt's log-probabilities

    def add(self, item: Emitted | object) -> specdec_pb2.GenerateResponse | None:
        """Fold one sink item in (Emitted or END); the final message when the sequence ends
        here (END, or a stop string in its text), else None."""
        if item is END:
            reason = self.row.rounds.finish_reason or FinishReason.CANCELLED
            return self._finish(reason)
        for i, tok in enumerate(item.tokens):
            self._tokens.append(tok)
            self._logprobs.extend(item.logprobs[i : i + 1])
            self.sent += 1
            if self.text.feed(tok):
                break
        if self.text.stopped:  # a stop string: the row leaves the batch at the next step
            self.row.cancel()
            return self._finish(FinishReason.STOP)
        return None

    def flush(self) -> specdec_pb2.GenerateResponse | None:
        """What was committed since the last message, if anything."""
        if self.done or not self._tokens:
            return None
        return self._message(False)

    def _finish(self, reason: FinishReason) -> specdec_pb2.GenerateResponse:
        self.done = True
        return finish(self._message(True), self.row, reason, self.sent)

    def _message(self, last: bool) -> specdec_pb2.GenerateResponse:
        msg = specdec_pb2.GenerateResponse(
            text=self.text.take(last),
            token_ids=self._tokens,
            logprobs=logprobs_to_proto(self._logprobs),
            index=self.index,
        )
        if self._first:
            msg.prompt_logprobs.extend(logprobs_to_proto(self.row.prompt_logprobs))
            self._first = False
        self._tokens, self._logprobs = [], []
        return msg


async def stream_sequences(
    queue: asyncio.Queue, seqs: Sequence[SequenceStream]
) -> AsyncIterator[specdec_pb2.GenerateResponse]:
    """The messages of every sequence until all have ended. The queue holds (index, item)
    pairs from the rows' sinks. Each pass takes all that arrived since the last: steps the
    consumer fell behind on go out as one message per sequence, and a sequence's last tokens
    go with its finish. A RequestError ends the request: what was committed before it still
    goes out first."""
    live = len(seqs)
    while live:
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        for index, item in items:
            seq = seqs[index]
            if seq.done:
                continue
            if isinstance(item, RequestError):
                for other in seqs:
                    if (msg := other.flush()) is not None:
                        yield msg
                raise item
            final = seq.add(item)
            if final is not None:
                live -= 1
                yield final
        for seq in seqs:
            if (msg := seq.flush()) is not None:
                yield msg
