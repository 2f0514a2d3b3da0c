"""Structured outputs: a grammar's token mask on the target's distribution, by llguidance.

llguidance (Microsoft's Rust Earley parser, also a vLLM backend) was picked over xgrammar: it has
no dependencies (xgrammar pulls triton and a TVM runtime into a CPU install), compiles JSON
schemas, regular expressions and Lark grammars lazily (a new request's matcher is ready in
microseconds, no per-schema compile step), and its matcher rolls back, which is what a verify
pass needs.

Exactness under speculation is the logits processing's argument (workers/logits_processing.py):
row i of a verify pass is masked by the grammar's state after the committed output and the
first i draft tokens, so each position's distribution is the constrained target's given its own
prefix. The matcher consumes the draft tokens to compute the rows, then rolls them back; after
verification it consumes only what was committed. A draft token the grammar refuses gets
probability 0 in its row, so it is rejected there and the rows after it are never used (they
repeat its mask). The draft is not constrained: its q is left as it is, which keeps the rule
exact and costs acceptance only.

A grammar travels as llguidance's own grammar text (`compile_grammar`, checked by the router);
the target builds one matcher per sequence over its tokenizer. Pure: no ray, no grpc.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

KINDS = ("json_schema", "json_object", "regex", "lark")
# JSON is written as json.dumps writes it (", " and ": ", no other whitespace): free whitespace
# lets a model pad forever and never close the object. A schema's own "x-guidance" options win.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SOURCE_CHARS = 1 << 16  # a schema, regular expression or grammar of at most 64 Ki characters


def compile_grammar(kind: str, source: str = "") -> str:
    """llguidance's grammar for a JSON schema (JSON text), any JSON object, a regular expression
    or a Lark grammar; ValueError (the message says what is wrong) when it does not compile."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (use {', '.join(KINDS)})")
    if len(source) > MAX_SOURCE_CHARS:
        raise ValueError(f"at most {MAX_SOURCE_CHARS} characters, got {len(source)}")
    matcher = llguidance.LLMatcher
    try:
        if kind == "json_schema":
            try:
                schema = json.loads(source)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc})") from None
            if not isinstance(schema, dict | bool):
                raise ValueError("a JSON schema is an object")
            grammar = matcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)
        elif kind == "json_object":
            grammar = matcher.grammar_from_json_schema(
                json.dumps({"type": "object"}), defaults=JSON_LAYOUT
            )
        elif kind == "regex":
            grammar = matcher.grammar_from_regex(source)
        else:
            grammar = matcher.grammar_from_lark(source)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValueError(str(exc).strip() or type(exc).__name__) from None
    error = matcher.validate_grammar(grammar)
    if error:
        raise ValueError(" ".join(error.split())[:400])  # one line, as a client reads it
    return grammar


_tokenizers: dict[int, Any] = {}
_tokenizers_lock = threading.Lock()


def grammar_tokenizer(tokenizer: Any, vocab: int) -> Any:
    """llguidance's view of a Hugging Face tokenizer (built once per tokenizer: ~0.4 s for
    SmolLM2's). Tokenizers llguidance cannot read directly (a decoder it does not know) are
    described token by token: each id's text as decoded alone, special tokens empty."""
    key = id(tokenizer)
    with _tokenizers_lock:
        if key not in _tokenizers:
            try:
                made = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
            except ValueError:
                made = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(_TokenTable(tokenizer, vocab)), n_vocab=vocab
                )
            _tokenizers[key] = (tokenizer, made)  # the tokenizer is kept alive with its id
        return _tokenizers[key][1]


def warm(tokenizer: Any, vocab: int) -> None:
    """Build llguidance's tables for a tokenizer ahead of the first structured request: the
    first mask of a process costs ~2 s for SmolLM2's vocabulary (its token trie), every later
    one ~1 ms for a new grammar and ~0.1 ms a token. A target replica runs this on a thread of
    its own at start."""
    state = OutputGrammar(tokenizer, compile_grammar("regex", "[a-z]"), vocab, ())
    state.mask(torch.zeros(1, vocab), ())


class _TokenTable:
    """What llguidance.TokenizerWrapper reads: each token's bytes and an encoder."""

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        special = set(tokenizer.all_special_ids)
        size = min(vocab, len(tokenizer))
        self.tokens = [
            b"" if i in special else tokenizer.decode([i]).encode("utf-8") for i in range(size)
        ] + [b""] * (vocab - size)
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(special)
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_special_tokens=False)


class OutputGrammar:
    """One sequence's grammar state: a matcher that has consumed the committed output."""

    def __init__(self, tokenizer: Any, grammar: str, vocab: int, output: Sequence[int]) -> None:
        self.vocab = vocab
        self.matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer, vocab), grammar)
        if self.matcher.is_error():
            raise ValueError(f"grammar: {self.matcher.get_error().strip()}")
        self.commit(output)

    def mask(self, logits: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
        """logits [n, V] (row i after the committed output and block[:i]) with the tokens the
        grammar refuses at each row set to -inf; the matcher ends where it began."""
        n = logits.shape[0]
        bits = llguidance.torch.allocate_token_bitmask(n, self.vocab)
        consumed = 0
        for i in range(n):
            if i > consumed:  # block[i - 1] was refused: rows from here on are never used
                bits[i] = bits[i - 1]
                continue
            llguidance.torch.fill_next_token_bitmask(self.matcher, bits, i)
            # A stopped grammar (its end reached) allows only EOS from here on, and consumes
            # nothing more: llguidance cannot roll back a token taken past its end.
            if i < len(block) and i < n - 1 and not self.matcher.is_stopped():
                if self._allowed(bits[i], block[i]) and self.matcher.consume_token(int(block[i])):
                    consumed += 1
        if consumed and not self.matcher.rollback(consumed):
            raise RuntimeError(f"grammar: rollback failed ({self.matcher.get_error()})")
        out = logits.float().clone()
        llguidance.torch.apply_token_bitmask_inplace(out, bits)
        return out

    def commit(self, tokens: Sequence[int]) -> None:
        """The tokens the round committed (a stopped grammar, one whose end was reached and an
        EOS past it taken, consumes nothing more)."""
        for token in tokens:
            if self.matcher.is_stopped():
                return
            self.matcher.consume_token(int(token))

    def forced(self) -> tuple[int, ...]:
        """The tokens the grammar forces next (a JSON schema's keys and punctuation, as the
        tokenizer writes them): a block the scheduler proposes with certainty, the target's
        own distribution deciding, as for any one-hot block. () when nothing is forced."""
        if self.matcher.is_stopped():
            return ()
        return tuple(self.matcher.compute_ff_tokens())

    @staticmethod
    def _allowed(bits: torch.Tensor, token: int) -> bool:
        return bool((int(bits[token // 32]) >> (token % 32)) & 1)
