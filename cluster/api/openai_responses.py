"""A router `GenerateResponse` -> OpenAI's JSON: the unary completion / chat completion, and the
server-sent events of a stream (text chunks, the finish chunk, usage, `data: [DONE]`).

Besides OpenAI's fields every response carries `metrics.speculative_decoding`: vLLM's per-request
speculation shape plus this server's own figures (`speculation_metrics`). Log-probabilities, when
asked, in each endpoint's shape: chat's `logprobs.content` entries, completions' legacy parallel
lists (`text_offset` counts from the start of the completion's text). Pure: no I/O.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.api.openai_errors import APIError
from cluster.api.openai_requests import Options
from protos import specdec_pb2 as pb

_FINISH = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "stop",
    pb.FINISH_REASON_CANCELLED: "abort",  # vLLM's word for a request the server gave up on
}


def finish_reason(resp: pb.GenerateResponse) -> str | None:
    return _FINISH.get(resp.finish_reason)


def usage(resp: pb.GenerateResponse, completion: int | None = None) -> dict[str, int]:
    """OpenAI's usage: the prompt once, `completion` tokens (default: this message's)."""
    p = int(resp.usage.prompt_tokens)
    c = int(resp.usage.completion_tokens) if completion is None else completion
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def speculation_metrics(stats: pb.SpeculationStats) -> dict[str, Any]:
    """`metrics.speculative_decoding` of a response: vLLM's per-request shape (mean acceptance
    length = 1 + accepted / steps, draft acceptance rate, acceptance_histogram[j] = steps that
    accepted exactly j draft tokens, ...) plus ours (plain steps, pipeline hits, ...)."""
    hist = [int(h) for h in stats.acceptance_histogram]
    steps = int(stats.rounds)
    return {
        # vLLM's fields
        "mean_acceptance_length": (1 + stats.accepted_tokens / steps) if steps else 0.0,
        "draft_acceptance_rate": float(stats.acceptance_rate),
        "acceptance_histogram": hist,
        "num_spec_steps": steps,
        "num_accepted_draft_tokens": int(stats.accepted_tokens),
        "num_draft_tokens": int(stats.draft_tokens),
        "num_spec_tokens": max(0, len(hist) - 1),  # the longest block proposed (k varies)
        # ours
        "plain_steps": int(stats.plain_steps),
        "pipeline_hits": int(stats.pipeline_hits),
        "pipeline_misses": int(stats.pipeline_misses),
        "tokens_per_target_pass": float(stats.tokens_per_target_pass),
        "draft_failures": int(stats.draft_failures),
        "target_failovers": int(stats.target_failovers),
        "mode_switches": int(stats.mode_switches),
        "drafters": {
            d.drafter: {
                "num_spec_steps": int(d.rounds),
                "num_draft_tokens": int(d.draft_tokens),
                "num_accepted_draft_tokens": int(d.accepted_tokens),
            }
            for d in stats.drafters
        },
    }


TokenText = Callable[[int], str]  # a token id -> its text (the tokenizer's decode of it alone)


def token_texts(tokenizer: Any) -> TokenText:
    """Each token's text, decoded alone (as vLLM's), memoized per server."""
    return functools.lru_cache(maxsize=1 << 16)(lambda i: tokenizer.decode([i]))


@dataclass(frozen=True, slots=True)
class Echo:
    """Completions' echo: the text starts with the prompt (and, with logprobs, so do the
    log-probabilities)."""

    text: str  # the prompt as text
    first_token: int  # its first token id


def echo_of(req: pb.GenerateRequest, tokenizer: Any) -> Echo | None:
    """The prompt a completions request echoes, as the router will tokenize it (None for an
    empty one: the router refuses it)."""
    ids = list(req.prompt_token_ids) or tokenizer.encode(req.prompt, add_special_tokens=False)
    if not ids:
        return None
    return Echo(req.prompt or tokenizer.decode(ids), int(ids[0]))


class LogprobWriter:
    """The `logprobs` of a choice, or of a chunk's choice, from the router's entries."""

    def __init__(self, chat: bool, text_of: TokenText) -> None:
        self.chat = chat
        self.text_of = text_of
        self.offset = 0  # completions: where the next token's text starts in the completion

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.text_of(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def json(
        self,
        entries: Sequence[pb.TokenLogprob],
        echo: Echo | None = None,
        prompt: Sequence[pb.TokenLogprob] = (),
    ) -> dict[str, Any]:
        """entries: the tokens'; completions with `echo`: the prompt's first, its first token
        with no log-probability (nothing predicts it), then `prompt` (the rest of it)."""
        if self.chat:
            return {
                "content": [
                    {
                        **self._entry(e.token_id, e.logprob),
                        "top_logprobs": [self._entry(t.token_id, t.logprob) for t in e.top],
                    }
                    for e in entries
                ]
            }
        out: dict[str, Any] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        if echo is not None:
            text = self.text_of(echo.first_token)
            for key, value in zip(out, (text, None, None, self.offset), strict=True):
                out[key].append(value)
            self.offset += len(text)
            entries = [*prompt, *entries]
        for e in entries:
            text = self.text_of(e.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(e.logprob)
            # The legacy shape: the N most likely and the chosen token, text -> log-probability.
            top = {self.text_of(t.token_id): t.logprob for t in e.top}
            top.setdefault(text, e.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def _head(opts: Options, rid: str, created: int, chunk: bool) -> dict[str, Any]:
    obj = "chat.completion" if opts.chat else "text_completion"
    if chunk and opts.chat:
        obj = "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": created, "model": opts.model}


def response_json(
    resp: pb.GenerateResponse,
    opts: Options,
    *,
    rid: str | None = None,
    created: int | None = None,
    text_of: TokenText | None = None,
    echo: Echo | None = None,
) -> dict[str, Any]:
    """The whole (unary) response. `text_of`: token texts, for log-probabilities when asked;
    `echo`: completions' prompt, when the request echoes it.
    n > 1: a choice per sample (resp.choices); usage adds their completions up; the metrics
    are sample 0's."""
    rid = rid or new_id(opts.chat)
    out = _head(opts, rid, int(time.time()) if created is None else created, chunk=False)
    parts = list(resp.choices) or [resp]
    out["choices"] = [_choice(part, i, opts, text_of, echo) for i, part in enumerate(parts)]
    out["usage"] = usage(resp, sum(int(p.usage.completion_tokens) for p in parts))
    out["metrics"] = {"speculative_decoding": speculation_metrics(resp.stats)}
    return out


def _choice(
    resp: pb.GenerateResponse,
    index: int,
    opts: Options,
    text_of: TokenText | None,
    echo: Echo | None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index}
    if opts.chat:
        choice["message"] = {"role": "assistant", "content": resp.text}
    else:
        choice["text"] = (echo.text if echo else "") + resp.text
    choice["logprobs"] = None
    if opts.logprobs and text_of is not None:
        writer = LogprobWriter(opts.chat, text_of)
        choice["logprobs"] = writer.json(resp.logprobs, echo, resp.prompt_logprobs)
    choice["finish_reason"] = finish_reason(resp)
    return choice


class ChunkWriter:
    """Turns the router's stream messages into server-sent events, in OpenAI's order: (chat: a
    first chunk with the role), text chunks, a chunk with finish_reason (and our metrics), with
    include_usage a last chunk with `choices: []` and usage, then `data: [DONE]`."""

    def __init__(
        self,
        opts: Options,
        *,
        rid: str | None = None,
        now: Callable[[], float] = time.time,
        prompt_tokens: int = 0,
        text_of: TokenText | None = None,
        echo: Echo | None = None,
    ):
        """prompt_tokens: for usage on every chunk (opts.continuous_usage); text_of: token
        texts, for log-probabilities (opts.logprobs); echo: completions' prompt, which each
        choice's first chunk starts with."""
        self.opts = opts
        self.echo = echo
        self.text_of = text_of if opts.logprobs else None
        self.logprobs: dict[int, LogprobWriter] = {}  # by sample index
        self.rid = rid or new_id(opts.chat)
        self.created = int(now())
        self.started: set[int] = set()  # samples whose first chunk went out
        self.finished = 0
        self.completed = 0  # the finished samples' completion tokens, as their usage says
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0  # all samples'

    def _chunk(
        self,
        index: int,
        text: str | None,
        finish: str | None,
        logprobs: Sequence[pb.TokenLogprob] = (),
        prompt: Sequence[pb.TokenLogprob] = (),
    ) -> dict[str, Any]:
        out = _head(self.opts, self.rid, self.created, chunk=True)
        choice: dict[str, Any] = {"index": index}
        echo = self.echo if index not in self.started and not self.opts.chat else None
        if echo is not None:
            text = echo.text + (text or "")
        if self.opts.chat:
            delta: dict[str, Any] = {}
            if index not in self.started:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = None
        if self.text_of is not None and (logprobs or echo is not None):
            writer = self.logprobs.setdefault(index, LogprobWriter(self.opts.chat, self.text_of))
            choice["logprobs"] = writer.json(logprobs, echo, prompt)
        choice["finish_reason"] = finish
        self.started.add(index)
        out["choices"] = [choice]
        if self.opts.continuous_usage:  # vLLM's continuous_usage_stats: the counts so far
            p, c = self.prompt_tokens, self.completion_tokens
            out["usage"] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        elif self.opts.include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the last
        return out

    def events(self, msg: pb.GenerateResponse) -> list[str]:
        """The SSE lines for one router message (none for an empty, non-final one). n > 1: each
        sample's chunks carry its index; the usage chunk follows the last sample's finish."""
        out = []
        i = int(msg.index)
        finish = finish_reason(msg)
        self.completion_tokens += len(msg.token_ids)
        if self.opts.chat and i not in self.started:
            out.append(sse(self._chunk(i, "", None)))
        if (msg.text or msg.logprobs) and finish is None:
            out.append(sse(self._chunk(i, msg.text, None, msg.logprobs, msg.prompt_logprobs)))
        if finish is not None:
            text = msg.text if msg.text else None if self.opts.chat else ""
            last = self._chunk(i, text, finish, msg.logprobs, msg.prompt_logprobs)
            metrics = {"speculative_decoding": speculation_metrics(msg.stats)}
            last["metrics"] = metrics
            out.append(sse(last))
            self.finished += 1
            self.completed += int(msg.usage.completion_tokens)
            if self.opts.include_usage and self.finished == self.opts.n:
                tail = _head(self.opts, self.rid, self.created, chunk=True)
                tail.update(choices=[], usage=usage(msg, self.completed), metrics=metrics)
                out.append(sse(tail))
        return out

    def error(self, err: APIError) -> str:
        """An error after the stream started (vLLM's way: an error event, then [DONE])."""
        return sse(err.body())


DONE = "data: [DONE]\n\n"


def sse(obj: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), allow_nan=False)}\n\n"
