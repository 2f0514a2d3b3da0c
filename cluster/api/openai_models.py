"""The served model's id and GET /v1/models."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def default_model_id(target_path: str | Path) -> str:
    """The served model id when the config sets none: the target checkpoint's directory name."""
    return Path(target_path).name or "specdec"


def models_list(model_id: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "specdec"}],
    }
