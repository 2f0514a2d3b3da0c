"""The stdlib recipe's training data as one token stream: encoding documents, and the random
(training) or fixed (evaluation) windows sampled from it."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast


def encode_docs(tok: PreTrainedTokenizerFast, texts: list[str], chunk: int = 256) -> torch.Tensor:
    """One flat stream: every document followed by the EOS boundary token."""
    eos = tok.eos_token_id
    parts: list[torch.Tensor] = []
    for i in range(0, len(texts), chunk):
        enc = tok(texts[i : i + chunk], add_special_tokens=False)["input_ids"]
        for ids in enc:
            parts.append(torch.tensor(ids + [eos], dtype=torch.int32))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)


class StreamSampler:
    """Random fixed-length windows of a token stream, from a seeded generator."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch: int, seed: int) -> None:
        if len(stream) <= seq_len + 1:
            raise ValueError("token stream shorter than one training window")
        self.stream, self.seq_len, self.batch = stream, seq_len, batch
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        hi = len(self.stream) - self.seq_len - 1
        starts = torch.randint(0, hi, (self.batch,), generator=self.gen)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        return self.stream[idx].long()


def fixed_windows(stream: torch.Tensor, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """A fixed evaluation sample of n windows (same every call for the same seed)."""
    return StreamSampler(stream, seq_len, n, seed).next()
