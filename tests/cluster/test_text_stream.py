"""Stop strings in the streamed text: cut before (or after) the match, held back while a tail may
start one, and never matched before min_tokens (vLLM's rule)."""

from __future__ import annotations

from tokenizers import decoders

from cluster.api.text_stream import TextStream
from tests.tiny_models import make_tokenizer


def tokenizer():
    tok = make_tokenizer()
    tok.backend_tokenizer.decoder = decoders.Fuse()  # one character a token, no spaces between
    return tok


def run(text: str, stops: list[str], **kw) -> tuple[str, int]:
    tok = tokenizer()
    stream = TextStream(tok, tok.encode("p", add_special_tokens=False), stops, **kw)
    out, fed = "", 0
    for t in tok.encode(text, add_special_tokens=False):
        fed += 1
        if stream.feed(t):
            break
        out += stream.take(False)
    return out + stream.take(True), fed


def test_a_stop_string_cuts_the_text_before_it_or_after_it():
    assert run("ab;cd;ef", [";"]) == ("ab", 3)
    assert run("ab;cd;ef", [";"], include_stop=True) == ("ab;", 3)
    assert run("abcdef", ["xyz"]) == ("abcdef", 6)


def test_no_stop_string_matches_before_min_tokens():
    assert run("ab;cd;ef", [";"], min_tokens=4) == ("ab;cd", 6)  # the first ';' is token 3
    assert run("ab;cd;ef", [";"], min_tokens=3) == ("ab", 3)
    # A stop string that completes at min_tokens counts; one wholly before it does not.
    assert run("a;;bc;", [";;"], min_tokens=3) == ("a", 3)
    assert run("a;;bc;", [";;"], min_tokens=4) == ("a;;bc;", 6)
