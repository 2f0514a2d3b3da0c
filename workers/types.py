"""The values that cross a worker's boundary: how a request samples, the draft's sparse q, the
target's verdict on a block. No torch at import time (the tensors inside `SparseQ` are opaque to
the scheduler), so the pure scheduling core can hold them without loading torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


MAX_TOP_LOGPROBS = 20  # top alternatives per token at most (OpenAI's and vLLM's default cap)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The target's log-probability of one committed token, and its `top` alternatives as
    (token id, log-probability), most likely first. Raw: log_softmax of the target's logits at
    that position, before temperature, top-k and top-p (vLLM's default `raw_logprobs`), so a
    speculative run's equal a plain run's to the dtype's rounding."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples. temperature == 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    seed: int | None = None
    # The target also answers with each committed token's log-probability and this many top
    # alternatives (0: the token's own only); None: no log-probabilities.
    logprobs: int | None = None
    # The prefill also answers with each prompt token's log-probability (after the first) and
    # this many top alternatives; None: none.
    prompt_logprobs: int | None = None
    # The target's logits are processed before sampling (OpenAI's and vLLM's parameters), the
    # same at every position, verified or decoded plainly (workers/logits_processing.py); all
    # off by default. The draft ignores them: its q stays as it is, which keeps verification
    # exact for the processed distribution (any q whose support holds the drafted token does).
    presence_penalty: float = 0.0  # [-2, 2]: subtracted once from every token the output holds
    frequency_penalty: float = 0.0  # [-2, 2]: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # (0, 2]: HF's and vLLM's, over prompt and output
    min_p: float = 0.0  # [0, 1]: drops tokens below min_p times the most likely one's probability
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit in [-100, 100])
    min_tokens: int = 0  # `held_ids` cannot be drawn before the output holds this many tokens
    held_ids: tuple[int, ...] = ()  # the ids that would end the output: EOS and stop token ids
    # Structured output: llguidance's grammar (workers/grammar.py) the output must follow; the
    # target masks what it refuses at every position. "": none.
    grammar: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, int | float) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.top_p, int | float) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            raise ValueError(
                f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}"
            )
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int)
            or not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS
        ):
            raise ValueError(
                f"prompt_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                f"got {self.prompt_logprobs!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            _check_range(name, getattr(self, name), -2.0, 2.0)
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, 2.0, open_low=True)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        for token, bias in self.logit_bias:
            if not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias: token ids must be integers >= 0, got {token!r}")
            _check_range("logit_bias", bias, -100.0, 100.0)
        if not isinstance(self.grammar, str):
            raise ValueError(f"grammar must be a string, got {type(self.grammar).__name__}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")

    @property
    def processed(self) -> bool:
        """Whether the target's logits are changed before sampling (beyond temperature, top-k,
        top-p and min_p, which shape the distribution without looking at the text)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or (self.min_tokens and self.held_ids)
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_range(
    name: str, value: object, low: float, high: float, *, open_low: bool = False
) -> None:
    ok = (
        isinstance(value, int | float)
        and (low < value if open_low else low <= value)
        and (value <= high)
    )
    if not ok:
        lo = "(" if open_low else "["
        raise ValueError(f"{name} must be a number in {lo}{low:g}, {high:g}], got {value!r}")


@dataclass(frozen=True, slots=True)
class SparseQ:
    """The draft's distributions for k positions, as its top-m support: indices/probs are [k, m].

    m == vocab size is the dense case. Rows sum to 1 over their support.
    """

    indices: torch.Tensor  # int64 [k, m]
    probs: torch.Tensor  # float32 [k, m]

    def dense_row(self, row: int, vocab: int) -> torch.Tensor:
        import torch

        out = torch.zeros(vocab, dtype=torch.float32)
        return out.scatter_(0, self.indices[row].long(), self.probs[row].float())

    def prob_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """q_i(tokens_i) for each row i (0 where the token is outside the support)."""
        hit = self.indices == tokens.long().unsqueeze(1)
        return (self.probs.float() * hit).sum(1)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Outcome of one block: `accepted` draft tokens kept, then one recovered or bonus `token`."""

    accepted: int
    token: int
    bonus: bool = False  # True when all k were accepted and `token` came from p_{k+1}
    # Packed features (workers/wire.py) of the positions this round fed and committed: the
    # last committed token before it and the accepted ones (accepted + 1), for a feature draft;
    # b"" unless the row asked.
    features: bytes = b""
    # One per committed token (accepted + 1) when the sequence asked (SamplingParams.logprobs).
    logprobs: tuple[TokenLogprob, ...] = ()
    # A structured output's next tokens, forced by its grammar after this round (see
    # workers/grammar.py): the scheduler's next block for the row, when there are any.
    forced: tuple[int, ...] = ()

    def committed(self, draft_tokens: list[int]) -> list[int]:
        return list(draft_tokens[: self.accepted]) + [self.token]
