"""The token-range rules: token ids inside the vocabulary, token counts inside the context.

The worker owns them: it checks every row it is given (whoever sent it: the router, the in-process
engine, a buggy client), because an id outside the embedding table fails the forward (on a GPU a
device-side assert that takes the whole worker down) and a sequence past the context has no
positions left. The front ends (the public request validation, the in-process engine's encode)
call the same functions before a request is admitted, so a user hears of a bad prompt at once, in
the words of their API, and nothing is started on a worker. No torch, no grpc: every layer may
import it.
"""

from __future__ import annotations

from collections.abc import Iterable


class TokenRangeError(ValueError):
    """A token id or a token count out of range; str() is "<field>: <message>"."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_token_ids(field: str, ids: Iterable[int], vocab_size: int) -> list[int]:
    """The ids as a list of ints, every one inside the vocabulary [0, vocab_size)."""
    out = [int(t) for t in ids]
    if out:
        check_id_bounds(field, min(out), max(out), vocab_size)
    return out


def check_id_bounds(field: str, lowest: int, highest: int, vocab_size: int) -> None:
    """Token ids from `lowest` to `highest` inside the vocabulary (for ids held in a tensor,
    whose min and max are one op each)."""
    for bad in (lowest, highest):
        if not 0 <= bad < vocab_size:
            raise TokenRangeError(
                field, f"token id {bad} is outside the vocabulary [0, {vocab_size})"
            )


def check_length(field: str, tokens: int, max_context: int, *, new_tokens: int = 0) -> None:
    """A sequence of `tokens` (at least one) and the `new_tokens` a call adds to it fit in the
    context. A prompt to generate from adds at least one; a draft block to verify adds its
    length."""
    if tokens < 1:
        raise TokenRangeError(field, "must contain at least one token")
    if tokens + new_tokens > max_context:
        adding = f" + {new_tokens} new" if new_tokens else ""
        raise TokenRangeError(
            field, f"{tokens} tokens{adding} would pass the context of {max_context}"
        )
