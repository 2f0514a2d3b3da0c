"""The target's top-K next-token distributions over plain text, teacher-forced, for distillation.

Why beside the target's own answers (answer_labels.py): decoding is the expensive way to get
the teacher's signal (~150 tok/s batched in float32 here), while one teacher-forced pass labels
every position of a chunk at once (~1700 tok/s in bfloat16). The draft then learns the target's
next-token choices over much more text: code and English (docstrings, docs) from the training
side of the standard-library split and from installed packages' sources.

Records have the same shape as answer_labels', with prompt_len = 1: position j's label is the
target's distribution after ids[: j + 1], so the hard label is the target's argmax, not the
text's next token.
"""

from __future__ import annotations

import random
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from pairs import corpus


def package_files(limit: int, seed: int) -> list[Path]:
    """A seeded sample of installed packages' .py and .md files (site-packages)."""
    root = Path(sysconfig.get_paths()["purelib"])
    files = sorted(p for ext in ("*.py", "*.md") for p in root.rglob(ext) if p.is_file())
    random.Random(seed).shuffle(files)
    return files[:limit]


def chunks(tok, texts: Iterator[str], length: int, min_chars: int = 200) -> Iterator[list[int]]:
    """Token chunks of exactly `length` ids, cut from each text in turn (the tail is dropped)."""
    for text in texts:
        if len(text) < min_chars:
            continue
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids) - length + 1, length):
            yield ids[i : i + length]


def training_texts(train_files: list[str], n_package_files: int, seed: int) -> Iterator[str]:
    """Standard-library training files and package files, interleaved, in a seeded order."""
    root = corpus.stdlib_root()
    std = list(train_files)
    pkg = package_files(n_package_files, seed)
    rng = random.Random(seed)
    rng.shuffle(std)
    for i in range(max(len(std), len(pkg))):
        if i < len(std):
            yield corpus.read_text(root, std[i])
        if i < len(pkg):
            try:
                yield pkg[i].read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue


@torch.inference_mode()
def label_batch(model, rows: list[list[int]], top_k: int) -> list[dict]:
    ids = torch.tensor(rows, dtype=torch.long)
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    logp = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
    top = torch.topk(logp, top_k, dim=-1)
    idx, val = top.indices.to(torch.int32), top.values.to(torch.float16)
    return [
        {
            "ids": ids[i].to(torch.int32),
            "prompt_len": 1,
            "top_idx": idx[i].clone(),
            "top_logp": val[i].clone(),
            "kind": "corpus",
        }
        for i in range(len(rows))
    ]


def label_shards(
    model,
    tok,
    texts: Iterator[str],
    out_dir: Path,
    *,
    length: int,
    batch: int,
    top_k: int,
    max_tokens: int,
    minutes: float,
    log: Callable[[dict], None],
    shard_rows: int = 256,
) -> int:
    """Shards of labelled chunks under out_dir; returns the tokens labelled in all (resumes).

    The chunk order is deterministic, so a rerun skips the chunks its existing shards hold."""
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob("shard_*.pt"))
    skip = sum(len(torch.load(p, weights_only=False)) for p in existing)
    t0 = time.monotonic()
    pending: list[dict] = []
    rows: list[list[int]] = []
    shard = len(existing)
    tokens = start = skip * length

    def flush(n_rows: int) -> None:
        nonlocal pending, shard
        path = out_dir / f"shard_{shard:05d}.pt"
        torch.save(pending[:n_rows], path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        pending = pending[n_rows:]
        shard += 1
        el = time.monotonic() - t0
        log(
            {
                "phase": "label_corpus",
                "shards": shard,
                "tokens": tokens,
                "tok_per_s": round((tokens - start) / max(el, 1e-6), 1),
                "min": round(el / 60, 2),
            }
        )

    for n, chunk in enumerate(chunks(tok, texts, length)):
        if n < skip:
            continue
        if tokens >= max_tokens or time.monotonic() - t0 >= minutes * 60:
            break
        rows.append(chunk)
        if len(rows) < batch:
            continue
        pending += label_batch(model, rows, top_k)
        tokens += len(rows) * length
        rows = []
        if len(pending) >= shard_rows:
            flush(shard_rows)
    if pending:
        flush(len(pending))
    return tokens
