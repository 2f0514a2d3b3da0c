"""The project's own small draft/target pair, trained by `workers.pair.recipe`, shipped as data."""

from pathlib import Path

SHIPPED_PAIR_DIR: Path = Path(__file__).resolve().parent / "assets"


def shipped_target_path() -> Path:
    """Directory of the shipped target checkpoint (HF format, with tokenizer files)."""
    return SHIPPED_PAIR_DIR / "target"


def shipped_draft_path() -> Path:
    """Directory of the shipped draft checkpoint (HF format, same tokenizer as the target)."""
    return SHIPPED_PAIR_DIR / "draft"


__all__ = ["SHIPPED_PAIR_DIR", "shipped_draft_path", "shipped_target_path"]
