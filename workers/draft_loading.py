"""Which draft worker a checkpoint makes: a feature head (workers/checkpoints/feature_head.py)
makes a FeatureDraftWorker, completed by the target its config names; any causal LM a
DraftWorker. One place, so the Serve deployment, the worker server and the in-process engine
load drafts alike."""

from __future__ import annotations

import json
import os
from pathlib import Path

from workers.checkpoints.feature_head import is_feature_head
from workers.draft import DraftWorker
from workers.dtypes import resolve_dtype
from workers.feature_draft import FeatureDraftWorker


def head_target(path: str | os.PathLike) -> Path:
    """The target checkpoint a feature head reads its embeddings, norm and output rows from: a
    pair name (workers.checkpoints.registry) or a directory, as its config names it."""
    from workers.checkpoints.registry import resolve_checkpoint

    return resolve_checkpoint(
        json.loads((Path(path) / "config.json").read_text())["target"], "target"
    )


def load_draft(
    path: str | os.PathLike,
    *,
    top_m: int = 64,
    confidence_stop: float = 0.0,
    target: str | os.PathLike | None = None,
    **runner_kw,
) -> DraftWorker | FeatureDraftWorker:
    """The draft worker for `path`; `runner_kw` are ModelRunner's (a feature head reads dtype
    and device, and ignores the rest: it has no batched cache, forward or compile switch)."""
    if is_feature_head(Path(path)):
        device = runner_kw.get("device", "cpu")
        dtype = resolve_dtype(runner_kw.get("dtype", "float32"), device)
        return FeatureDraftWorker.from_path(
            path,
            target or head_target(path),
            dtype=dtype,
            top_m=top_m,
            confidence_stop=confidence_stop,
        )
    return DraftWorker.from_path(path, top_m=top_m, confidence_stop=confidence_stop, **runner_kw)
