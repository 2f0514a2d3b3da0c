"""The round state machine of one sequence: what a round commits and when the sequence ends.

Pure bookkeeping, no I/O: the drivers (the in-process engine and the gRPC router) feed it the
outcome of each speculative round or plain step, and it returns the tokens that may go out. It
never emits past EOS, a stop token id or max_new_tokens, even when a block overshoots them (the
workers may then hold a few extra tokens; the sequence is finished and released anyway).
No ray, no grpc.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from workers.token_range import check_length


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class StopConditions:
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    stop_token_ids: frozenset[int] = frozenset()
    max_context: int = 1 << 30  # the target's context: the committed length never passes it

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One target pass: `proposed` draft tokens (0 for a plain step), `accepted` of them, and
    `committed` tokens that went out (after trimming at a stop)."""

    proposed: int
    accepted: int
    committed: int


@dataclass(slots=True)
class GenerationStats:
    rounds: int = 0  # speculative rounds
    draft_tokens: int = 0
    accepted_tokens: int = 0
    plain_steps: int = 0
    pipeline_hits: int = 0
    pipeline_misses: int = 0
    draft_failures: int = 0
    records: list[RoundRecord] = field(default_factory=list)
    # rounds, draft tokens, accepted tokens by who proposed the block ("model", "lookup")
    by_drafter: dict[str, list[int]] = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Mean tokens committed per speculative round (accepted + the recovered/bonus one)."""
        return (self.accepted_tokens + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def acceptance_histogram(self) -> list[int]:
        """[j] = speculative rounds that accepted exactly j draft tokens (j up to the longest
        block proposed); empty when there were none."""
        spec = [r for r in self.records if r.proposed]
        hist = [0] * (max((r.proposed for r in spec), default=-1) + 1)
        for r in spec:
            hist[r.accepted] += 1
        return hist

    @property
    def tokens_per_target_pass(self) -> float:
        """τ over the whole sequence: committed tokens per target forward (plain steps count)."""
        passes = self.rounds + self.plain_steps
        return sum(r.committed for r in self.records) / passes if passes else 0.0


def add_rounds(
    table: dict[str, list[int]], drafter: str, rounds: int, proposed: int, accepted: int
) -> None:
    """Add to a table of [rounds, proposed tokens, accepted tokens] by drafter."""
    counts = table.setdefault(drafter, [0, 0, 0])
    counts[0] += rounds
    counts[1] += proposed
    counts[2] += accepted


class SequenceRounds:
    """The committed state of one sequence and the rules that end it."""

    def __init__(self, prompt_ids: Sequence[int], stop: StopConditions) -> None:
        # Room for at least one new token: the worker's own rule (raises a ValueError).
        check_length("prompt", len(prompt_ids), stop.max_context, new_tokens=1)
        self.prompt_ids = list(prompt_ids)
        self.stop = stop
        self.generated: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.stats = GenerationStats()

    @property
    def committed_len(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.generated

    def tokens_from(self, start: int) -> list[int]:
        """Committed tokens from position `start` on, without copying the whole sequence (the
        round driver asks for the draft's lag every round)."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.generated[start - n :]
        return self.prompt_ids[start:] + self.generated

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def block_size(self, k: int) -> int:
        """The largest useful block <= k: a round commits up to k+1 tokens, so never draft past
        max_new_tokens or the context. 0 means: take a plain step."""
        remaining = self.stop.max_new_tokens - len(self.generated)
        room = self.stop.max_context - self.committed_len
        return max(0, min(k, remaining - 1, room - 1))

    def on_round(
        self, draft_tokens: Sequence[int], accepted: int, token: int, drafter: str = "model"
    ) -> list[int]:
        """Record a verified block; returns the tokens that go out to the client."""
        self._check_open()
        self.stats.rounds += 1
        self.stats.draft_tokens += len(draft_tokens)
        self.stats.accepted_tokens += accepted
        add_rounds(self.stats.by_drafter, drafter, 1, len(draft_tokens), accepted)
        out = self._emit([*draft_tokens[:accepted], token])
        self.stats.records.append(RoundRecord(len(draft_tokens), accepted, len(out)))
        return out

    def on_plain(self, token: int) -> list[int]:
        self._check_open()
        self.stats.plain_steps += 1
        out = self._emit([token])
        self.stats.records.append(RoundRecord(0, 0, len(out)))
        return out

    def cancel(self) -> None:
        if not self.finished:
            self.finish_reason = FinishReason.CANCELLED

    def finish(self, reason: FinishReason) -> None:
        """End the sequence from outside (a stop string matched in the detokenized text)."""
        if not self.finished:
            self.finish_reason = reason

    def _emit(self, tokens: list[int]) -> list[int]:
        out: list[int] = []
        for tok in tokens:
            out.append(tok)
            self.generated.append(tok)
            if tok in self.stop.eos_token_ids:
                self.finish_reason = FinishReason.EOS
            elif tok in self.stop.stop_token_ids:
                self.finish_reason = FinishReason.STOP
            elif len(self.generated) >= self.stop.max_new_tokens:
                self.finish_reason = FinishReason.LENGTH
            elif self.committed_len >= self.stop.max_context:
                self.finish_reason = FinishReason.LENGTH
            if self.finished:
                break
        return out

    def _check_open(self) -> None:
        if self.finished:
            raise RuntimeError(f"sequence already finished ({self.finish_reason.value})")
