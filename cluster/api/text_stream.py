"""Incremental detokenization with stop strings, for streaming a sequence's text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DECODE_CONTEXT = 5  # prompt tokens decoded along with the output, for correct spacing


class TextStream:
    """Incremental detokenization with stop strings.

    Decodes a sliding window (the previous read offset onward) and emits only the new suffix,
    holding back an incomplete UTF-8 character (decoded as U+FFFD) and any tail that may be the
    start of a stop string. A matched stop string ends the text just before it.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        stops: Sequence[str],
        include_stop: bool = False,
        min_tokens: int = 0,
    ) -> None:
        """include_stop: a matched stop string ends the text after it (vLLM's
        include_stop_str_in_output), not before. min_tokens: no stop string ends the text
        before that many tokens (vLLM's; the target holds back EOS and stop ids as long)."""
        self.tok = tokenizer
        self.ids = list(prompt_ids[-DECODE_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""  # the output text so far (cut at a stop string)
        self.sent = 0  # characters of text already handed out
        self.stops = tuple(stops)
        self.include_stop = include_stop
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.stopped = False
        self.min_tokens = min_tokens
        self.fed = 0  # output tokens fed

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def feed(self, token: int) -> bool:
        """Add one token; True when a stop string matched (the text now ends before it)."""
        self.ids.append(int(token))
        self.fed += 1
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False
        self.prefix, self.read = self.read, len(self.ids)
        return self._append(after[len(before) :])

    def _append(self, delta: str) -> bool:
        if not delta or self.stopped:
            return False
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += delta
        if self.fed < self.min_tokens:  # too early for a stop string to end the text
            return False
        hits = [(i, len(s)) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            at, length = min(hits)
            self.text = self.text[: at + length if self.include_stop else at]
            self.stopped = True
        return self.stopped

    def take(self, final: bool) -> str:
        """The text that may go out now (all of it when final)."""
        if final and not self.stopped:
            before = self._decode(self.ids[self.prefix : self.read])
            after = self._decode(self.ids[self.prefix :])
            if len(after) > len(before):  # an incomplete character at the very end
                self._append(after[len(before) :])
                self.prefix = self.read = len(self.ids)
        end = len(self.text) if final else len(self.text) - self._held()
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _held(self) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
