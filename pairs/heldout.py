"""The held-out prompts a pair is evaluated (and benchmarked) on, from its recipe's file split.

- a code pair (the stdlib recipe): function starts from the held-out standard-library files;
- an instruct pair (the SmolLM2 recipe): chat requests and code prompts built from the held-out
  files as the recipe builds them, past the ones the recipe used to pick its checkpoints.
"""

from __future__ import annotations

import random
from pathlib import Path

from pairs import corpus, instruct_prompts

# The SmolLM2 recipe's held-out generations (its checkpoint choice) use the first prompts of the
# held-out list: the evaluation starts after them.
SKIP_INSTRUCT_HELDOUT = 128
INSTRUCT_SEED = 0


def heldout_texts(pair_dir: Path) -> list[str]:
    """The held-out files' texts of the split in pair_dir/split.json."""
    split = corpus.Split.load(pair_dir / "split.json")
    root = Path(split.root)
    return [t for f in split.heldout if (t := corpus.read_text(root, f))]


def heldout_code_prompts(
    tok, texts: list[str], n: int, seed: int = 0, max_tokens: int = 128
) -> list[list[int]]:
    """n seeded function-start prompts from held-out files, left-truncated to max_tokens."""
    prompts = [p for t in texts for p in corpus.function_prompts(t, 1500)]
    random.Random(seed).shuffle(prompts)
    ids = tok(prompts[:n], add_special_tokens=False)["input_ids"]
    return [x[-max_tokens:] for x in ids]


def heldout_instruct_prompts(
    tok, n: int, split_path: Path, max_tokens: int = 256
) -> list[tuple[str, list[int]]]:
    """n held-out (kind, ids) prompts, two chat requests for every code prompt, in a fixed
    order, encoded as the recipe encodes its own."""
    split = corpus.Split.load(split_path)
    rows = instruct_prompts.encoded_prompts(tok, split.heldout, INSTRUCT_SEED + 1, max_tokens)
    rows = rows[SKIP_INSTRUCT_HELDOUT:]
    chat = [r for r in rows if r[0] == "chat"][: n - n // 3]
    code = [r for r in rows if r[0] == "code"][: n // 3]
    return chat + code
