"""Per-sequence KV bookkeeping: one HF cache per sequence plus the length both sides agree on.

The cache is position-indexed, so rolling back to a committed length is a crop (no recomputation).
No ray, no grpc.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import DynamicCache


@dataclass(slots=True)
class SequenceKV:
    """The KV cache of one sequence and how many tokens it holds."""

    cache: DynamicCache = field(default_factory=DynamicCache)
    length: int = 0

    def advanced(self, n: int) -> None:
        self.length += n

    def rollback(self, length: int) -> None:
        """Forget every position >= length. Rolling forward is an error: those KVs never existed."""
        if length < 0 or length > self.length:
            raise ValueError(f"cannot roll back a {self.length}-token cache to {length}")
        if length < self.length:
            # transformers 5.x: crop takes minus the number of tokens to drop (positive raises).
            self.cache.crop(length - self.length)
            self.length = length


class KVStore:
    """All live sequences of one worker, by sequence id."""

    def __init__(self) -> None:
        self._seqs: dict[str, SequenceKV] = {}

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def get(self, seq_id: str) -> SequenceKV:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def create(self, seq_id: str) -> SequenceKV:
        kv = SequenceKV()
        self._seqs[seq_id] = kv
        return kv

    def release(self, seq_id: str) -> bool:
        return self._seqs.pop(seq_id, None) is not None

    def ids(self) -> list[str]:
        return list(self._seqs)
